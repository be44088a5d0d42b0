//! `kho extract`: the current image of an arena, written as a bare file.

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write as _;
use std::os::fd::AsFd as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use kho_alloc::check::{self, InputKind};

use crate::input::Input;

/// Write the current handover image out of an arena.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
The image is written to a temporary file next to IMAGE, synced, then
renamed over IMAGE, so IMAGE is either the old file or the whole image.
The arena itself is never written: an IMAGE that is the arena (under any
name) is refused.

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
    let crc = check::crc32(found.bytes);
    if crc != found.location.crc {
        anyhow::bail!(
            "{path}: image at {:#x}: crc32 is {crc:#010x}, superblock slot {} records {:#010x}",
            found.location.offset,
            found.slots.current,
            found.location.crc
        );
    }
    if args.output.as_os_str() == "-" {
        let stdout = std::io::stdout();
        // `kho extract A -o - >> A` would write the mapped arena into
        // itself.
        let meta = stdout
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .and_then(|f| f.metadata())
            .context("stdout: stat")?;
        if input.is_same_file(&meta) {
            anyhow::bail!("stdout: is the arena {path} itself; refusing to write into the input");
        }
        let mut out = stdout.lock();
        out.write_all(found.bytes)
            .and_then(|()| out.flush())
            .context("stdout: write")?;
    } else {
        write_file(&input, &args.output, found.bytes)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Write `bytes` to `out` without ever touching the input: a regular file
/// (or a new one) is replaced atomically through a temporary file in the
/// same directory; a device or FIFO (`/dev/null`) is written in place.
fn write_file(input: &Input, out: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = out.display();
    let existing = match std::fs::metadata(out) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("{name}: stat")),
    };
    if let Some(meta) = &existing {
        if input.is_same_file(meta) {
            anyhow::bail!(
                "{name}: is the arena {} itself; refusing to overwrite the input",
                input.path.display()
            );
        }
        if meta.is_dir() {
            anyhow::bail!("{name}: is a directory, expected a file name for the image");
        }
        if !meta.is_file() {
            let mut f = OpenOptions::new()
                .write(true)
                .open(out)
                .with_context(|| format!("{name}: open"))?;
            return f
                .write_all(bytes)
                .and_then(|()| f.flush())
                .with_context(|| format!("{name}: write"));
        }
    }
    // Replace the symlink's target, not the symlink.
    let target = match &existing {
        Some(_) => std::fs::canonicalize(out).with_context(|| format!("{name}: resolve"))?,
        None => out.to_owned(),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // An existing file keeps its mode; a new one gets 0666 less the umask,
    // as a plain create would.
    let mode = existing
        .as_ref()
        .map_or(0o666, |m| m.permissions().mode() & 0o7777);
    let mut tmp = tempfile::Builder::new()
        .prefix(".kho-extract-")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(dir)
        .with_context(|| format!("{}: create a temporary file", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("{name}: write"))?;
    if existing.is_some() {
        // `permissions` is masked by the umask at creation; an existing
        // file's mode is restored exactly.
        std::fs::set_permissions(tmp.path(), Permissions::from_mode(mode))
            .with_context(|| format!("{name}: chmod"))?;
    }
    tmp.persist(&target)
        .map_err(|e| e.error)
        .with_context(|| format!("{name}: rename"))?;
    Ok(())
}
