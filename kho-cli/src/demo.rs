//! `kho demo`: a live update across a real `exec`.
//!
//! The command fills a key-value store in an arena (a memfd, or a new
//! file given with `--arena`), hands it over by `exec`ing itself
//! (`kho demo --successor`, the arena descriptor inherited), and the
//! successor verifies every entry and reports the blackout. The flow
//! itself is [`kho_alloc::kv::demo`].

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::Context;
use kho_alloc::kv::demo::{self, DemoConfig, DemoReport};

/// Arguments of `kho demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Arena file to create and keep, for `kho inspect` and `kho check`;
    /// it must not exist (default: a memfd).
    #[arg(long, value_name = "PATH")]
    pub arena: Option<PathBuf>,
    /// Entries to insert.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    pub entries: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 100, value_name = "B")]
    pub value_size: u32,
    /// Run as the successor (set by the demo itself when it execs).
    #[arg(long, hide = true)]
    pub successor: bool,
}

/// Run the demo: exit 0 only if the successor verified every entry.
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    if args.successor {
        return successor();
    }
    if args.entries == 0 {
        anyhow::bail!("demo: --entries must be at least 1");
    }
    if args.value_size > kho_alloc::kv::MAX_VALUE_SIZE {
        anyhow::bail!(
            "demo: --value-size {} exceeds the maximum {}",
            args.value_size,
            kho_alloc::kv::MAX_VALUE_SIZE
        );
    }
    let cfg = DemoConfig {
        entries: args.entries,
        value_size: args.value_size,
        arena: args.arena.clone(),
    };
    let exe = std::env::current_exe().context("demo: cannot find the kho executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["demo", "--successor"]);
    // Only returns if the handover or the exec failed.
    let err = demo::run_predecessor(&cfg, &mut cmd);
    Err(anyhow::Error::new(err).context("demo"))
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

fn successor() -> anyhow::Result<ExitCode> {
    let r = demo::run_successor().context("demo successor")?;
    print_report(&r);
    Ok(if r.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_report(r: &DemoReport) {
    let p = &r.predecessor;
    let freeze = Duration::from_nanos(p.freeze_ns);
    let commit = Duration::from_nanos(p.commit_ns);
    println!("kho demo: live update of a key-value store across exec");
    println!(
        "  entries          {} x {} B values ({} verified, {} bad)",
        p.entries, p.value_size, r.verified, r.bad
    );
    println!("  store            {}", mib(r.store_bytes));
    println!("  preserved        {}", mib(p.preserved_bytes));
    println!(
        "  image            {} bytes, generation {}",
        p.image_len, p.generation
    );
    println!("  freeze           {}", ms(freeze));
    println!("  commit           {}", ms(commit));
    println!("  exec             {}", ms(r.exec));
    println!("  restore          {}", ms(r.restore));
    println!(
        "  blackout         {} (freeze start to successor serving)",
        ms(r.blackout)
    );
    println!(
        "  excluding exec   {} (freeze + commit + restore)",
        ms(freeze + commit + r.restore)
    );
    println!(
        "  image checks     {} folios, {} tree ranges, kho check {}: {}",
        r.checks.folios,
        r.checks.ranges,
        if r.checks.checker_ran {
            "ran"
        } else {
            "did not run"
        },
        if r.checks.problems.is_empty() {
            format!("clean ({} warnings)", r.checks.warnings.len())
        } else {
            format!("{} problems", r.checks.problems.len())
        }
    );
    for p in &r.checks.problems {
        println!("    problem: {p}");
    }
    for w in &r.checks.warnings {
        println!("    warning: {w}");
    }
    println!(
        "  arena fd         inherited; FD_CLOEXEC {} again in the successor",
        if r.arena_cloexec { "set" } else { "NOT set" }
    );
    println!(
        "  result           {}",
        if r.passed() {
            "PASS: every entry verified"
        } else if !r.consistent {
            "FAIL: count or digest differs from the predecessor"
        } else {
            "FAIL"
        }
    );
}
