//! The fixtures are what the generator writes, and each produces what
//! `fixtures/README.md` promises.

use std::collections::BTreeSet;
use std::process::Command;

use crate::common::{fixtures, kho, EXPECTED};

#[test]
fn regenerating_gives_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_gen-fixtures"))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let mut generated = BTreeSet::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let fresh = std::fs::read(e.path()).unwrap();
        let committed = std::fs::read(fixtures().join(&name))
            .unwrap_or_else(|err| panic!("{name} is generated but not committed: {err}"));
        assert!(
            fresh == committed,
            "{name} differs from the committed fixture: regenerate with \
             `cargo run -p kho-cli --bin gen-fixtures`"
        );
        generated.insert(name);
    }
    let listed: BTreeSet<String> = EXPECTED.iter().map(|(n, _, _)| (*n).to_owned()).collect();
    assert_eq!(generated, listed, "every fixture has an expected outcome");
    let readme = std::fs::read_to_string(fixtures().join("README.md")).unwrap();
    for name in &generated {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README.md lists {name}"
        );
    }
}

#[test]
fn every_fixture_gives_its_exit_code_and_findings() {
    for (name, code, codes) in EXPECTED {
        let out = kho(&["check", name, "--json"]);
        assert_eq!(out.code, *code, "{name}: {}{}", out.stdout, out.stderr);
        if *code == 2 {
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
            continue;
        }
        assert!(out.stderr.is_empty(), "{name}: {}", out.stderr);
        let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        let mut found: Vec<&str> = doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["code"].as_str().unwrap())
            .collect();
        found.sort_unstable();
        assert_eq!(found, *codes, "{name}");
        assert_eq!(doc["clean"], codes.is_empty(), "{name}");
        let human = kho(&["check", name]);
        assert_eq!(human.code, *code, "{name}");
        for c in *codes {
            assert!(human.stdout.contains(c), "{name}: {c} in {}", human.stdout);
        }
    }
}

#[test]
fn parser_errors_name_the_parser_error() {
    for (name, what) in [
        ("header-crc.img", "header crc mismatch at 0x44"),
        ("truncated.img", "truncated at"),
        (
            "unknown-major.img",
            "unsupported major version at 0xc: expected 1, found 2",
        ),
        (
            "unknown-required-section.img",
            "unknown required section kind 0x77",
        ),
        ("section-out-of-bounds.img", "section MEMMAP at entry"),
        ("overlapping-folios.img", "overlaps folio 0x0 of order 1"),
        (
            "unsorted-blocks.img",
            "expected a key above (order 0, base 0x1000)",
        ),
        ("tree-too-deep.img", "deeper than the maximum 16"),
        ("bad-image.arena", "section SCRATCH crc mismatch"),
        ("bad-magic.img", "not a kho image or arena at offset 0x0"),
        ("both-slots-bad.arena", "both superblock slots are bad"),
        ("no-image.arena", "no handover image"),
    ] {
        for cmd in ["check", "inspect", "ranges"] {
            let out = kho(&[cmd, name]);
            assert_eq!(out.code, 2, "{cmd} {name}");
            assert!(out.stderr.contains(what), "{cmd} {name}: {:?}", out.stderr);
            // A message that embeds its cause does not repeat it.
            assert_eq!(out.stderr.matches(what).count(), 1, "{:?}", out.stderr);
        }
    }
}
