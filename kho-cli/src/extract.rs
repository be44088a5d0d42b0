//! `kho extract`: the current image of an arena, written as a bare file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use kho_alloc::check::{self, InputKind};

use crate::input::Input;

/// Write the current handover image out of an arena.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kho extract kv.arena -o kv.img     validate the current image, then write it
  kho extract kv.arena -o - | xxd    to stdout")]
pub struct Args {
    /// The arena file.
    pub arena: PathBuf,
    /// Where to write the image (`-` for stdout).
    #[arg(short, long)]
    pub output: PathBuf,
}

/// Run `kho extract`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let input = Input::open(&args.arena)?;
    let path = args.arena.display();
    if input.kind() == InputKind::Image {
        anyhow::bail!("{path}: is a bare image already, not an arena");
    }
    let found = check::arena_image(input.bytes()).with_context(|| path.to_string())?;
    let crc = crc32fast_hash(found.bytes);
    if crc != found.location.crc {
        anyhow::bail!(
            "{path}: image at {:#x}: crc32 is {crc:#010x}, superblock slot {} records {:#010x}",
            found.location.offset,
            found.slots.current,
            found.location.crc
        );
    }
    if args.output.as_os_str() == "-" {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        out.write_all(found.bytes)
            .and_then(|()| out.flush())
            .context("write stdout")?;
    } else {
        std::fs::write(&args.output, found.bytes)
            .with_context(|| format!("{}: write", args.output.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn crc32fast_hash(bytes: &[u8]) -> u32 {
    kho_alloc::check::crc32(bytes)
}
