//! Behaviour of the subcommands beyond `check`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;

use crate::common::{fixtures, kho, kho_in};

#[test]
fn extract_writes_the_current_image() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.img");
    let r = kho(&["extract", "clean.arena", "-o", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let extracted = std::fs::read(&out).unwrap();
    assert_eq!(
        extracted,
        std::fs::read(fixtures().join("clean.img")).unwrap()
    );
    // Nothing but the image is left in the directory.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A slot CRC that does not match the image refuses to extract, and
    // leaves the previous output as it was.
    let r = kho(&["extract", "image-crc.arena", "-o", out.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("crc32"), "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), extracted);
    let r = kho(&["extract", "clean.img", "-o", out.to_str().unwrap()]);
    assert_eq!(r.code, 2);
}

#[test]
fn extract_to_stdout() {
    let out = Command::new(env!("CARGO_BIN_EXE_kho"))
        .args(["extract", "clean.arena", "-o", "-"])
        .current_dir(fixtures())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        out.stdout,
        std::fs::read(fixtures().join("clean.img")).unwrap()
    );
}

/// A copy of clean.arena in a fresh directory.
fn arena_copy() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.arena");
    let bytes = std::fs::read(fixtures().join("clean.arena")).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    (dir, path, bytes)
}

#[test]
fn extract_never_writes_its_input() {
    let (dir, arena, bytes) = arena_copy();
    let link = dir.path().join("hard-link");
    std::fs::hard_link(&arena, &link).unwrap();
    let a = arena.to_str().unwrap();
    for target in [a, link.to_str().unwrap()] {
        let r = kho_in(dir.path(), &["extract", a, "-o", target]);
        assert_eq!(r.code, 2, "{target}: {}", r.stderr);
        assert!(r.stderr.contains("refusing"), "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1);
    }
    // The arena as standard input, named as /dev/stdin.
    let out = Command::new(env!("CARGO_BIN_EXE_kho"))
        .args(["extract", a, "-o", "/dev/stdin"])
        .stdin(std::fs::File::open(&arena).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Standard output appending to the arena.
    let append = std::fs::OpenOptions::new()
        .append(true)
        .open(&arena)
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kho"))
        .args(["extract", a, "-o", "-"])
        .stdout(append)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("stdout: is the arena"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&arena).unwrap(), bytes, "the arena is intact");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn extract_replaces_a_file_atomically() {
    let (dir, arena, _) = arena_copy();
    let a = arena.to_str().unwrap();
    let image = std::fs::read(fixtures().join("clean.img")).unwrap();
    // An existing file is replaced and keeps its mode.
    let out = dir.path().join("old.img");
    std::fs::write(&out, b"previous contents").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
    let r = kho_in(dir.path(), &["extract", a, "-o", "old.img"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), image);
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    // Through a symlink: the link stays, its target is replaced.
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink("old.img", &link).unwrap();
    std::fs::write(&out, b"again").unwrap();
    let r = kho_in(dir.path(), &["extract", a, "-o", "link.img"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&out).unwrap(), image);
    // No temporary file is left behind: arena, old.img, link.img.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    // A device is written in place.
    assert_eq!(
        kho_in(dir.path(), &["extract", a, "-o", "/dev/null"]).code,
        0
    );
    // A directory, or a file in a missing one: an error, nothing created.
    let r = kho_in(dir.path(), &["extract", a, "-o", "."]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("is a directory"), "{}", r.stderr);
    let r = kho_in(dir.path(), &["extract", a, "-o", "missing/x.img"]);
    assert_eq!(r.code, 2);
    assert!(!dir.path().join("missing").exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn diff_exit_codes() {
    // An arena and its own extracted image describe the same handover.
    assert_eq!(kho(&["diff", "clean.arena", "clean.img"]).code, 0);
    let r = kho(&["diff", "clean.arena", "dangling-range.arena", "--json"]);
    assert_eq!(r.code, 1);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["same"], false);
    assert_eq!(doc["tree"][0]["change"], "prop-added");
    let r = kho(&["diff", "clean.arena", "kfence-slab.arena", "--json"]);
    assert_eq!(r.code, 1);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["preserved"][0]["added"]["folios"], 1);
    let r = kho(&["diff", "clean.arena", "missing.arena"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.starts_with("kho: missing.arena: open: "),
        "{}",
        r.stderr
    );
}

#[test]
fn ranges_by_order_and_folios() {
    let r = kho(&[
        "ranges",
        "clean.arena",
        "--folios",
        "--order",
        "1",
        "--json",
    ]);
    assert_eq!(r.code, 0);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["folios"].as_array().unwrap().len(), 1);
    assert_eq!(doc["folios"][0]["order"], 1);
    let r = kho(&["ranges", "clean.arena", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    // Two adjacent slab pages coalesce; the order-1 folio and the image's
    // own folio (page 40) stand apart.
    let ranges = doc["ranges"].as_array().unwrap();
    assert_eq!(ranges.len(), 3);
    assert_eq!(ranges[2]["start"], 40 * 4096);
    assert_eq!(kho(&["ranges", "clean.arena", "--order", "19"]).code, 2);
}

#[test]
fn usage_help_and_show_bytes() {
    let r = kho(&["--help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Examples:"), "{}", r.stdout);
    let r = kho(&["check", "--help"]);
    assert!(r.stdout.contains("--show-bytes"));
    let r = kho(&["demo", "--help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Examples:\n  kho demo"), "{}", r.stdout);
    for args in [
        &["frobnicate"][..],
        &["check"],
        &[],
        &["check", "--bogus", "x"],
    ] {
        let r = kho(args);
        assert_eq!(r.code, 2, "{args:?}");
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {:?}", r.stderr);
        assert!(r.stderr.starts_with("kho: usage: "), "{:?}", r.stderr);
    }
    // Stale bytes appear only when asked for.
    let quiet = kho(&["check", "stale-free-slot.arena"]);
    assert!(!quiet.stdout.contains("secret-token"), "{}", quiet.stdout);
    let loud = kho(&["check", "stale-free-slot.arena", "--show-bytes"]);
    assert!(
        loud.stdout.contains("|secret-token-42.|"),
        "{}",
        loud.stdout
    );
    let json = kho(&["check", "stale-free-slot.arena", "--show-bytes", "--json"]);
    let doc: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let hex = doc["findings"][0]["sample"]["hex"].as_str().unwrap();
    assert_eq!(hex.len(), 128, "64 bytes at most");
}

#[test]
fn inspect_computes_crc_status() {
    // The slot's image CRC against the image bytes.
    let r = kho(&["inspect", "image-crc.arena"]);
    assert_eq!(r.code, 0);
    assert!(
        r.stdout
            .contains("crc32 0x212ba6fc BAD: the image bytes have 0x7b71fca6"),
        "{}",
        r.stdout
    );
    let doc: serde_json::Value =
        serde_json::from_str(&kho(&["inspect", "image-crc.arena", "--json"]).stdout).unwrap();
    assert_eq!(doc["arena"]["image"]["crc_ok"], false);
    assert_eq!(doc["arena"]["image"]["computed_crc32"], 0x7b71_fca6);
    let doc: serde_json::Value =
        serde_json::from_str(&kho(&["inspect", "clean.arena", "--json"]).stdout).unwrap();
    assert_eq!(doc["valid"], true);
    assert_eq!(doc["arena"]["image"]["crc_ok"], true);
    for s in doc["image"]["sections"].as_array().unwrap() {
        assert_eq!(s["crc_ok"], true);
        assert_eq!(s["computed_crc32"], s["crc32"]);
    }
}

#[test]
fn inspect_shows_what_it_can_of_an_invalid_input() {
    // The broken section is named, the others are ok; then the error.
    let r = kho(&["inspect", "bad-image.arena"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stdout
            .contains("SCRATCH  required   0x518     16 B  0x12345678  BAD (computed 0xabc34c57)"),
        "{}",
        r.stdout
    );
    assert_eq!(r.stdout.matches("  ok\n").count(), 5, "{}", r.stdout);
    assert!(r.stdout.contains("current"), "the slots are shown");
    assert_eq!(r.stderr.lines().count(), 1);
    assert!(r.stderr.contains("section SCRATCH crc mismatch"));
    let r = kho(&["inspect", "bad-image.arena", "--json"]);
    assert_eq!(r.code, 2);
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["valid"], false);
    assert!(doc["image"].is_null());
    assert!(doc["error"]
        .as_str()
        .unwrap()
        .contains("section SCRATCH crc mismatch"));
    let sections = doc["raw"]["sections"].as_array().unwrap();
    let bad: Vec<_> = sections.iter().filter(|s| s["crc_ok"] == false).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0]["kind"], "SCRATCH");
    assert_eq!(bad[0]["computed_crc32"], 0xabc3_4c57u32);
    assert_eq!(doc["arena"]["current_slot"], 1);
    // A bad header CRC in a bare image.
    let r = kho(&["inspect", "header-crc.img"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stdout
            .contains("header crc32 0xdeadbeef BAD (computed 0x60d995ea)"),
        "{}",
        r.stdout
    );
    // Both slots bad: each with its reason, no regions.
    let r = kho(&["inspect", "both-slots-bad.arena"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.stdout.matches("BAD").count(), 2, "{}", r.stdout);
    assert!(!r.stdout.contains("REGION"), "{}", r.stdout);
    let doc: serde_json::Value =
        serde_json::from_str(&kho(&["inspect", "both-slots-bad.arena", "--json"]).stdout).unwrap();
    assert!(doc["arena"]["current_slot"].is_null());
    assert_eq!(doc["arena"]["slots"][1]["valid"], false);
    assert!(doc["raw"].is_null());
}

#[test]
fn a_directory_or_a_missing_path_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = dir.path().join("x.img");
    let out = out.to_str().unwrap();
    for args in [
        vec!["check", d],
        vec!["inspect", d],
        vec!["ranges", d],
        vec!["diff", "clean.arena", d],
        vec!["extract", d, "-o", out],
    ] {
        let r = kho(&args);
        assert_eq!(r.code, 2, "{args:?}");
        assert_eq!(
            r.stderr,
            format!("kho: {d}: is a directory, expected an arena or image file\n"),
            "{args:?}"
        );
        assert!(r.stdout.is_empty());
    }
    let r = kho(&["check", "missing.arena"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.starts_with("kho: missing.arena: open: "),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.lines().count(), 1);
}
