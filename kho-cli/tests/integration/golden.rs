//! Golden outputs: the exact text and JSON of each command on each
//! fixture, and of `kho diff` on pairs, under `kho-cli/tests/golden/`.
//! Re-bless with `KHO_BLESS=1` (which also removes golden files no run
//! produces any more).

use std::collections::BTreeSet;

use crate::common::{compare, fixture_table, golden_dir, kho, kho_in, record};

fn blessing() -> bool {
    std::env::var_os("KHO_BLESS").is_some_and(|v| v == "1")
}

#[test]
fn golden_outputs() {
    let mut failures = Vec::new();
    let mut runs: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |file: String, args: &[&str]| {
        runs.push((file, args.iter().map(|a| (*a).to_owned()).collect()));
    };
    for row in fixture_table() {
        let name = row.file.as_str();
        for cmd in ["check", "inspect", "ranges"] {
            add(format!("{name}.{cmd}.txt"), &[cmd, name]);
            add(format!("{name}.{cmd}.json"), &[cmd, name, "--json"]);
        }
    }
    for name in ["clean.arena", "kfence-slab.arena"] {
        add(
            format!("{name}.ranges-folios.txt"),
            &["ranges", name, "--folios"],
        );
        add(
            format!("{name}.ranges-folios.json"),
            &["ranges", name, "--folios", "--json"],
        );
        add(
            format!("{name}.ranges-order0.txt"),
            &["ranges", name, "--order", "0"],
        );
        add(
            format!("{name}.ranges-order0.json"),
            &["ranges", name, "--order", "0", "--json"],
        );
        add(
            format!("{name}.ranges-order1-folios.txt"),
            &["ranges", name, "--order", "1", "--folios"],
        );
    }
    for name in [
        "stale-free-slot.arena",
        "stale-slab-tail.arena",
        "stale-outside-extent.arena",
        "stale-image-folio.arena",
    ] {
        add(
            format!("{name}.check-bytes.txt"),
            &["check", name, "--show-bytes"],
        );
        add(
            format!("{name}.check-bytes.json"),
            &["check", name, "--show-bytes", "--json"],
        );
    }
    for (name, a, b) in crate::diff::FIXTURE_PAIRS {
        add(format!("diff-{name}.txt"), &["diff", a, b]);
        add(format!("diff-{name}.json"), &["diff", a, b, "--json"]);
    }
    let mut produced = BTreeSet::new();
    for (file, args) in &runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Some(f) = compare(file, &record(&kho(&args))) {
            failures.push(f);
        }
        produced.insert(file.clone());
    }
    // Each edit of the clean image against it, run where they are written.
    let dir = tempfile::tempdir().unwrap();
    for name in crate::diff::write_cases(dir.path()) {
        let b = format!("{name}.img");
        for (suffix, json) in [("txt", false), ("json", true)] {
            let mut args = vec!["diff", "clean.img", b.as_str()];
            if json {
                args.push("--json");
            }
            let file = format!("diff-edit-{name}.{suffix}");
            if let Some(f) = compare(&file, &record(&kho_in(dir.path(), &args))) {
                failures.push(f);
            }
            produced.insert(file);
        }
    }
    // A golden file no run produces is stale.
    for e in std::fs::read_dir(golden_dir()).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if !produced.contains(&name) {
            if blessing() {
                std::fs::remove_file(golden_dir().join(&name)).unwrap();
            } else {
                failures.push(format!("{name}: no run produces this golden file"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
