//! `kho check`: run every check and report findings.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kho_alloc::check::{self, CheckOptions, CheckReport, Severity};
use serde_json::json;

use crate::fmt::{hex, hexdump, size, Align, Style, Table};
use crate::input::Input;

/// Draw a progress bar only for arenas with at least this much preserved
/// memory (smaller ones finish before a bar is worth drawing).
const BAR_THRESHOLD: u64 = 256 << 20;

/// Verify an arena or image: stale data, scratch and KFENCE overlaps,
/// dangling metadata references, image placement and superblocks.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Exit codes: 0 clean, 1 findings, 2 the input cannot be read or is not a valid
image (one line on stderr names what and where).

Examples:
  kho check kv.arena                 every check; stale data is reported by count and offset
  kho check kv.arena --show-bytes    add a bounded hexdump of the first stale bytes
  kho check kv.img --json            a bare image: content checks are skipped and listed")]
pub struct Args {
    /// An arena file or a bare image.
    pub path: PathBuf,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show a bounded hexdump of stale bytes (off by default: it is
    /// somebody's data).
    #[arg(long)]
    pub show_bytes: bool,
}

/// Run `kho check`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let input = Input::open(&args.path)?;
    let opts = CheckOptions {
        show_bytes: args.show_bytes,
        ..CheckOptions::default()
    };
    let mut bar: Option<ProgressBar> = None;
    let tty = std::io::stderr().is_terminal();
    let mut progress = |done: u64, total: u64| {
        if !bar_wanted(tty, total) {
            return;
        }
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(s) = ProgressStyle::with_template(
                "checking {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            ) {
                b.set_style(s);
            }
            b
        });
        b.set_position(done);
    };
    let result = check::check(input.bytes(), &opts, &mut progress);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let report = result.with_context(|| args.path.display().to_string())?;
    if args.json {
        crate::print_json(&to_json(&report))?;
    } else {
        crate::print(&human(&report, Style::stdout()))?;
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A progress bar only on a terminal, and only for a check over at least
/// [`BAR_THRESHOLD`] bytes of preserved memory.
fn bar_wanted(stderr_is_terminal: bool, total: u64) -> bool {
    stderr_is_terminal && total >= BAR_THRESHOLD
}

fn human(r: &CheckReport, st: Style) -> String {
    let mut out = String::new();
    let s = &r.stats;
    match (r.slot, r.image) {
        (Some((slot, generation)), Some(loc)) => {
            let _ = writeln!(
                out,
                "{} {} ({}): superblock slot {slot}, generation {generation}, image at {} ({})",
                st.bold("arena"),
                hex(s.arena_size),
                size(s.arena_size),
                hex(loc.offset),
                size(loc.len)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "{} for an arena of {} ({})",
                st.bold("bare image"),
                hex(s.arena_size),
                size(s.arena_size)
            );
        }
    }
    let _ = writeln!(
        out,
        "preserved {} in {} folios, {} slab pages, {} extents, {} tree ranges; scanned {}",
        size(s.preserved_bytes),
        s.folios,
        s.slab_pages,
        s.extents,
        s.tree_ranges,
        size(s.scanned_bytes)
    );
    if !r.findings.is_empty() {
        let mut t = Table::new(&[
            ("CODE", Align::Left),
            ("SEVERITY", Align::Left),
            ("LOCATION", Align::Left),
            ("COUNT", Align::Right),
            ("MESSAGE", Align::Left),
        ]);
        for f in &r.findings {
            t.row(vec![
                f.code.into(),
                f.severity.name().into(),
                f.location.to_string(),
                f.count.to_string(),
                f.message.clone(),
            ]);
        }
        out.push_str(&t.render(0, st));
        for f in &r.findings {
            // Stale-data findings are located at the scanned range; the
            // stale bytes themselves are at the offsets.
            if f.code.starts_with("KHO-S") || f.count > 1 || f.sample.is_some() {
                let offs: Vec<String> = f.offsets.iter().map(|o| hex(*o)).collect();
                let more = if (f.offsets.len() as u64) < f.count {
                    ", ..."
                } else {
                    ""
                };
                let _ = writeln!(out, "{}: first at {}{more}", f.code, offs.join(", "));
            }
            if let Some(sample) = &f.sample {
                out.push_str(&hexdump(sample.at, &sample.bytes, 2));
            }
        }
    }
    for why in &r.skipped {
        let _ = writeln!(out, "skipped: {why}");
    }
    let errors = r
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let warnings = r.findings.len() - errors;
    if r.is_clean() {
        let _ = writeln!(out, "{}", st.green("clean: no findings"));
    } else {
        let line = format!(
            "{} finding(s): {errors} error(s), {warnings} warning(s)",
            r.findings.len()
        );
        let _ = writeln!(
            out,
            "{}",
            if errors > 0 {
                st.red(&line)
            } else {
                st.yellow(&line)
            }
        );
    }
    out
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The JSON document of `kho check --json` (schema in docs/CLI.md).
pub fn to_json(r: &CheckReport) -> serde_json::Value {
    let findings: Vec<_> = r
        .findings
        .iter()
        .map(|f| {
            json!({
                "code": f.code,
                "severity": f.severity.name(),
                "title": check::code_info(f.code).map(|c| c.title),
                "location": { "start": f.location.start, "len": f.location.len },
                "message": f.message,
                "count": f.count,
                "bytes": f.bytes,
                "offsets": f.offsets,
                "sample": f.sample.as_ref().map(|s| json!({ "at": s.at, "hex": hex_string(&s.bytes) })),
            })
        })
        .collect();
    let s = &r.stats;
    json!({
        "kind": r.kind.name(),
        "clean": r.is_clean(),
        "slot": r.slot.map(|(i, g)| json!({ "index": i, "generation": g })),
        "image": r.image.map(|l| json!({ "offset": l.offset, "len": l.len, "crc32": l.crc })),
        "stats": {
            "arena_size": s.arena_size,
            "preserved_bytes": s.preserved_bytes,
            "folios": s.folios,
            "slab_pages": s.slab_pages,
            "extents": s.extents,
            "tree_ranges": s.tree_ranges,
            "scanned_bytes": s.scanned_bytes,
        },
        "findings": findings,
        "skipped": r.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_only_on_a_terminal_for_big_checks() {
        assert!(bar_wanted(true, BAR_THRESHOLD));
        assert!(bar_wanted(true, 8 << 30));
        assert!(!bar_wanted(true, BAR_THRESHOLD - 1));
        assert!(
            !bar_wanted(false, 8 << 30),
            "never when stderr is a pipe or file"
        );
    }
}
