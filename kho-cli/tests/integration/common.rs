//! Running the built binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `fixtures/` at the workspace root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// What one run printed and returned.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Run `kho args...` with the fixtures directory as working directory, so
/// paths in the output are bare file names.
pub fn kho(args: &[&str]) -> Out {
    kho_in(&fixtures(), args)
}

/// Run `kho args...` in `dir`.
pub fn kho_in(dir: &Path, args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_kho"))
        .args(args)
        .current_dir(dir)
        .env_remove("NO_COLOR")
        .output()
        .expect("run kho");
    Out {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

/// `kho-cli/tests/golden/`.
pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compare `actual` with the golden file `name`, or write it when
/// blessing. Returns a description of the mismatch.
pub fn compare(name: &str, actual: &str) -> Option<String> {
    let path = golden_dir().join(name);
    if std::env::var_os("KHO_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return None;
    }
    match std::fs::read_to_string(&path) {
        Ok(expected) if expected == actual => None,
        Ok(expected) => Some(format!(
            "{name}: output differs from the golden file\n--- expected\n{expected}\n--- actual\n{actual}"
        )),
        Err(e) => Some(format!("{name}: no golden file ({e}); run with KHO_BLESS=1")),
    }
}

pub fn record(out: &Out) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.code, out.stdout, out.stderr
    )
}

/// Every expected outcome of `kho check`: file, exit code, finding codes
/// (sorted), as `fixtures/README.md` lists them.
pub const EXPECTED: &[(&str, i32, &[&str])] = &[
    ("clean.arena", 0, &[]),
    ("clean.img", 0, &[]),
    ("stale-free-slot.arena", 1, &["KHO-S001"]),
    ("stale-slab-tail.arena", 1, &["KHO-S002"]),
    ("stale-outside-extent.arena", 1, &["KHO-S003"]),
    ("preserved-in-scratch.arena", 1, &["KHO-P001", "KHO-P002"]),
    (
        "kfence-in-scratch.arena",
        1,
        &["KHO-K001", "KHO-K004", "KHO-P002"],
    ),
    ("kfence-preserved.arena", 1, &["KHO-K002"]),
    ("kfence-slab.arena", 1, &["KHO-K003"]),
    ("dangling-range.arena", 1, &["KHO-T001"]),
    ("range-outside-arena.arena", 1, &["KHO-T002"]),
    ("image-not-preserved.arena", 1, &["KHO-I001"]),
    ("image-outside-general.arena", 1, &["KHO-I002"]),
    ("image-wrong-arena.arena", 1, &["KHO-I003"]),
    ("bad-slot.arena", 1, &["KHO-B001"]),
    ("same-generation.arena", 1, &["KHO-B002"]),
    ("image-crc.arena", 1, &["KHO-B003"]),
    ("dangling.img", 1, &["KHO-T001", "KHO-T002"]),
    ("both-slots-bad.arena", 2, &[]),
    ("no-image.arena", 2, &[]),
    ("bad-image.arena", 2, &[]),
    ("bad-magic.img", 2, &[]),
    ("header-crc.img", 2, &[]),
    ("truncated.img", 2, &[]),
    ("unknown-major.img", 2, &[]),
    ("unknown-required-section.img", 2, &[]),
    ("section-out-of-bounds.img", 2, &[]),
    ("overlapping-folios.img", 2, &[]),
    ("unsorted-blocks.img", 2, &[]),
    ("tree-too-deep.img", 2, &[]),
];
