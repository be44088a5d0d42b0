//! `kho demo` end to end: the real binary hands a small store over by
//! `exec`ing itself, and the successor's report and exit code say so.

use std::process::Command;

use crate::common::Out;

fn demo(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_kho"))
        .arg("demo")
        .args(args)
        .output()
        .expect("run kho demo");
    Out {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// The value of report line `name` (the text after the padded label).
fn line<'a>(out: &'a Out, name: &str) -> &'a str {
    out.stdout
        .lines()
        .find_map(|l| {
            let l = l.trim_start();
            l.strip_prefix(name)
                .filter(|rest| rest.starts_with(' '))
                .map(str::trim)
        })
        .unwrap_or_else(|| panic!("no {name:?} line in\n{}", out.stdout))
}

fn millis(value: &str) -> f64 {
    let ms = value.split_whitespace().next().expect("a figure");
    ms.parse()
        .unwrap_or_else(|_| panic!("not a figure: {value:?}"))
}

#[test]
fn demo_hands_over_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let arena = dir.path().join("kv.arena");
    let arena_arg = arena.to_str().unwrap();
    let out = demo(&[
        "--entries",
        "2500",
        "--value-size",
        "48",
        "--arena",
        arena_arg,
    ]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    assert_eq!(
        line(&out, "entries"),
        "2500 x 48 B values (2500 verified, 0 bad)"
    );
    assert!(line(&out, "image").ends_with("generation 2"));
    for figure in ["freeze", "commit", "exec", "restore", "blackout"] {
        assert!(millis(line(&out, figure)) >= 0.0, "{figure}");
    }
    // Freeze start to the successor serving includes each part.
    assert!(millis(line(&out, "blackout")) >= millis(line(&out, "restore")));
    assert_eq!(
        line(&out, "image checks"),
        "3 folios, 2 tree ranges, kho check ran: clean (0 warnings)"
    );
    assert!(!out.stdout.contains("problem:"), "{}", out.stdout);
    assert!(line(&out, "arena fd").contains("FD_CLOEXEC set again"));
    assert_eq!(line(&out, "result"), "PASS: every entry verified");

    // The kept arena holds the restored handover, and `kho check` agrees.
    let check = Command::new(env!("CARGO_BIN_EXE_kho"))
        .args(["check", arena_arg])
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(0), "{check:?}");

    // A second demo refuses to overwrite it.
    let before = std::fs::read(&arena).unwrap();
    let again = demo(&["--entries", "10", "--arena", arena_arg]);
    assert_eq!(again.code, 2);
    assert!(again.stdout.is_empty());
    assert_eq!(
        again.stderr.trim_end(),
        format!("kho: demo: arena {arena_arg}: the file exists; give a new path")
    );
    assert_eq!(std::fs::read(&arena).unwrap(), before);
}

#[test]
fn demo_on_a_memfd_with_odd_values() {
    let out = demo(&["--entries", "777", "--value-size", "13"]);
    assert_eq!(out.code, 0, "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        line(&out, "entries"),
        "777 x 13 B values (777 verified, 0 bad)"
    );
    assert_eq!(line(&out, "result"), "PASS: every entry verified");
}

#[test]
fn demo_arguments_and_defaults() {
    let bad = demo(&["--entries", "0"]);
    assert_eq!(bad.code, 2);
    assert_eq!(
        bad.stderr.trim_end(),
        "kho: demo: --entries must be at least 1"
    );
    let big = demo(&["--value-size", "2000000"]);
    assert_eq!(big.code, 2);
    assert!(
        big.stderr.contains("exceeds the maximum 1048576"),
        "{}",
        big.stderr
    );
    // The successor role needs its predecessor's state.
    let orphan = demo(&["--successor"]);
    assert_eq!(orphan.code, 2);
    assert!(
        orphan.stderr.contains("KHO_DEMO_STATE"),
        "{}",
        orphan.stderr
    );
    let help = demo(&["--help"]);
    assert_eq!(help.code, 0);
    assert!(
        help.stdout.contains("[default: 1000000]"),
        "{}",
        help.stdout
    );
    assert!(help.stdout.contains("[default: 100]"), "{}", help.stdout);
    assert!(help.stdout.contains("--arena <PATH>"), "{}", help.stdout);
}
