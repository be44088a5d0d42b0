//! The arena file lock across processes: a second process cannot open an
//! arena another one holds, and a successor given the inherited
//! descriptor takes over the predecessor's lock.

use std::process::Command;

use kho_alloc::session::{inherited_arena, ARENA_FD_ENV};
use kho_alloc::{Arena, ArenaConfig, Error};

const ROLE: &str = "KHO_LOCK_TEST_ROLE";
const PATH: &str = "KHO_LOCK_TEST_ARENA";

fn cfg() -> ArenaConfig {
    ArenaConfig::with_size(4 << 20)
}

/// Run test `name` of this binary as a child with `env`; its stdout.
fn run_child(name: &str, env: &[(&str, String)]) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn assert_busy_elsewhere(r: kho_alloc::Result<Arena>) {
    match r {
        Err(Error::Busy { holder, .. }) => assert!(holder.starts_with("locked by"), "{holder}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn another_process_finds_the_arena_busy() {
    if std::env::var(ROLE).as_deref() == Ok("busy") {
        let path = std::env::var(PATH).unwrap();
        assert_busy_elsewhere(Arena::open(&path));
        assert_busy_elsewhere(Arena::open_readonly(&path));
        assert_busy_elsewhere(Arena::create_file(&path, &cfg()));
        println!("child found the arena busy");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arena");
    let a = Arena::create_file(&path, &cfg()).unwrap();
    a.publish(None).unwrap();
    let before = std::fs::read(&path).unwrap();
    let out = run_child(
        "arena_lock::another_process_finds_the_arena_busy",
        &[(ROLE, "busy".into()), (PATH, path.display().to_string())],
    );
    assert!(out.contains("child found the arena busy"), "{out}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    drop(a);
    assert_eq!(Arena::open(&path).unwrap().generation(), 2);
}

#[test]
fn the_inherited_descriptor_carries_the_lock() {
    if std::env::var(ROLE).as_deref() == Ok("successor") {
        let fd = std::env::var(ARENA_FD_ENV).unwrap();
        // Mapping the memfd anew by path is excluded by the lock the
        // predecessor's descriptor holds...
        assert_busy_elsewhere(Arena::open(format!("/proc/self/fd/{fd}")));
        // ...which the inherited descriptor itself shares.
        let arena = inherited_arena().unwrap().unwrap();
        assert_eq!(arena.generation(), 2);
        assert_eq!(arena.publish(None).unwrap(), 3);
        println!("successor published generation 3");
        return;
    }
    let a = Arena::create_memfd("kho-lock-test", &cfg()).unwrap();
    assert_eq!(a.publish(None).unwrap(), 2);
    let fd = a.inheritable_fd().unwrap();
    // The predecessor has handed over: it leaves its arena alone while the
    // successor runs (as if it had exec'd).
    let out = run_child(
        "arena_lock::the_inherited_descriptor_carries_the_lock",
        &[(ROLE, "successor".into()), (ARENA_FD_ENV, fd.to_string())],
    );
    assert!(out.contains("successor published generation 3"), "{out}");
    let keep = a.file().unwrap().try_clone().unwrap();
    drop(a);
    assert_eq!(Arena::open_file(keep).unwrap().generation(), 3);
}
