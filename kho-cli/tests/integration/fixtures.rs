//! The fixtures are what the generator writes, and each produces what the
//! table in `fixtures/README.md` promises.

use std::collections::BTreeSet;
use std::process::Command;

use kho_alloc::check::CODES;

use crate::common::{fixture_table, fixtures, kho};

/// Files in a directory, `README.md` and subdirectories aside.
fn files_in(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n != "README.md")
        .collect()
}

#[test]
fn regenerating_gives_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_gen-fixtures"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let generated = files_in(dir.path());
    for name in &generated {
        let fresh = std::fs::read(dir.path().join(name)).unwrap();
        let committed = std::fs::read(fixtures().join(name))
            .unwrap_or_else(|err| panic!("{name} is generated but not committed: {err}"));
        assert!(
            fresh == committed,
            "{name} differs from the committed fixture: regenerate with \
             `cargo run -p kho-cli --bin gen-fixtures`"
        );
    }
    // Nothing committed that the generator does not write.
    assert_eq!(files_in(&fixtures()), generated);
}

#[test]
fn readme_table_matches_the_fixtures() {
    let table = fixture_table();
    let listed: BTreeSet<String> = table.iter().map(|r| r.file.clone()).collect();
    assert_eq!(listed.len(), table.len(), "a file listed twice");
    assert_eq!(
        listed,
        files_in(&fixtures()),
        "README.md lists every fixture"
    );
    for row in &table {
        let name = row.file.as_str();
        let out = kho(&["check", name, "--json"]);
        assert_eq!(out.code, row.exit, "{name}: {}{}", out.stdout, out.stderr);
        if row.exit == 2 {
            assert!(!row.error.is_empty(), "{name}: the table quotes the error");
            assert!(out.stdout.is_empty(), "{name}: stdout {:?}", out.stdout);
            assert_eq!(
                out.stderr.lines().count(),
                1,
                "{name}: one line: {:?}",
                out.stderr
            );
            assert!(
                out.stderr.starts_with(&format!("kho: {name}: ")),
                "{name}: {:?}",
                out.stderr
            );
            for fragment in &row.error {
                assert!(
                    out.stderr.contains(fragment.as_str()),
                    "{name}: {fragment:?} in {:?}",
                    out.stderr
                );
            }
            continue;
        }
        assert_eq!(row.exit == 0, row.codes.is_empty(), "{name}");
        assert!(out.stderr.is_empty(), "{name}: {}", out.stderr);
        let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let mut found: Vec<&str> = doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["code"].as_str().unwrap())
            .collect();
        found.sort_unstable();
        assert_eq!(found, row.codes, "{name}");
        assert_eq!(doc["clean"], row.codes.is_empty(), "{name}");
        let human = kho(&["check", name]);
        assert_eq!(human.code, row.exit, "{name}");
        for c in &row.codes {
            assert!(
                human.stdout.contains(c.as_str()),
                "{name}: {c} in {}",
                human.stdout
            );
        }
    }
}

#[test]
fn every_finding_code_has_a_fixture_of_its_own() {
    let table = fixture_table();
    for c in CODES {
        // Preserved memory in the arena's scratch (P001), or a KFENCE pool
        // on scratch (K001), gets past the parser only behind SCRATCH or
        // KFENCE sections that differ from the arena's regions (P002,
        // K004): those two never come alone.
        let alone = !matches!(c.code, "KHO-P001" | "KHO-K001");
        assert!(
            table.iter().any(|r| if alone {
                r.codes == [c.code]
            } else {
                r.codes.iter().any(|x| x == c.code)
            }),
            "no fixture draws {}{}",
            c.code,
            if alone { " alone" } else { "" }
        );
    }
}

#[test]
fn errors_are_the_same_for_every_command() {
    for row in fixture_table().iter().filter(|r| r.exit == 2) {
        let name = row.file.as_str();
        for cmd in ["check", "inspect", "ranges"] {
            let out = kho(&[cmd, name]);
            assert_eq!(out.code, 2, "{cmd} {name}");
            assert_eq!(
                out.stderr.lines().count(),
                1,
                "{cmd} {name}: {:?}",
                out.stderr
            );
            for fragment in &row.error {
                // A message that embeds its cause does not repeat it.
                assert_eq!(
                    out.stderr.matches(fragment.as_str()).count(),
                    1,
                    "{cmd} {name}: {fragment:?} in {:?}",
                    out.stderr
                );
            }
        }
    }
}
