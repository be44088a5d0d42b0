//! `kho-tests`: the live-update demo flow as a small binary, for the
//! end-to-end tests in `tests/`. It execs itself to hand over, exactly as
//! `kho demo` does.
//!
//! ```text
//! kho-tests [--entries N] [--value-size B] [--arena PATH] [--exec PROGRAM]
//! ```
//!
//! `--exec` names the successor program instead of this binary (for the
//! failed-`exec` path).
//!
//! The successor prints `entries=<n> verified=<n> bad=<n> digest=<hex>
//! consistent=<bool> checks=<problems> checker=<bool> generation=<n>
//! cloexec=<bool>` and exits 0 only if every entry verified.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use kho_alloc::kv::demo::{self, DemoConfig};

fn usage(msg: &str) -> ExitCode {
    eprintln!("kho-tests: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    if demo::is_successor() {
        return match demo::run_successor() {
            Ok(r) => {
                println!(
                    "entries={} verified={} bad={} digest={:#018x} consistent={} checks={} checker={} generation={} cloexec={}",
                    r.predecessor.entries,
                    r.verified,
                    r.bad,
                    r.predecessor.digest,
                    r.consistent,
                    r.checks.problems.len(),
                    r.checks.checker_ran,
                    r.predecessor.generation,
                    r.arena_cloexec,
                );
                for p in &r.checks.problems {
                    println!("problem: {p}");
                }
                if r.passed() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => usage(&format!("successor: {e}")),
        };
    }
    let mut cfg = DemoConfig {
        entries: 1000,
        value_size: 100,
        arena: None,
    };
    let mut program = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let Some(v) = args.next() else {
            return usage(&format!("{a} needs a value"));
        };
        match a.as_str() {
            "--entries" => match v.parse() {
                Ok(n) => cfg.entries = n,
                Err(_) => return usage(&format!("--entries: not a number: {v:?}")),
            },
            "--value-size" => match v.parse() {
                Ok(n) => cfg.value_size = n,
                Err(_) => return usage(&format!("--value-size: not a number: {v:?}")),
            },
            "--arena" => cfg.arena = Some(PathBuf::from(v)),
            "--exec" => program = Some(PathBuf::from(v)),
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let exe = match program.map_or_else(std::env::current_exe, Ok) {
        Ok(e) => e,
        Err(e) => return usage(&format!("current_exe: {e}")),
    };
    let err = demo::run_predecessor(&cfg, &mut Command::new(exe));
    usage(&format!("predecessor: {err}"))
}
