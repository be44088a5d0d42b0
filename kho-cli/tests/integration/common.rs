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
