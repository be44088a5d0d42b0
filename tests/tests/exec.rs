//! End to end across a real `exec`: the predecessor fills a key-value store,
//! hands its arena over by exec'ing itself, and the successor restores it
//! and verifies every entry against the predecessor's checksums and the
//! deterministic values.

use std::process::Command;

use kho_alloc::kv::demo::fill_value;
use kho_alloc::kv::{KvConfig, KvStore};
use kho_alloc::session::{Session, Start};
use kho_alloc::{Arena, ArenaConfig, Heap};

const BIN: &str = env!("CARGO_BIN_EXE_kho-tests");

fn field<'a>(out: &'a str, name: &str) -> &'a str {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {name}= in {out:?}"))
}

/// The digest a store of `n` deterministic values has, computed here
/// independently of the processes under test.
fn expected_digest(n: u64, value_size: u32) -> u64 {
    let heap = Heap::new(Arena::anonymous(&ArenaConfig::with_size(256 << 20)).unwrap()).unwrap();
    let mut kv = KvStore::new(
        &heap,
        KvConfig {
            capacity: n,
            value_size,
        },
    )
    .unwrap();
    let mut v = vec![0u8; value_size as usize];
    for k in 0..n {
        fill_value(k, &mut v);
        kv.insert(k, &v).unwrap();
    }
    kv.digest()
}

#[test]
fn demo_hands_over_across_exec() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.arena");
    let out = Command::new(BIN)
        .args(["--entries", "3000", "--value-size", "100", "--arena"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status {:?}\nstdout {stdout}\nstderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&stdout, "entries"), "3000");
    assert_eq!(field(&stdout, "verified"), "3000");
    assert_eq!(field(&stdout, "bad"), "0");
    assert_eq!(field(&stdout, "consistent"), "true");
    assert_eq!(field(&stdout, "checks"), "0");
    assert_eq!(field(&stdout, "checker"), "true");
    assert_eq!(field(&stdout, "generation"), "2");
    assert_eq!(field(&stdout, "cloexec"), "true");
    assert_eq!(
        field(&stdout, "digest"),
        format!("{:#018x}", expected_digest(3000, 100))
    );

    // The kept arena records that its image was restored: a second
    // successor finds no handover and starts cold.
    let arena = Arena::open(&path).unwrap();
    assert!(arena.image_restored());
    let (_, start) = Session::start(arena).unwrap();
    assert!(matches!(start, Start::Cold { .. }), "{start:?}");

    // The kept arena is never overwritten by another demo.
    let before = std::fs::read(&path).unwrap();
    let out = Command::new(BIN)
        .args(["--entries", "10", "--arena"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn demo_on_a_memfd_sees_identical_data() {
    let out = Command::new(BIN)
        .args(["--entries", "20000", "--value-size", "100"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&stdout, "verified"), "20000");
    assert_eq!(field(&stdout, "cloexec"), "true");
    assert_eq!(
        field(&stdout, "digest"),
        format!("{:#018x}", expected_digest(20000, 100))
    );
}

#[test]
fn demo_with_odd_value_size_and_temp_arena() {
    let out = Command::new(BIN)
        .args(["--entries", "517", "--value-size", "13"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&stdout, "verified"), "517");
    assert_eq!(
        field(&stdout, "digest"),
        format!("{:#018x}", expected_digest(517, 13))
    );
}

#[test]
fn bad_arguments_exit_2() {
    let out = Command::new(BIN).args(["--entries", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    // A successor without an inherited arena is refused, not a panic.
    let out = Command::new(BIN)
        .env("KHO_DEMO_STATE", "1,2,3,4,5,6,7,8,9,10")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN)
        .env("KHO_DEMO_STATE", "1,2,3,4,5,6,7,8,9,10")
        .env("KHO_ARENA_FD", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_failed_exec_aborts_the_handover() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kv.arena");
    let out = Command::new(BIN)
        .args(["--entries", "100", "--exec"])
        .arg(dir.path().join("no-such-successor"))
        .arg("--arena")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exec of the successor failed"), "{err}");
    // Committed at generation 2, withdrawn at 3: nothing to restore.
    let arena = Arena::open(&path).unwrap();
    assert_eq!(arena.generation(), 3);
    assert_eq!(arena.current_image(), None);
    let (_, start) = Session::start(arena).unwrap();
    assert!(matches!(start, Start::Cold { .. }), "{start:?}");
}
