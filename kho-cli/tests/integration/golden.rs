//! Golden outputs: the exact text and JSON of each command on each
//! fixture, under `kho-cli/tests/golden/`. Re-bless with `KHO_BLESS=1`.

use crate::common::{compare, kho, kho_in, record, EXPECTED};

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
    for (name, a, b) in crate::diff::FIXTURE_PAIRS {
        runs.push((format!("diff-{name}.txt"), vec!["diff", a, b]));
        runs.push((format!("diff-{name}.json"), vec!["diff", a, b, "--json"]));
    }
    for (file, args) in &runs {
        let out = kho(args);
        if let Some(f) = compare(file, &record(&out)) {
            failures.push(f);
        }
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
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
