//! Replays fuzz inputs through the fuzz targets' own code.
//!
//! The target bodies live in `fuzz/src/` and are compiled in here with
//! `#[path]`, so a committed input runs exactly the code that found it.
//! Every file under `tests/fuzz_regressions/<target>/` (inputs that once
//! crashed, hung or ran out of memory) and every seed under
//! `fuzz/seeds/<target>/` is replayed. The kho-alloc targets (`arena_open`,
//! `check`) are replayed by kho-alloc's integration tests.

use std::fs;
use std::path::{Path, PathBuf};

#[path = "../../../fuzz/src/image.rs"]
mod image;
#[path = "../../../fuzz/src/roundtrip.rs"]
mod roundtrip;
#[path = "../../../fuzz/src/tree.rs"]
mod tree;

/// Every cargo-fuzz target of `fuzz/`.
const TARGETS: [&str; 5] = [
    "image_parse",
    "tree_decode",
    "arena_open",
    "roundtrip",
    "check",
];

/// Every file of `dir`, sorted; a missing directory is empty (a target
/// with no regression yet).
pub fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, bytes)
        })
        .collect()
}

/// The subdirectories of `dir`, by name.
fn subdirs(dir: &Path) -> Vec<String> {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Regression inputs and seeds of `target`.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = inputs(&root.join("tests/fuzz_regressions").join(target));
    all.extend(inputs(&root.join("../fuzz/seeds").join(target)));
    all
}

fn replay(target: &str, run: fn(&[u8])) {
    let all = corpus(target);
    assert!(!all.is_empty(), "no inputs for {target}");
    for (path, bytes) in all {
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{target}: {} fails", path.display());
    }
}

#[test]
fn image_parse_inputs() {
    replay("image_parse", image::run);
}

#[test]
fn tree_decode_inputs() {
    replay("tree_decode", tree::run);
}

#[test]
fn roundtrip_inputs() {
    replay("roundtrip", roundtrip::run);
}

#[test]
fn corpus_directories_name_known_targets() {
    // A misspelled directory would be skipped silently by `inputs`.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in [
        root.join("tests/fuzz_regressions"),
        root.join("../fuzz/seeds"),
    ] {
        for name in subdirs(&dir) {
            assert!(
                TARGETS.contains(&name.as_str()),
                "{}/{name} names no fuzz target (known: {TARGETS:?})",
                dir.display()
            );
        }
    }
    let seeded = subdirs(&root.join("../fuzz/seeds"));
    for t in TARGETS {
        assert!(seeded.iter().any(|s| s == t), "no seeds for {t}");
    }
}

#[test]
fn the_golden_image_walks_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bytes = fs::read(root.join("../fixtures/golden/image-v1.bin")).unwrap();
    let parsed = kho_core::Image::parse(&bytes).unwrap();
    image::walk(&parsed);
}

#[test]
fn crc_fixup_reaches_the_contents() {
    // A changed MEMMAP order field (key bits 8..12) is caught by the section CRC as given,
    // and by the block check once the CRCs are recomputed.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut bytes = fs::read(root.join("../fixtures/golden/image-v1.bin")).unwrap();
    let memmap = kho_core::Image::parse(&bytes)
        .unwrap()
        .section(kho_core::SectionKind::Memmap)
        .unwrap();
    bytes[memmap.offset as usize + 1] = 0xff;
    let err = kho_core::Image::parse(&bytes).unwrap_err();
    assert_eq!(err.kind(), "section-crc");
    assert!(image::fix_crcs(&mut bytes));
    let err = kho_core::Image::parse(&bytes).unwrap_err();
    assert_eq!(err.kind(), "block-order", "{err}");
    image::assert_clean_error(&err, bytes.len());
}
