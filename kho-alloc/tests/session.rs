//! Handover sessions: the state machine, cancel, compatibility, crash
//! consistency at every fault point (in child processes that die there),
//! frees from signal handlers, and restart handover.
// Under Miri: memfd, files, signals and child processes are unsupported.
#![cfg(not(miri))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use kho_alloc::epoch::Cleanup;
use kho_alloc::kv::demo::fill_value;
use kho_alloc::kv::{KvConfig, KvHandle, KvStore, KvSubsystem};
use kho_alloc::session::{
    BoxError, Op, PrepareCx, Recovery, RestoreCx, Session, SessionError, Start, State, Subsystem,
};
use kho_alloc::{Arena, ArenaConfig, Heap};
use kho_core::Node;

// ---- a counting allocator: cancel must not allocate -----------------------

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to `System`; the counter is a
// const-initialised thread-local that never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract is `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is `System::dealloc`'s.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: the caller's contract is `System::realloc`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCS.with(Cell::get);
    let r = f();
    (r, ALLOCS.with(Cell::get) - before)
}

// ---- fixtures ---------------------------------------------------------------

const ENTRIES: u64 = 300;
const VALUE: u32 = 40;

fn cfg() -> ArenaConfig {
    ArenaConfig::with_size(32 << 20)
}

fn kv_cfg(n: u64) -> KvConfig {
    KvConfig {
        capacity: n.max(1) * 2,
        value_size: VALUE,
    }
}

/// Callback counters of a [`Probe`].
#[derive(Debug, Default)]
struct Counters {
    prepare: AtomicU32,
    freeze: AtomicU32,
    cancel: AtomicU32,
    cleanup: AtomicU32,
    restore: AtomicU32,
    finish: AtomicU32,
    cold: AtomicU32,
}

/// A subsystem that counts its callbacks, preserves one folio of its own,
/// and queues a cleanup on cancel.
struct Probe {
    name: &'static str,
    compatible: &'static str,
    c: Arc<Counters>,
    fail_prepare: bool,
    cold: bool,
}

impl Probe {
    fn new(name: &'static str, compatible: &'static str) -> (Probe, Arc<Counters>) {
        let c = Arc::new(Counters::default());
        (
            Probe {
                name,
                compatible,
                c: Arc::clone(&c),
                fail_prepare: false,
                cold: false,
            },
            c,
        )
    }
}

impl Subsystem for Probe {
    fn name(&self) -> &str {
        self.name
    }
    fn compatible(&self) -> &str {
        self.compatible
    }
    fn cleanup(&self) -> Option<Cleanup> {
        let c = Arc::clone(&self.c);
        Some(Cleanup::new(move || {
            c.cleanup.fetch_add(1, Ordering::SeqCst);
        }))
    }
    fn prepare(&mut self, cx: &mut PrepareCx<'_>) -> Result<(), BoxError> {
        self.c.prepare.fetch_add(1, Ordering::SeqCst);
        if self.fail_prepare {
            return Err("refused".into());
        }
        let _ = cx;
        Ok(())
    }
    fn freeze(&mut self, node: &mut Node) -> Result<(), BoxError> {
        self.c.freeze.fetch_add(1, Ordering::SeqCst);
        node.set_prop("magic", 0x1234u64);
        Ok(())
    }
    fn cancel(&mut self) {
        self.c.cancel.fetch_add(1, Ordering::SeqCst);
    }
    fn restore(&mut self, _cx: &mut RestoreCx<'_>, node: &Node) -> Result<(), BoxError> {
        self.c.restore.fetch_add(1, Ordering::SeqCst);
        if node.u64_prop("magic")? != 0x1234 {
            return Err("bad magic".into());
        }
        Ok(())
    }
    fn finish(&mut self) {
        self.c.finish.fetch_add(1, Ordering::SeqCst);
    }
    fn on_incompatible(&mut self, _e: &SessionError) -> Recovery {
        if self.cold {
            Recovery::ColdStart
        } else {
            Recovery::Fail
        }
    }
    fn cold_start(&mut self, _heap: &Heap) -> Result<(), BoxError> {
        self.c.cold.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn filled_store(heap: &Heap, n: u64) -> KvHandle {
    let mut kv = KvStore::new(heap, kv_cfg(n)).unwrap();
    let mut v = vec![0u8; VALUE as usize];
    for k in 0..n {
        fill_value(k, &mut v);
        kv.insert(k, &v).unwrap();
    }
    Arc::new(RwLock::new(Some(kv)))
}

fn expected_digest(n: u64) -> u64 {
    let heap = Heap::new(Arena::anonymous(&cfg()).unwrap()).unwrap();
    let h = filled_store(&heap, n);
    let d = h.read().unwrap().as_ref().unwrap().digest();
    d
}

/// A predecessor over a new file arena at `path`: a store of `n` entries
/// and a probe, registered.
fn predecessor(path: &Path, n: u64) -> (Session, KvHandle, Arc<Counters>) {
    let heap = Heap::new(Arena::create_file(path, &cfg()).unwrap()).unwrap();
    let kv = filled_store(&heap, n);
    let mut s = Session::new(&heap);
    s.register(Box::new(KvSubsystem::new("kv", Arc::clone(&kv), kv_cfg(n))))
        .unwrap();
    let (probe, c) = Probe::new("probe", "probe-v1");
    s.register(Box::new(probe)).unwrap();
    (s, kv, c)
}

/// A successor over the arena file at `path`.
fn successor(path: &Path) -> (Session, Start, KvHandle, Arc<Counters>) {
    let (mut s, start) = Session::start(Arena::open(path).unwrap()).unwrap();
    let kv: KvHandle = Arc::new(RwLock::new(None));
    s.register(Box::new(KvSubsystem::new(
        "kv",
        Arc::clone(&kv),
        kv_cfg(ENTRIES),
    )))
    .unwrap();
    let (probe, c) = Probe::new("probe", "probe-v1");
    s.register(Box::new(probe)).unwrap();
    (s, start, kv, c)
}

fn verify(kv: &KvHandle, n: u64) {
    let g = kv.read().unwrap_or_else(PoisonError::into_inner);
    let store = g.as_ref().expect("restored store");
    let mut expect = vec![0u8; VALUE as usize];
    let r = store
        .verify(|k, v| {
            fill_value(k, &mut expect);
            v == expect.as_slice()
        })
        .unwrap();
    assert!(r.consistent, "{r:?}");
    assert_eq!(r.good, n);
    assert_eq!(store.len(), n);
    assert_eq!(store.digest(), expected_digest(n));
}

/// A session in `state`, built in `dir`.
fn session_in(state: State, dir: &Path) -> Session {
    let path = dir.join(format!("{}.arena", state.name()));
    let committed = |path: &Path| {
        let (mut s, _, _) = predecessor(path, ENTRIES);
        s.prepare().unwrap();
        s.freeze_and_commit().unwrap();
    };
    match state {
        State::Normal => predecessor(&path, ENTRIES).0,
        State::Prepared | State::Frozen | State::Committed => {
            let (mut s, _, _) = predecessor(&path, ENTRIES);
            s.prepare().unwrap();
            if state != State::Prepared {
                s.freeze().unwrap();
            }
            if state == State::Committed {
                s.commit().unwrap();
            }
            s
        }
        State::Incoming | State::Restored | State::Finished => {
            committed(&path);
            let (mut s, start, _, _) = successor(&path);
            assert!(matches!(start, Start::Handover { .. }));
            if state != State::Incoming {
                s.restore().unwrap();
            }
            if state == State::Finished {
                s.finish().unwrap();
            }
            s
        }
    }
}

fn apply(s: &mut Session, op: Op) -> Result<(), SessionError> {
    match op {
        Op::Prepare => s.prepare(),
        Op::Freeze => s.freeze(),
        Op::Commit => s.commit().map(drop),
        Op::Cancel => s.cancel(),
        Op::Restore => s.restore().map(drop),
        Op::Finish => s.finish(),
    }
}

// ---- state machine ----------------------------------------------------------

#[test]
fn every_transition_legal_and_illegal() {
    let dir = tempfile::tempdir().unwrap();
    let mut legal = 0;
    for state in State::ALL {
        for op in Op::ALL {
            let mut s = session_in(state, dir.path());
            assert_eq!(s.state(), state);
            let r = apply(&mut s, op);
            match state.after(op) {
                Some(next) => {
                    legal += 1;
                    assert!(r.is_ok(), "{state} --{op}--> {r:?}");
                    assert_eq!(s.state(), next, "{state} --{op}-->");
                }
                None => {
                    match r {
                        Err(SessionError::InvalidTransition { op: o, from }) => {
                            assert_eq!((o, from), (op, state));
                        }
                        other => panic!("{state} --{op}--> expected refusal, got {other:?}"),
                    }
                    assert_eq!(s.state(), state, "a refused {op} changed the state");
                }
            }
            s.barrier();
        }
    }
    // prepare x2, freeze, commit, cancel x2, restore, finish.
    assert_eq!(legal, 8);
}

#[test]
fn full_cycle_and_a_second_handover_from_the_successor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let (mut s, _, c) = predecessor(&path, ENTRIES);
    s.prepare().unwrap();
    let generation = s.freeze_and_commit().unwrap();
    assert_eq!(generation, 2);
    let r = s.freeze_report();
    assert!(r.preserved_bytes > 0 && r.stats.image_len > 0);
    assert_eq!(c.freeze.load(Ordering::SeqCst), 1);
    assert!(s.exec_env().unwrap().1.parse::<i32>().unwrap() > 2);
    drop(s);

    let (mut s, start, kv, c) = successor(&path);
    assert_eq!(start, Start::Handover { generation: 2 });
    let report = s.restore().unwrap().clone();
    assert_eq!(report.restored, ["kv", "probe"]);
    assert!(report.cold_started.is_empty());
    s.finish().unwrap();
    assert_eq!(
        (
            c.restore.load(Ordering::SeqCst),
            c.finish.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    verify(&kv, ENTRIES);
    // Serve, then hand over again.
    {
        let mut g = kv.write().unwrap();
        let store = g.as_mut().unwrap();
        let mut v = vec![0u8; VALUE as usize];
        for k in ENTRIES..ENTRIES + 10 {
            fill_value(k, &mut v);
            store.insert(k, &v).unwrap();
        }
    }
    s.prepare().unwrap();
    let g2 = s.freeze_and_commit().unwrap();
    assert_eq!(g2, 4); // 3 was the restored mark.
    drop(s);
    drop(kv);
    let (mut s, _, kv, _) = successor(&path);
    s.restore().unwrap();
    s.finish().unwrap();
    verify(&kv, ENTRIES + 10);
}

// ---- cancel -----------------------------------------------------------------

#[test]
fn cancel_from_prepared_and_frozen_leaves_nothing() {
    for frozen in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let (mut s, kv, c) = predecessor(&path, ENTRIES);
        let heap = s.heap().unwrap().clone();
        let before = heap.stats();
        let generation = heap.generation();
        s.prepare().unwrap();
        assert!(heap.stats().preserved_folios > 0);
        if frozen {
            s.freeze().unwrap();
            assert!(heap.stats().general.allocated_pages > before.general.allocated_pages);
        }
        // A reader inside a read-side section holds the cleanups back.
        let mut reader = s.domain().register().unwrap();
        let guard = reader.pin();
        let (r, allocs) = allocations(|| s.cancel());
        r.unwrap();
        assert_eq!(allocs, 0, "cancel allocated");
        assert_eq!(s.state(), State::Normal);
        assert_eq!(c.cancel.load(Ordering::SeqCst), 1);
        assert_eq!(s.poll(), 0, "cleanups ran inside a grace period");
        assert_eq!(c.cleanup.load(Ordering::SeqCst), 0);
        drop(guard);
        s.barrier();
        assert_eq!(c.cleanup.load(Ordering::SeqCst), 1);
        assert_eq!(s.cleanup_errors(), 0);
        // Nothing preserved, nothing leaked, nothing published.
        let after = heap.stats();
        assert_eq!(after.preserved_folios, 0);
        assert_eq!(
            after.general.allocated_pages,
            before.general.allocated_pages
        );
        assert_eq!(
            after.preservable.allocated_pages,
            before.preservable.allocated_pages
        );
        assert_eq!(heap.generation(), generation);
        assert_eq!(heap.current_image(), None);
        // The store kept serving; a new handover works.
        verify(&kv, ENTRIES);
        s.prepare().unwrap();
        s.freeze_and_commit().unwrap();
        drop(s);
        drop(kv);
        drop(heap);
        let (mut s, _, kv, _) = successor(&path);
        s.restore().unwrap();
        s.finish().unwrap();
        verify(&kv, ENTRIES);
    }
}

#[test]
fn failing_prepare_cancels_the_subsystems_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _, c) = predecessor(&dir.path().join("a"), 10);
    let (mut bad, cb) = Probe::new("bad", "bad-v1");
    bad.fail_prepare = true;
    s.register(Box::new(bad)).unwrap();
    let heap = s.heap().unwrap().clone();
    match s.prepare() {
        Err(SessionError::Subsystem { subsystem, op, .. }) => {
            assert_eq!((subsystem.as_str(), op), ("bad", Op::Prepare));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.state(), State::Normal);
    assert_eq!(c.cancel.load(Ordering::SeqCst), 1);
    // The failing one was never prepared, so it is not cancelled.
    assert_eq!(cb.cancel.load(Ordering::SeqCst), 0);
    assert_eq!(heap.stats().preserved_folios, 0);
    assert!(matches!(
        s.register(Box::new(Probe::new("bad", "x").0)),
        Err(SessionError::DuplicateSubsystem { .. })
    ));
}

// ---- compatibility ----------------------------------------------------------

#[test]
fn incompatible_missing_and_unclaimed_nodes_are_errors_or_cold_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let commit = |path: &Path| {
        let (mut s, _, _) = predecessor(path, 20);
        s.prepare().unwrap();
        s.freeze_and_commit().unwrap();
    };
    let kv_sub = |kv: &KvHandle| Box::new(KvSubsystem::new("kv", Arc::clone(kv), kv_cfg(20)));

    // A newer probe: compatible differs.
    commit(&path);
    let (mut s, _) = Session::start(Arena::open(&path).unwrap()).unwrap();
    let kv: KvHandle = Arc::new(RwLock::new(None));
    s.register(kv_sub(&kv)).unwrap();
    s.register(Box::new(Probe::new("probe", "probe-v2").0))
        .unwrap();
    match s.restore() {
        Err(SessionError::Incompatible {
            subsystem,
            expected,
            found,
        }) => {
            assert_eq!(
                (subsystem.as_str(), expected.as_str(), found.as_str()),
                ("probe", "probe-v2", "probe-v1")
            );
        }
        other => panic!("{other:?}"),
    }

    // The same, choosing a cold start.
    drop((s, kv));
    commit(&path);
    let (mut s, _) = Session::start(Arena::open(&path).unwrap()).unwrap();
    let kv: KvHandle = Arc::new(RwLock::new(None));
    s.register(kv_sub(&kv)).unwrap();
    let (mut p, c) = Probe::new("probe", "probe-v2");
    p.cold = true;
    s.register(Box::new(p)).unwrap();
    let r = s.restore().unwrap().clone();
    assert_eq!(r.restored, ["kv"]);
    assert_eq!(r.cold_started.len(), 1);
    assert!(r.cold_started[0]
        .1
        .contains("expected \"probe-v2\", found \"probe-v1\""));
    assert_eq!(c.cold.load(Ordering::SeqCst), 1);
    s.finish().unwrap();
    verify(&kv, 20);

    // A subsystem the predecessor did not have: its node is missing.
    drop((s, kv));
    commit(&path);
    let (mut s, _) = Session::start(Arena::open(&path).unwrap()).unwrap();
    let kv: KvHandle = Arc::new(RwLock::new(None));
    s.register(kv_sub(&kv)).unwrap();
    s.register(Box::new(Probe::new("probe", "probe-v1").0))
        .unwrap();
    s.register(Box::new(Probe::new("extra", "extra-v1").0))
        .unwrap();
    assert!(matches!(
        s.restore(),
        Err(SessionError::Incompatible { ref subsystem, ref found, .. })
            if subsystem == "extra" && found == "<missing>"
    ));

    // A node nobody claims.
    drop((s, kv));
    commit(&path);
    let (mut s, _) = Session::start(Arena::open(&path).unwrap()).unwrap();
    s.register(Box::new(Probe::new("probe", "probe-v1").0))
        .unwrap();
    assert!(matches!(
        s.restore(),
        Err(SessionError::Unclaimed { ref node, ref compatible })
            if node == "kv" && compatible == "kv-store-v1"
    ));
}

#[test]
fn torn_image_is_refused_and_the_arena_untouched() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let (mut s, _, _) = predecessor(&path, 50);
    s.prepare().unwrap();
    s.freeze_and_commit().unwrap();
    let loc = s.heap().unwrap().current_image().unwrap();
    drop(s);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0xff], loc.offset + loc.len / 2).unwrap();
    drop(f);
    let before = std::fs::read(&path).unwrap();
    let (mut s, start, _, c) = successor(&path);
    assert!(matches!(start, Start::Handover { generation: 2 }));
    assert!(matches!(s.restore(), Err(SessionError::Heap(_))));
    assert_eq!(s.state(), State::Incoming);
    assert_eq!(c.restore.load(Ordering::SeqCst), 0);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    s.abandon_handover().unwrap();
    assert_eq!(s.state(), State::Normal);
    assert_eq!(c.cold.load(Ordering::SeqCst), 1);
}

// ---- crash consistency ------------------------------------------------------

mod crash {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    use kho_alloc::session::{arm_from_env, FaultPoint, FAULT_ENV};

    use super::*;

    const ROLE: &str = "KHO_SESSION_TEST_ROLE";
    const PATH: &str = "KHO_SESSION_TEST_ARENA";
    const EXTRA: u64 = 25;

    /// The child: a predecessor that crashes at the armed fault point.
    #[test]
    fn child() {
        let Ok(role) = std::env::var(ROLE) else {
            return;
        };
        let path = std::path::PathBuf::from(std::env::var(PATH).unwrap());
        arm_from_env().unwrap();
        let mut s = match role.as_str() {
            // First handover of a fresh arena.
            "fresh" => {
                let heap = Heap::new(Arena::open(&path).unwrap()).unwrap();
                let kv = filled_store(&heap, ENTRIES);
                let mut s = Session::new(&heap);
                s.register(Box::new(KvSubsystem::new("kv", kv, kv_cfg(ENTRIES))))
                    .unwrap();
                s.register(Box::new(Probe::new("probe", "probe-v1").0))
                    .unwrap();
                s
            }
            // A successor that serves and hands over again.
            "second" => {
                let (mut s, _, kv, _) = successor(&path);
                s.restore().unwrap();
                s.finish().unwrap();
                let mut g = kv.write().unwrap();
                let store = g.as_mut().unwrap();
                let mut v = vec![0u8; VALUE as usize];
                for k in ENTRIES..ENTRIES + EXTRA {
                    fill_value(k, &mut v);
                    store.insert(k, &v).unwrap();
                }
                drop(g);
                s
            }
            other => panic!("role {other}"),
        };
        s.prepare().unwrap();
        s.freeze_and_commit().unwrap();
        // Reached only if the armed point was never hit.
        std::process::exit(3);
    }

    fn run_child(role: &str, path: &Path, fault: &str) -> std::process::ExitStatus {
        Command::new(std::env::current_exe().unwrap())
            .args(["crash::child", "--exact", "--nocapture", "--test-threads=1"])
            .env(ROLE, role)
            .env(PATH, path)
            .env(FAULT_ENV, fault)
            .output()
            .unwrap()
            .status
    }

    fn check_after_crash(path: &Path, point: FaultPoint, prev_gen: u64, entries: u64) {
        let arena = Arena::open(path).unwrap();
        if point.publishes() {
            assert_eq!(arena.generation(), prev_gen + 1, "{point}");
            let (mut s, start, kv, _) = {
                drop(arena);
                successor(path)
            };
            assert_eq!(
                start,
                Start::Handover {
                    generation: prev_gen + 1
                }
            );
            s.restore().unwrap();
            s.finish().unwrap();
            verify(&kv, entries);
        } else {
            // The previous generation, exactly as it was.
            assert_eq!(arena.generation(), prev_gen, "{point}");
            let (_, start) = Session::start(arena).unwrap();
            assert!(matches!(start, Start::Cold { .. }), "{point}: {start:?}");
        }
    }

    #[test]
    fn every_fault_point_leaves_the_previous_generation_or_the_new_one() {
        for point in FaultPoint::ALL {
            for action in ["kill", "abort"] {
                let dir = tempfile::tempdir().unwrap();
                let fault = format!("{}:{action}", point.name());

                // A fresh arena: the previous state is "no handover".
                let path = dir.path().join("fresh");
                drop(Arena::create_file(&path, &cfg()).unwrap());
                let st = run_child("fresh", &path, &fault);
                let sig = if action == "kill" { 9 } else { 6 };
                assert_eq!(st.signal(), Some(sig), "{fault}: {st:?}");
                check_after_crash(&path, point, 1, ENTRIES);

                // A successor's second handover: the previous generation
                // is the restored image (gen 3), which must stay current.
                let path = dir.path().join("second");
                {
                    let (mut s, _, _) = predecessor(&path, ENTRIES);
                    s.prepare().unwrap();
                    s.freeze_and_commit().unwrap();
                }
                let st = run_child("second", &path, &fault);
                assert_eq!(st.signal(), Some(sig), "{fault}: {st:?}");
                check_after_crash(&path, point, 3, ENTRIES + EXTRA);
            }
        }
    }

    #[test]
    fn bad_fault_names_are_refused() {
        assert!(FaultPoint::from_name("nowhere").is_none());
        for p in FaultPoint::ALL {
            assert_eq!(FaultPoint::from_name(p.name()), Some(p));
        }
    }
}

// ---- signal-context frees ---------------------------------------------------

mod signal {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    use std::sync::OnceLock;

    use kho_alloc::deferred::DeferredFrees;
    use kho_alloc::{GfpFlags, RawObj};

    use super::*;

    const OBJECTS: usize = 20_000;
    const PER_SIGNAL: usize = 16;

    struct Shared {
        deferred: DeferredFrees,
        /// Raw handles: addr, heap | len << 32, meta.
        objs: Vec<[AtomicU64; 3]>,
        next: AtomicUsize,
        refused: AtomicU64,
    }

    static SHARED: OnceLock<Shared> = OnceLock::new();
    static HANDLED: AtomicU64 = AtomicU64::new(0);

    extern "C" fn on_usr1(_sig: libc::c_int) {
        HANDLED.fetch_add(1, Ordering::Relaxed);
        let Some(sh) = SHARED.get() else { return };
        for _ in 0..PER_SIGNAL {
            let i = sh.next.fetch_add(1, Ordering::Relaxed);
            let Some(w) = sh.objs.get(i) else { return };
            let w1 = w[1].load(Ordering::Relaxed);
            let raw = RawObj {
                addr: w[0].load(Ordering::Relaxed),
                heap: w1 as u32,
                len: (w1 >> 32) as u32,
                meta: w[2].load(Ordering::Relaxed),
            };
            // SAFETY: each index is handed out once by the `fetch_add`,
            // and the slot holds the only form of that object's handle.
            if unsafe { sh.deferred.free_deferred_raw(raw) }.is_err() {
                sh.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    #[test]
    fn signal_handler_frees_while_a_thread_allocates() {
        let heap = Heap::new(Arena::anonymous(&ArenaConfig::with_size(64 << 20)).unwrap()).unwrap();
        let victims = heap.cache("victims", 48, 8).unwrap();
        let objs = (0..OBJECTS)
            .map(|_| {
                let raw = victims.alloc(GfpFlags::ZERO).unwrap().into_raw();
                [
                    AtomicU64::new(raw.addr),
                    AtomicU64::new(u64::from(raw.heap) | u64::from(raw.len) << 32),
                    AtomicU64::new(raw.meta),
                ]
            })
            .collect();
        assert_eq!(victims.live(), OBJECTS as u64);
        let sh = SHARED.get_or_init(|| Shared {
            deferred: DeferredFrees::new(&heap),
            objs,
            next: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        });
        // SAFETY: installs a plain handler that only touches atomics and
        // the lock-free deferred list.
        let prev =
            unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
        assert_ne!(prev, libc::SIG_ERR);

        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        let h = heap.clone();
        let v = victims.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tx.send(unsafe { libc::pthread_self() }).unwrap();
            let mut rounds = 0u64;
            while !d.load(Ordering::Acquire) {
                // Allocation traffic on both the general classes and the
                // victims' own cache, with safe-point drains.
                let mut general = Vec::new();
                let mut own = Vec::new();
                for i in 0..64 {
                    general.push(h.alloc(16 + i * 8, GfpFlags::NONE).unwrap());
                    own.push(v.alloc(GfpFlags::NONE).unwrap());
                }
                for o in general {
                    h.free(o).unwrap();
                }
                for o in own {
                    v.free(o).unwrap();
                }
                rounds += 1;
                if rounds % 8 == 0 {
                    SHARED.get().unwrap().deferred.drain();
                }
            }
            rounds
        });
        let thread = rx.recv().unwrap();
        while sh.next.load(Ordering::Relaxed) < OBJECTS {
            // SAFETY: `thread` is alive until `done` is set below.
            let rc = unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
            assert_eq!(rc, 0);
            std::thread::yield_now();
        }
        done.store(true, Ordering::Release);
        let rounds = worker.join().unwrap();
        let stats = sh.deferred.drain();
        assert_eq!(stats.failed, 0);
        assert!(rounds > 0 && HANDLED.load(Ordering::Relaxed) > 0);
        assert_eq!(sh.refused.load(Ordering::Relaxed), 0);
        assert_eq!(sh.deferred.pushed(), OBJECTS as u64);
        assert_eq!(sh.deferred.drained(), OBJECTS as u64);
        assert!(sh.deferred.is_empty());
        assert_eq!(victims.live(), 0, "every object reclaimed");
    }

    #[test]
    fn short_or_foreign_objects_are_handed_back() {
        let heap = Heap::new(Arena::anonymous(&ArenaConfig::with_size(16 << 20)).unwrap()).unwrap();
        let other =
            Heap::new(Arena::anonymous(&ArenaConfig::with_size(16 << 20)).unwrap()).unwrap();
        let d = DeferredFrees::new(&heap);
        let small = heap.alloc(8, GfpFlags::NONE).unwrap();
        let small = d.free_deferred(small).unwrap_err();
        heap.free(small).unwrap();
        let foreign = other.alloc(64, GfpFlags::NONE).unwrap();
        let foreign = d.free_deferred(foreign).unwrap_err();
        other.free(foreign).unwrap();
        let ok = heap.alloc(64, GfpFlags::NONE).unwrap();
        d.free_deferred(ok).unwrap();
        assert_eq!(d.drain().freed, 1);
    }
}

// ---- restart ---------------------------------------------------------------

#[test]
fn restart_reopens_the_arena_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let (mut s, _, _) = predecessor(&path, ENTRIES);
    s.prepare().unwrap();
    s.freeze_and_commit().unwrap();
    drop(s);
    // A restarted service opens the file by name.
    let (mut s, start, kv, c) = successor(&path);
    assert!(matches!(start, Start::Handover { .. }));
    s.restore().unwrap();
    s.finish().unwrap();
    assert_eq!(c.finish.load(Ordering::SeqCst), 1);
    verify(&kv, ENTRIES);
    // Restarting again finds the image consumed and starts cold.
    drop(s);
    drop(kv);
    let (s, start, kv, c) = successor(&path);
    assert!(matches!(start, Start::Cold { .. }));
    assert_eq!(s.state(), State::Normal);
    assert!(kv.read().unwrap().is_none());
    let mut s = s;
    s.cold_start().unwrap();
    assert_eq!(c.cold.load(Ordering::SeqCst), 1);
    assert_eq!(kv.read().unwrap().as_ref().unwrap().len(), 0);
}

// ---- the sampler ------------------------------------------------------------

#[test]
fn freeze_disables_the_sampler_and_cancel_restores_it() {
    use kho_alloc::kfence::{AnonMemory, Pool, PoolConfig, SampleMode, Sampler};
    let memory = AnonMemory::new(PoolConfig::pages_for(4)).unwrap();
    let pool = Pool::new(
        Box::new(memory),
        PoolConfig {
            objects: 4,
            ..PoolConfig::default()
        },
    )
    .unwrap();
    let mode = SampleMode::Count(3);
    let sampler = Arc::new(Sampler::new(Arc::new(pool), mode).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _, _) = predecessor(&dir.path().join("a"), 10);
    let heap = s.heap().unwrap().clone();
    // The heap's own sampler over the arena's KFENCE region, too.
    let own = heap
        .enable_kfence(
            mode,
            PoolConfig {
                objects: 4,
                ..PoolConfig::default()
            },
        )
        .unwrap();
    s.set_heap_kfence_mode(mode);
    s.attach_sampler(Arc::clone(&sampler), mode);
    assert!(sampler.is_enabled() && own.is_enabled());
    s.prepare().unwrap();
    assert!(
        sampler.is_enabled(),
        "prepare runs while the service serves"
    );
    s.freeze().unwrap();
    assert!(!sampler.is_enabled(), "the blackout runs unsampled");
    assert!(!own.is_enabled());
    s.cancel().unwrap();
    s.barrier();
    assert!(sampler.is_enabled() && own.is_enabled());
    s.prepare().unwrap();
    s.freeze_and_commit().unwrap();
    assert!(!sampler.is_enabled() && !own.is_enabled());
}
