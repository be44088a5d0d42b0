//! `kho`: inspect, check, compare and extract kho handover images.
//!
//! Every subcommand takes an arena file (the image is found through its
//! superblocks) or a bare image. Human output goes to stdout as aligned
//! tables; `--json` prints one JSON document instead (the schema is in
//! `docs/CLI.md`). Errors are one line on stderr, `kho: <what>: <why>`,
//! with exit code 2.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod check;
mod demo;
mod diff;
mod extract;
mod fmt;
mod input;
mod inspect;
mod json;
mod ranges;

/// Inspect and verify kho handover images and arenas.
#[derive(Debug, Parser)]
#[command(name = "kho", version, about, long_about = None)]
#[command(after_help = "\
Examples:
  kho inspect /dev/shm/kv.arena          header, sections, preserved memory, slab, tree
  kho ranges kv.arena --order 0 --folios every order-0 preserved folio
  kho check kv.arena                     exit 0 clean, 1 findings, 2 unreadable
  kho diff before.img after.img          what a handover added and removed
  kho extract kv.arena -o kv.img         the current image as a bare file

Exit codes: 0 success (clean / same), 1 findings (check) or differences (diff),
2 the input cannot be read or is not a valid image.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Inspect(inspect::Args),
    Ranges(ranges::Args),
    Check(check::Args),
    Diff(diff::Args),
    Extract(extract::Args),
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with success; usage errors are
            // exit 2, as clap's own convention and ours agree.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let result = match &cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Ranges(a) => ranges::run(a),
        Command::Check(a) => check::run(a),
        Command::Diff(a) => diff::run(a),
        Command::Extract(a) => extract::run(a),
        Command::Demo(a) => demo::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kho: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// Print `s` to stdout; a closed pipe (`kho ... | head`) is not an error.
pub(crate) fn print(s: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// Print a JSON document and a newline.
pub(crate) fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut s = serde_json::to_string_pretty(v)?;
    s.push('\n');
    print(&s)
}

/// The error chain on one line, joined by ": ". A cause whose text its
/// parent already includes (a `thiserror` message that embeds its source)
/// is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}
