//! Colour and the progress bar appear on a terminal only. The terminal is
//! a pseudo-terminal from script(1) (util-linux); without it these tests
//! say so and check only the non-terminal half.

use std::path::Path;
use std::process::Command;

use crate::common::{fixtures, kho, kho_in};

/// Run `kho args` in `dir` with stdin, stdout and stderr on a
/// pseudo-terminal; its exit code and everything it wrote. `None` when
/// script(1) is not installed.
fn on_a_terminal(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Option<(i32, String)> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = quote(env!("CARGO_BIN_EXE_kho"));
    for a in args {
        line.push(' ');
        line.push_str(&quote(a));
    }
    let mut cmd = Command::new("script");
    cmd.args(["-q", "-e", "-c", &line, "/dev/null"])
        .current_dir(dir)
        .env_remove("NO_COLOR")
        .env("TERM", "xterm");
    for (k, v) in env {
        cmd.env(k, v);
    }
    match cmd.output() {
        Ok(out) => Some((
            out.status.code().expect("exit code"),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("script(1) is not installed: the terminal half is not checked");
            None
        }
        Err(e) => panic!("script: {e}"),
    }
}

const RED: &str = "\x1b[31;1m";

#[test]
fn colour_only_on_a_terminal() {
    let plain = kho(&["check", "stale-free-slot.arena"]);
    assert_eq!(plain.code, 1);
    assert!(!plain.stdout.contains('\x1b'), "{:?}", plain.stdout);
    let Some((code, out)) = on_a_terminal(&fixtures(), &["check", "stale-free-slot.arena"], &[])
    else {
        return;
    };
    assert_eq!(code, 1);
    assert!(out.contains(&format!("{RED}1 finding(s)")), "{out:?}");
    let (_, out) = on_a_terminal(
        &fixtures(),
        &["check", "stale-free-slot.arena"],
        &[("NO_COLOR", "1")],
    )
    .expect("script ran before");
    assert!(!out.contains('\x1b'), "NO_COLOR: {out:?}");
}

#[test]
fn progress_bar_only_on_a_terminal_for_a_big_check() {
    // 300 MiB of order-9 folios in a sparse 1 GiB arena: above the
    // 256 MiB threshold.
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_gen-fixtures"))
        .args(["--bench-arena", "big.arena", "1", "300M"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let plain = kho_in(dir.path(), &["check", "big.arena"]);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    assert!(
        plain.stderr.is_empty(),
        "no bar on a pipe: {:?}",
        plain.stderr
    );
    let Some((code, out)) = on_a_terminal(dir.path(), &["check", "big.arena"], &[]) else {
        return;
    };
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("checking"), "{out:?}");
    // A small arena draws none, terminal or not.
    let (_, out) = on_a_terminal(&fixtures(), &["check", "clean.arena"], &[]).expect("script ran");
    assert!(!out.contains("checking"), "{out:?}");
}
