//! Replays fuzz inputs of the kho-alloc targets (`arena_open`, `check`)
//! through the targets' own code, compiled in with `#[path]` from
//! `fuzz/src/`: every file under
//! `kho-core/tests/fuzz_regressions/<target>/` and every seed under
//! `fuzz/seeds/<target>/`.

use std::fs;
use std::path::{Path, PathBuf};

#[path = "../../../../fuzz/src/arena.rs"]
mod arena;
#[path = "../../../../fuzz/src/check.rs"]
mod check;
// `arena` walks the images it finds with `image::walk`; the rest of the
// module serves kho-core's replay.
#[path = "../../../../fuzz/src/image.rs"]
#[allow(dead_code)]
mod image;

fn inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
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

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut all = inputs(&root.join("kho-core/tests/fuzz_regressions").join(target));
    all.extend(inputs(&root.join("fuzz/seeds").join(target)));
    assert!(!all.is_empty(), "no inputs for {target}");
    for (path, bytes) in all {
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{target}: {} fails", path.display());
    }
}

#[test]
#[cfg_attr(miri, ignore = "reads the corpus directories")]
fn arena_open_inputs() {
    replay("arena_open", arena::run);
}

#[test]
#[cfg_attr(miri, ignore = "reads the corpus directories")]
fn check_inputs() {
    replay("check", check::run);
}
