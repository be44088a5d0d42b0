//! `kho`: inspect, check, compare and extract kho handover images.
//!
//! Every subcommand takes an arena file (the image is found through its
//! superblocks) or a bare image. Human output goes to stdout as aligned
//! tables; `--json` prints one JSON document instead (the schema is in
//! `docs/CLI.md`). Errors, usage errors included, are one line on
//! stderr, `kho: <what>: <why>`, with exit code 2.
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
mod raw;

/// Inspect and verify kho handover images and arenas.
#[derive(Debug, Parser)]
#[command(name = "kho", version, about, long_about = None)]
#[command(after_help = "\
Examples:
  kho inspect /dev/shm/kv.arena            header, sections, preserved memory, slab, tree
  kho ranges kv.arena --order 0 --folios   every order-0 preserved folio
  kho check kv.arena                       exit 0 clean, 1 findings, 2 unreadable
  kho diff before.img after.img            what a handover added and removed
  kho extract kv.arena -o kv.img           the current image as a bare file
  kho demo --entries 100000                a live update across a real exec

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
    /// Run a live update of a key-value store across a real exec.
    #[command(
        long_about = "Run a live update of a key-value store across a real exec: fill the \
store in an arena (a memfd, or a new file with --arena), freeze and commit a handover, exec this binary as the successor \
with the arena descriptor inherited, restore, and verify every entry. Prints the blackout \
(freeze, commit, exec, restore) and what the checker found in the image.",
        after_help = "\
Exit codes: 0 every entry verified by the successor, 1 it was not, 2 the
handover or the exec failed.

Examples:
  kho demo                                   1,000,000 entries of 100 bytes, arena in a memfd
  kho demo --entries 10000 --value-size 64   a smaller store
  kho demo --arena kv.arena                  keep the arena, then: kho check kv.arena"
    )]
    Demo(demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // Help and version go to stdout with success.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            eprintln!("kho: {}", usage_line(&e, &args));
            return ExitCode::from(2);
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

/// A usage error on one line: clap's message (its first paragraph, without
/// the `error: ` prefix) and where to find help, for the subcommand named
/// in `args` if there is one.
fn usage_line(e: &clap::Error, args: &[String]) -> String {
    use clap::CommandFactory as _;
    let rendered = e.render().to_string();
    let msg = if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        // clap renders the whole help here.
        "a subcommand is required".to_owned()
    } else {
        let para: Vec<&str> = rendered
            .lines()
            .map(str::trim)
            .skip_while(|l| l.is_empty())
            .take_while(|l| !l.is_empty())
            .collect();
        let msg = para.join(" ");
        match msg.strip_prefix("error: ") {
            Some(m) => m.to_owned(),
            None if msg.is_empty() => "invalid arguments".to_owned(),
            None => msg,
        }
    };
    let cmd = Cli::command();
    let sub = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .filter(|a| cmd.find_subcommand(a.as_str()).is_some());
    match sub {
        Some(sub) => format!("usage: {msg}; see 'kho {sub} --help'"),
        None => format!("usage: {msg}; see 'kho --help'"),
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
pub(crate) fn one_line(e: &anyhow::Error) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(args: &[&str]) -> String {
        let e = Cli::try_parse_from(std::iter::once("kho").chain(args.iter().copied()))
            .expect_err("a usage error");
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        usage_line(&e, &args)
    }

    #[test]
    fn usage_errors_are_one_line_naming_the_help() {
        let cases = [
            (
                &["frobnicate"][..],
                "unrecognized subcommand 'frobnicate'",
                "kho --help",
            ),
            (&[][..], "a subcommand is required", "kho --help"),
            (
                &["check"][..],
                "required arguments were not provided: <PATH>",
                "kho check --help",
            ),
            (
                &["ranges", "x", "--order", "19"][..],
                "invalid value '19'",
                "kho ranges --help",
            ),
            (
                &["diff", "--bogus", "a", "b"][..],
                "unexpected argument '--bogus'",
                "kho diff --help",
            ),
        ];
        for (args, msg, help) in cases {
            let line = usage(args);
            assert!(!line.contains('\n'), "{line:?}");
            assert!(line.starts_with("usage: "), "{line}");
            assert!(line.contains(msg), "{args:?}: {line}");
            assert!(line.ends_with(&format!("see '{help}'")), "{line}");
        }
    }

    #[test]
    fn every_subcommand_has_examples() {
        use clap::CommandFactory as _;
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            let help = sub
                .get_after_help()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(help.contains("Examples:"), "kho {} --help", sub.get_name());
            let about = sub.get_about().map(ToString::to_string).unwrap_or_default();
            assert!(
                !about.starts_with("Arguments of"),
                "{}: {about}",
                sub.get_name()
            );
        }
    }
}
