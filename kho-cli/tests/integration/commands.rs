//! Behaviour of the subcommands beyond `check`.

use crate::common::{fixtures, kho};

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
    // A slot CRC that does not match the image refuses to extract.
    let r = kho(&["extract", "image-crc.arena", "-o", out.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("crc32"), "{}", r.stderr);
    let r = kho(&["extract", "clean.img", "-o", out.to_str().unwrap()]);
    assert_eq!(r.code, 2);
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
    assert_eq!(kho(&["frobnicate"]).code, 2);
    assert_eq!(kho(&["check"]).code, 2);
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
