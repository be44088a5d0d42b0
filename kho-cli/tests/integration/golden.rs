//! Golden outputs: the exact text and JSON of each command on each
//! fixture, under `kho-cli/tests/golden/`. Re-bless with `KHO_BLESS=1`.

use std::path::{Path, PathBuf};

use crate::common::{kho, EXPECTED};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compare `actual` with the golden file `name`, or write it when
/// blessing. Returns a description of the mismatch.
fn compare(name: &str, actual: &str) -> Option<String> {
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

fn record(out: &crate::common::Out) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.code, out.stdout, out.stderr
    )
}

#[test]
fn golden_outputs() {
    let mut failures = Vec::new();
    let mut runs: Vec<(String, Vec<&str>)> = Vec::new();
    for (name, _, _) in EXPECTED {
        runs.push((format!("{name}.check.txt"), vec!["check", name]));
        runs.push((format!("{name}.check.json"), vec!["check", name, "--json"]));
    }
    for name in ["clean.arena", "clean.img", "dangling.img"] {
        runs.push((format!("{name}.inspect.txt"), vec!["inspect", name]));
        runs.push((
            format!("{name}.inspect.json"),
            vec!["inspect", name, "--json"],
        ));
        runs.push((format!("{name}.ranges.txt"), vec!["ranges", name]));
    }
    runs.push((
        "clean.arena.ranges-folios.json".into(),
        vec!["ranges", "clean.arena", "--folios", "--json"],
    ));
    for name in ["stale-free-slot.arena", "stale-outside-extent.arena"] {
        runs.push((
            format!("{name}.check-bytes.txt"),
            vec!["check", name, "--show-bytes"],
        ));
    }
    runs.push((
        "diff-clean-kfence-slab.txt".into(),
        vec!["diff", "clean.arena", "kfence-slab.arena"],
    ));
    runs.push((
        "diff-clean-kfence-slab.json".into(),
        vec!["diff", "clean.arena", "kfence-slab.arena", "--json"],
    ));
    runs.push((
        "diff-clean-dangling.txt".into(),
        vec!["diff", "clean.img", "dangling.img"],
    ));
    for (file, args) in &runs {
        let out = kho(args);
        if let Some(f) = compare(file, &record(&out)) {
            failures.push(f);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
