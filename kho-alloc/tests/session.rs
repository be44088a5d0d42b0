//! Handover sessions: the state machine (an explicit matrix), cancel and
//! abort, freeze and commit failures, restore's validation and rollback,
//! deferred frees and preservable caches through a session, a quiesced
//! store, crash consistency at every fault point (in child processes that
//! die there), frees from signal handlers, and restart handover.
// Under Miri: memfd, files, signals and child processes are unsupported.
#![cfg(not(miri))]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use kho_alloc::deferred::DeferredFrees;
use kho_alloc::epoch::Cleanup;
use kho_alloc::kv::demo::fill_value;
use kho_alloc::kv::{KvConfig, KvError, KvHandle, KvStore, KvSubsystem};
use kho_alloc::session::{
    arm, disarm, BoxError, FaultAction, FaultPoint, Op, PrepareCx, Recovery, RestoreCx, Session,
    SessionError, Start, State, Subsystem,
};
use kho_alloc::{Arena, ArenaConfig, Error, GfpFlags, Heap, Obj};
use kho_core::{Node, PAGE_SIZE};

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
    abort_restore: AtomicU32,
    finish: AtomicU32,
    cold: AtomicU32,
    /// Restores still to fail.
    fail_restore: AtomicU32,
}

/// A subsystem that counts its callbacks and queues a cleanup on cancel;
/// optionally fails, or keeps a handle to the successor's heap.
struct Probe {
    name: &'static str,
    compatible: &'static str,
    c: Arc<Counters>,
    fail_prepare: bool,
    fail_freeze: bool,
    cold: bool,
    /// Keep the restored heap even through `abort_restore`.
    hog: bool,
    held: Option<Heap>,
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
                fail_freeze: false,
                cold: false,
                hog: false,
                held: None,
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
    fn prepare(&mut self, _cx: &mut PrepareCx<'_>) -> Result<(), BoxError> {
        self.c.prepare.fetch_add(1, Ordering::SeqCst);
        if self.fail_prepare {
            return Err("refused".into());
        }
        Ok(())
    }
    fn freeze(&mut self, node: &mut Node) -> Result<(), BoxError> {
        self.c.freeze.fetch_add(1, Ordering::SeqCst);
        if self.fail_freeze {
            return Err("cannot freeze".into());
        }
        node.set_prop("magic", 0x1234u64);
        Ok(())
    }
    fn cancel(&mut self) {
        self.c.cancel.fetch_add(1, Ordering::SeqCst);
    }
    fn restore(&mut self, cx: &mut RestoreCx<'_>, node: &Node) -> Result<(), BoxError> {
        self.c.restore.fetch_add(1, Ordering::SeqCst);
        let left = self.c.fail_restore.load(Ordering::SeqCst);
        if left > 0 {
            self.c.fail_restore.store(left - 1, Ordering::SeqCst);
            return Err("restore refused".into());
        }
        if node.u64_prop("magic")? != 0x1234 {
            return Err("bad magic".into());
        }
        if self.hog {
            self.held = Some(cx.heap().clone());
        }
        Ok(())
    }
    fn abort_restore(&mut self) {
        self.c.abort_restore.fetch_add(1, Ordering::SeqCst);
        if !self.hog {
            self.held = None;
        }
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
    predecessor_on(&heap, n)
}

fn predecessor_on(heap: &Heap, n: u64) -> (Session, KvHandle, Arc<Counters>) {
    let kv = filled_store(heap, n);
    let mut s = Session::new(heap);
    s.register(Box::new(KvSubsystem::new("kv", Arc::clone(&kv), kv_cfg(n))))
        .unwrap();
    let (probe, c) = Probe::new("probe", "probe-v1");
    s.register(Box::new(probe)).unwrap();
    (s, kv, c)
}

/// A committed handover of `n` entries at `path` (the predecessor gone).
fn committed(path: &Path, n: u64) {
    let (mut s, _, _) = predecessor(path, n);
    s.prepare().unwrap();
    s.freeze_and_commit().unwrap();
}

/// A successor over the arena file at `path`.
fn successor(path: &Path) -> (Session, Start, KvHandle, Arc<Counters>) {
    let (s, start, kv, c) = successor_with(path, |_| {});
    (s, start, kv, c)
}

/// A successor whose probe `tweak` adjusts before registration.
fn successor_with(
    path: &Path,
    tweak: impl FnOnce(&mut Probe),
) -> (Session, Start, KvHandle, Arc<Counters>) {
    let (mut s, start) = Session::start(Arena::open(path).unwrap()).unwrap();
    let kv: KvHandle = Arc::new(RwLock::new(None));
    s.register(Box::new(KvSubsystem::new(
        "kv",
        Arc::clone(&kv),
        kv_cfg(ENTRIES),
    )))
    .unwrap();
    let (mut probe, c) = Probe::new("probe", "probe-v1");
    tweak(&mut probe);
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

/// Restore the handover at `path` in a fresh successor and check `n`
/// entries.
fn restore_and_verify(path: &Path, generation: u64, n: u64) {
    let (mut s, start, kv, _) = successor(path);
    assert_eq!(start, Start::Handover { generation });
    s.restore().unwrap();
    s.finish().unwrap();
    verify(&kv, n);
}

/// The two superblock pages of the arena file.
fn superblocks(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    bytes[..2 * PAGE_SIZE as usize].to_vec()
}

/// Disarms the calling thread's fault point when dropped.
struct Armed;

impl Armed {
    fn fail(point: FaultPoint) -> Armed {
        arm(point, FaultAction::Fail);
        Armed
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        disarm();
    }
}

fn is_eio(e: &SessionError) -> bool {
    let io = match e {
        SessionError::Io { source, .. } => Some(source),
        SessionError::Heap(Error::Io { source, .. }) => Some(source),
        _ => None,
    };
    io.and_then(std::io::Error::raw_os_error) == Some(libc::EIO)
}

// ---- state machine ----------------------------------------------------------

/// Every legal step, written out: (from, operation, to). Every other pair
/// is refused.
const LEGAL: [(State, Op, State); 15] = [
    (State::Normal, Op::Register, State::Normal),
    (State::Incoming, Op::Register, State::Incoming),
    (State::Finished, Op::Register, State::Finished),
    (State::Normal, Op::ColdStart, State::Normal),
    (State::Normal, Op::Prepare, State::Prepared),
    (State::Finished, Op::Prepare, State::Prepared),
    (State::Prepared, Op::Freeze, State::Frozen),
    (State::Frozen, Op::Commit, State::Committed),
    (State::Prepared, Op::Cancel, State::Normal),
    (State::Frozen, Op::Cancel, State::Normal),
    (State::Committed, Op::ExecEnv, State::Committed),
    (State::Committed, Op::Abort, State::Normal),
    (State::Incoming, Op::Restore, State::Restored),
    (State::Incoming, Op::Abandon, State::Normal),
    (State::Restored, Op::Finish, State::Finished),
];

fn expected(state: State, op: Op) -> Option<State> {
    LEGAL
        .iter()
        .find(|(s, o, _)| (*s, *o) == (state, op))
        .map(|t| t.2)
}

/// A session in `state`, built in `dir`.
fn session_in(state: State, dir: &Path) -> Session {
    let path = dir.join(format!("{}.arena", state.name()));
    let _ = std::fs::remove_file(&path);
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
            committed(&path, ENTRIES);
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
        Op::Register => s.register(Box::new(Probe::new("extra", "extra-v1").0)),
        Op::ColdStart => s.cold_start(),
        Op::Prepare => s.prepare(),
        Op::Freeze => s.freeze(),
        Op::Commit => s.commit().map(drop),
        Op::Cancel => s.cancel(),
        Op::ExecEnv => s.exec_env().map(drop),
        Op::Abort => s.abort().map(drop),
        Op::Restore => s.restore().map(drop),
        Op::Abandon => s.abandon_handover(),
        Op::Finish => s.finish(),
    }
}

#[test]
fn every_transition_legal_and_illegal() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(Op::ALL.len(), 11);
    let mut legal = 0;
    for state in State::ALL {
        for op in Op::ALL {
            // The library's table agrees with the one written out here.
            assert_eq!(state.after(op), expected(state, op), "{state} --{op}-->");
            let mut s = session_in(state, dir.path());
            assert_eq!(s.state(), state);
            let r = apply(&mut s, op);
            match expected(state, op) {
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
    assert_eq!(legal, LEGAL.len());
}

#[test]
fn start_tells_handover_from_cold() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    drop(Arena::create_file(&path, &cfg()).unwrap());
    let (s, start) = Session::start(Arena::open(&path).unwrap()).unwrap();
    assert_eq!(
        start,
        Start::Cold {
            reason: "the arena holds no image"
        }
    );
    assert_eq!(s.state(), State::Normal);
    assert!(s.heap().is_some());
    drop(s);
    let _ = std::fs::remove_file(&path);
    committed(&path, 5);
    let (s, start) = Session::start(Arena::open(&path).unwrap()).unwrap();
    assert_eq!(start, Start::Handover { generation: 2 });
    assert_eq!(s.state(), State::Incoming);
    assert!(s.heap().is_none());
    drop(s);
    restore_and_verify_n(&path, 5);
    let (_, start) = Session::start(Arena::open(&path).unwrap()).unwrap();
    assert_eq!(
        start,
        Start::Cold {
            reason: "the image was already restored"
        }
    );
}

fn restore_and_verify_n(path: &Path, n: u64) {
    let (mut s, _, kv, _) = successor(path);
    s.restore().unwrap();
    s.finish().unwrap();
    verify(&kv, n);
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
    assert_eq!(r.preserved_bytes, r.stats.preserved_bytes);
    assert_eq!(c.freeze.load(Ordering::SeqCst), 1);
    let (var, fd) = s.exec_env().unwrap();
    assert_eq!(var, kho_alloc::session::ARENA_FD_ENV);
    let fd: i32 = fd.parse().unwrap();
    assert_eq!(kho_alloc::session::cloexec(fd), Some(false));
    drop(s);

    let (mut s, start, kv, c) = successor(&path);
    assert_eq!(start, Start::Handover { generation: 2 });
    let report = s.restore().unwrap().clone();
    assert_eq!(report.restored, ["kv", "probe"]);
    assert_eq!(report.generation, 2);
    assert!(report.cold_started.is_empty());
    // Restored, not yet consumed: that is finish.
    assert!(s.heap().unwrap().current_image().is_some());
    assert_eq!(s.heap().unwrap().generation(), 2);
    s.finish().unwrap();
    assert_eq!(s.heap().unwrap().generation(), 3);
    assert_eq!(s.restore_report().unclaimed, 0);
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
    assert_eq!(g2, 4); // 3 recorded the restore.
    drop(s);
    drop(kv);
    restore_and_verify(&path, 4, ENTRIES + 10);
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
        restore_and_verify(&path, 2, ENTRIES);
    }
}

/// Cancel while another thread is inside the domain's cleanup runner
/// (holding its lock): it neither blocks nor allocates, and once that
/// thread is done the handover is undone completely.
#[test]
fn cancel_while_another_thread_runs_cleanups() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _kv, _) = predecessor(&dir.path().join("a"), ENTRIES);
    let heap = s.heap().unwrap().clone();
    let before = heap.stats();
    s.prepare().unwrap();
    s.freeze().unwrap();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let slow = Cleanup::new(move || {
        let _ = entered_tx.send(());
        let _ = release_rx.lock().unwrap().recv();
    });
    s.domain().defer(&slow);
    let domain = s.domain().clone();
    let runner = std::thread::spawn(move || domain.poll());
    entered.recv().unwrap();
    let (r, allocs) = allocations(|| s.cancel());
    r.unwrap();
    assert_eq!(allocs, 0, "cancel allocated");
    assert_eq!(s.state(), State::Normal);
    release.send(()).unwrap();
    assert_eq!(runner.join().unwrap(), 1);
    s.barrier();
    let after = heap.stats();
    assert_eq!(after.preserved_folios, 0);
    assert_eq!(
        after.general.allocated_pages,
        before.general.allocated_pages
    );
    assert_eq!(s.cleanup_errors(), 0);
    // And the next handover starts clean.
    s.prepare().unwrap();
    s.cancel().unwrap();
    s.barrier();
    assert_eq!(heap.stats().preserved_folios, 0);
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

#[test]
fn a_session_dropped_mid_handover_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, _kv, c) = predecessor(&dir.path().join("a"), 10);
    let heap = s.heap().unwrap().clone();
    let before = heap.stats();
    s.prepare().unwrap();
    s.freeze().unwrap();
    drop(s);
    assert_eq!(c.cancel.load(Ordering::SeqCst), 1);
    assert_eq!(c.cleanup.load(Ordering::SeqCst), 1);
    assert_eq!(heap.stats().preserved_folios, 0);
    assert_eq!(
        heap.stats().general.allocated_pages,
        before.general.allocated_pages
    );
}

// ---- freeze and commit failures ---------------------------------------------

/// After a failed freeze or commit: NORMAL, nothing preserved or leaked,
/// the superblocks as they were, and a later handover works.
fn assert_undone(s: &mut Session, path: &Path, before: &kho_alloc::HeapStats, sb: &[u8]) {
    assert_eq!(s.state(), State::Normal);
    s.barrier();
    let heap = s.heap().unwrap().clone();
    let after = heap.stats();
    assert_eq!(after.preserved_folios, 0);
    assert_eq!(
        after.general.allocated_pages,
        before.general.allocated_pages
    );
    assert_eq!(s.cleanup_errors(), 0);
    assert_eq!(superblocks(path), sb, "the superblocks changed");
    assert_eq!(heap.current_image(), None);
    s.prepare().unwrap();
    s.freeze_and_commit().unwrap();
}

#[test]
fn freeze_failures_leave_nothing() {
    for point in [
        FaultPoint::BeforeFreeze,
        FaultPoint::AfterSubsystemFreeze,
        FaultPoint::AfterImageWrite,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let (mut s, _kv, c) = predecessor(&path, ENTRIES);
        let before = s.heap().unwrap().stats();
        let sb = superblocks(&path);
        s.prepare().unwrap();
        let armed = Armed::fail(point);
        let e = s.freeze().unwrap_err();
        drop(armed);
        assert!(is_eio(&e), "{point}: {e:?}");
        assert_eq!(c.cancel.load(Ordering::SeqCst), 1, "{point}");
        assert_undone(&mut s, &path, &before, &sb);
    }
    // A subsystem that cannot freeze.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let (mut s, _kv, _) = predecessor(&path, ENTRIES);
    let (mut bad, cb) = Probe::new("bad", "bad-v1");
    bad.fail_freeze = true;
    s.register(Box::new(bad)).unwrap();
    let before = s.heap().unwrap().stats();
    let sb = superblocks(&path);
    s.prepare().unwrap();
    match s.freeze() {
        Err(SessionError::Subsystem { subsystem, op, .. }) => {
            assert_eq!((subsystem.as_str(), op), ("bad", Op::Freeze));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cb.cancel.load(Ordering::SeqCst), 1);
    assert_eq!(s.state(), State::Normal);
    s.barrier();
    assert_eq!(s.heap().unwrap().stats().preserved_folios, 0);
    assert_eq!(
        s.heap().unwrap().stats().general.allocated_pages,
        before.general.allocated_pages
    );
    assert_eq!(superblocks(&path), sb);
}

#[test]
fn commit_failures_leave_the_previous_generation_and_nothing_else() {
    for point in [
        FaultPoint::AfterImageSync,
        FaultPoint::TornSuperblock,
        FaultPoint::BeforeSlotSync,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        let (mut s, _kv, c) = predecessor(&path, ENTRIES);
        let before = s.heap().unwrap().stats();
        let sb = superblocks(&path);
        s.prepare().unwrap();
        s.freeze().unwrap();
        let armed = Armed::fail(point);
        let e = s.commit().unwrap_err();
        drop(armed);
        assert!(is_eio(&e), "{point}: {e:?}");
        assert_eq!(c.cancel.load(Ordering::SeqCst), 1, "{point}");
        assert_eq!(s.heap().unwrap().generation(), 1, "{point}");
        assert_undone(&mut s, &path, &before, &sb);
    }
    // Nothing after the publish fails a commit.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let (mut s, _kv, _) = predecessor(&path, ENTRIES);
    s.prepare().unwrap();
    s.freeze().unwrap();
    let armed = Armed::fail(FaultPoint::AfterPublish);
    assert_eq!(s.commit().unwrap(), 2);
    drop(armed);
    assert_eq!(s.state(), State::Committed);
}

/// An image frozen before another commit records a generation that is no
/// longer next: its commit is refused, not published under a generation
/// it does not record.
#[test]
fn a_stale_frozen_image_is_not_published() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let (mut s, _kv, _) = predecessor(&path, ENTRIES);
    let heap = s.heap().unwrap().clone();
    s.prepare().unwrap();
    let p0 = heap.stats().general.allocated_pages;
    s.freeze().unwrap();
    let session_image = heap.stats().general.allocated_pages - p0;
    heap.freeze_and_commit(None).unwrap();
    let with_both = heap.stats().general.allocated_pages;
    let sb = superblocks(&path);
    match s.commit() {
        Err(SessionError::Heap(Error::Inconsistent {
            expected, found, ..
        })) => assert_eq!((expected, found), (3, 2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.state(), State::Normal);
    s.barrier();
    assert_eq!(heap.generation(), 2);
    assert_eq!(superblocks(&path), sb);
    // The session's image folio went back; the direct commit's stays.
    assert_eq!(
        heap.stats().general.allocated_pages,
        with_both - session_image
    );
    assert_eq!(heap.stats().preserved_folios, 0);
}

// ---- abort ------------------------------------------------------------------

#[test]
fn abort_withdraws_a_committed_handover() {
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
    let path = dir.path().join("a");
    let (mut s, kv, c) = predecessor(&path, ENTRIES);
    s.attach_sampler(Arc::clone(&sampler), mode);
    let heap = s.heap().unwrap().clone();
    let before = heap.stats();
    s.prepare().unwrap();
    s.freeze_and_commit().unwrap();
    assert!(!sampler.is_enabled());
    let fd: i32 = s.exec_env().unwrap().1.parse().unwrap();
    assert_eq!(kho_alloc::session::cloexec(fd), Some(false));
    // The store is frozen while committed.
    assert!(matches!(
        kv.write().unwrap().as_mut().unwrap().insert(1, b"x"),
        Err(KvError::Frozen { op: "insert" })
    ));

    // A failed abort keeps the handover published.
    let armed = Armed::fail(FaultPoint::BeforeSlotSync);
    let e = s.abort().unwrap_err();
    drop(armed);
    assert!(is_eio(&e), "{e:?}");
    assert_eq!(s.state(), State::Committed);
    assert_eq!(heap.generation(), 2);
    assert!(heap.current_image().is_some());

    assert_eq!(s.abort().unwrap(), 3);
    assert_eq!(s.state(), State::Normal);
    assert_eq!(c.cancel.load(Ordering::SeqCst), 1);
    assert_eq!(kho_alloc::session::cloexec(fd), Some(true));
    s.barrier();
    assert!(
        sampler.is_enabled(),
        "freeze disabled it, abort re-enables it"
    );
    assert_eq!(heap.current_image(), None);
    let after = heap.stats();
    assert_eq!(after.preserved_folios, 0);
    assert_eq!(
        after.general.allocated_pages,
        before.general.allocated_pages
    );
    // Serving again.
    kv.write()
        .unwrap()
        .as_mut()
        .unwrap()
        .insert(1, b"x")
        .unwrap();
    drop(s);
    drop(kv);
    drop(heap);
    let (_, start) = Session::start(Arena::open(&path).unwrap()).unwrap();
    assert_eq!(
        start,
        Start::Cold {
            reason: "the arena holds no image"
        }
    );
}

// ---- the sampler ------------------------------------------------------------

#[test]
fn freeze_disables_the_samplers_and_cancel_restores_only_what_it_disabled() {
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

    // Cancel from PREPARED never touches the samplers: one the service
    // turned off stays off.
    sampler.disable();
    s.prepare().unwrap();
    s.cancel().unwrap();
    s.barrier();
    assert!(
        !sampler.is_enabled(),
        "cancel from PREPARED enabled a sampler"
    );
    // Nor does a freeze that found it off.
    s.prepare().unwrap();
    s.freeze().unwrap();
    s.cancel().unwrap();
    s.barrier();
    assert!(!sampler.is_enabled());
    assert!(own.is_enabled());

    s.prepare().unwrap();
    s.freeze_and_commit().unwrap();
    assert!(!sampler.is_enabled() && !own.is_enabled());
}

// ---- compatibility and restore ----------------------------------------------

#[test]
fn incompatible_missing_and_unclaimed_nodes_are_refused_before_anything_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    committed(&path, 20);
    let untouched = std::fs::read(&path).unwrap();
    let kv_sub = |kv: &KvHandle| Box::new(KvSubsystem::new("kv", Arc::clone(kv), kv_cfg(20)));

    // A newer probe: compatible differs.
    {
        let (mut s, _) = Session::start(Arena::open(&path).unwrap()).unwrap();
        let kv: KvHandle = Arc::new(RwLock::new(None));
        s.register(kv_sub(&kv)).unwrap();
        let (p, c) = Probe::new("probe", "probe-v2");
        s.register(Box::new(p)).unwrap();
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
        assert_eq!(s.state(), State::Incoming);
        assert!(kv.read().unwrap().is_none(), "kv restored before the check");
        assert_eq!(c.restore.load(Ordering::SeqCst), 0);
    }
    assert_eq!(std::fs::read(&path).unwrap(), untouched);

    // A subsystem the predecessor did not have: its node is missing.
    {
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
        assert_eq!(s.state(), State::Incoming);
        assert!(kv.read().unwrap().is_none());
    }
    assert_eq!(std::fs::read(&path).unwrap(), untouched);

    // A node nobody claims.
    {
        let (mut s, _) = Session::start(Arena::open(&path).unwrap()).unwrap();
        s.register(Box::new(Probe::new("probe", "probe-v1").0))
            .unwrap();
        assert!(matches!(
            s.restore(),
            Err(SessionError::Unclaimed { ref node, ref compatible })
                if node == "kv" && compatible == "kv-store-v1"
        ));
        assert_eq!(s.state(), State::Incoming);
        // The same session, once it knows the store, restores.
        let kv: KvHandle = Arc::new(RwLock::new(None));
        s.register(kv_sub(&kv)).unwrap();
        s.restore().unwrap();
        s.finish().unwrap();
        verify(&kv, 20);
    }

    // Choosing a cold start.
    let _ = std::fs::remove_file(&path);
    committed(&path, 20);
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
}

#[test]
fn a_failed_subsystem_restore_rolls_back_to_incoming() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    committed(&path, ENTRIES);
    let untouched = std::fs::read(&path).unwrap();
    let (mut s, _, kv, c) = successor_with(&path, |p| {
        p.c.fail_restore.store(1, Ordering::SeqCst);
    });
    match s.restore() {
        Err(SessionError::Subsystem { subsystem, op, .. }) => {
            assert_eq!((subsystem.as_str(), op), ("probe", Op::Restore));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.state(), State::Incoming);
    assert!(s.heap().is_none());
    // kv restored first, then gave its store back.
    assert!(kv.read().unwrap().is_none());
    assert_eq!(c.abort_restore.load(Ordering::SeqCst), 1);
    assert_eq!(std::fs::read(&path).unwrap(), untouched);
    // Nothing was consumed: the same session restores on a second try.
    s.restore().unwrap();
    s.finish().unwrap();
    verify(&kv, ENTRIES);
    assert_eq!(s.restore_report().unclaimed, 0);
}

#[test]
fn a_restore_that_fails_late_rolls_back_and_can_be_abandoned() {
    for point in [
        FaultPoint::AfterHeapRestore,
        FaultPoint::AfterSubsystemRestore,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        committed(&path, ENTRIES);
        let untouched = std::fs::read(&path).unwrap();
        let (mut s, _, kv, c) = successor(&path);
        let armed = Armed::fail(point);
        let e = s.restore().unwrap_err();
        drop(armed);
        assert!(is_eio(&e), "{point}: {e:?}");
        assert_eq!(s.state(), State::Incoming, "{point}");
        assert!(kv.read().unwrap().is_none(), "{point}");
        let aborted = u32::from(point == FaultPoint::AfterSubsystemRestore);
        assert_eq!(c.abort_restore.load(Ordering::SeqCst), aborted, "{point}");
        assert_eq!(std::fs::read(&path).unwrap(), untouched, "{point}");
        // Abandoning publishes "no handover" before the memory is reused.
        s.abandon_handover().unwrap();
        assert_eq!(s.state(), State::Normal);
        assert_eq!(c.cold.load(Ordering::SeqCst), 1);
        assert_eq!(kv.read().unwrap().as_ref().unwrap().len(), 0);
        assert_eq!(s.heap().unwrap().current_image(), None);
        assert_eq!(s.heap().unwrap().generation(), 3);
    }
}

/// A subsystem that keeps a heap handle through `abort_restore` makes the
/// rollback impossible: the session stays over the restored heap in
/// NORMAL, the image consumed and the unclaimed memory freed.
#[test]
fn a_rollback_blocked_by_a_kept_heap_consumes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    committed(&path, ENTRIES);
    let (mut s, _) = Session::start(Arena::open(&path).unwrap()).unwrap();
    let kv: KvHandle = Arc::new(RwLock::new(None));
    s.register(Box::new(KvSubsystem::new(
        "kv",
        Arc::clone(&kv),
        kv_cfg(ENTRIES),
    )))
    .unwrap();
    let (mut hog, c) = Probe::new("probe", "probe-v1");
    hog.hog = true;
    s.register(Box::new(hog)).unwrap();
    let armed = Armed::fail(FaultPoint::AfterSubsystemRestore);
    let e = s.restore().unwrap_err();
    drop(armed);
    assert!(is_eio(&e), "{e:?}");
    assert_eq!(c.abort_restore.load(Ordering::SeqCst), 1);
    assert_eq!(s.state(), State::Normal);
    let heap = s.heap().unwrap().clone();
    // kv gave its folios back; nothing of the handover stays allocated.
    assert!(kv.read().unwrap().is_none());
    assert_eq!(heap.stats().preservable.allocated_pages, 0);
    assert_eq!(s.cleanup_errors(), 0);
    drop(s);
    drop(heap);
    let (_, start) = Session::start(Arena::open(&path).unwrap()).unwrap();
    assert_eq!(
        start,
        Start::Cold {
            reason: "the image was already restored"
        }
    );
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
    assert!(matches!(
        s.restore(),
        Err(SessionError::Heap(Error::Inconsistent {
            what: "image crc32",
            ..
        }))
    ));
    assert_eq!(s.state(), State::Incoming);
    assert_eq!(c.restore.load(Ordering::SeqCst), 0);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    s.abandon_handover().unwrap();
    assert_eq!(s.state(), State::Normal);
    assert_eq!(c.cold.load(Ordering::SeqCst), 1);
    drop(s);
    let (_, start) = Session::start(Arena::open(&path).unwrap()).unwrap();
    assert!(matches!(start, Start::Cold { .. }));
}

// ---- deferred frees and preservable caches through a session -----------------

/// A subsystem whose state is objects of a preservable cache, named by
/// address in its node. Its freeze may hand one more object to the
/// deferred list: a free arriving after the drain.
struct Conns {
    cache: Option<kho_alloc::PreservableCache>,
    objs: Vec<Obj>,
    late: Option<(Arc<DeferredFrees>, Obj)>,
    /// Successor: the heap the objects were taken from.
    heap: Option<Heap>,
    taken: Arc<Mutex<Vec<(u64, u8)>>>,
}

impl Subsystem for Conns {
    fn name(&self) -> &str {
        "conns"
    }
    fn compatible(&self) -> &str {
        "conns-v1"
    }
    fn prepare(&mut self, _cx: &mut PrepareCx<'_>) -> Result<(), BoxError> {
        // Slab pages of preservable caches are preserved by freeze.
        Ok(())
    }
    fn freeze(&mut self, node: &mut Node) -> Result<(), BoxError> {
        if let Some((d, obj)) = self.late.take() {
            d.free_deferred(obj).map_err(|_| "refused")?;
        }
        node.set_prop("count", self.objs.len() as u64);
        for (i, o) in self.objs.iter().enumerate() {
            node.set_prop(format!("{i}"), o.addr().0);
        }
        Ok(())
    }
    fn cancel(&mut self) {}
    fn restore(&mut self, cx: &mut RestoreCx<'_>, node: &Node) -> Result<(), BoxError> {
        let n = node.u64_prop("count")?;
        let heap = cx.heap().clone();
        let cache = cx.restored().cache_mut("conns").ok_or("no cache")?;
        for i in 0..n {
            let addr = node.u64_prop(&format!("{i}"))?;
            let obj = cache
                .take(kho_core::PhysAddr(addr))
                .ok_or("object not live")?;
            let b = heap.bytes(&obj)?[0];
            self.taken.lock().unwrap().push((addr, b));
            self.objs.push(obj);
        }
        self.heap = Some(heap);
        Ok(())
    }
    fn abort_restore(&mut self) {
        if let Some(h) = self.heap.take() {
            for o in self.objs.drain(..) {
                let _ = h.free(o);
            }
        }
        self.cache = None;
    }
}

#[test]
fn deferred_frees_and_preservable_caches_through_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let late_addr;
    {
        let heap = Heap::new(Arena::create_file(&path, &cfg()).unwrap()).unwrap();
        let cache = heap.cache("conns", 64, 8).unwrap();
        let deferred = Arc::new(DeferredFrees::new(&heap));
        let mut keep = Vec::new();
        for i in 0..100u8 {
            let mut o = cache.alloc(GfpFlags::ZERO).unwrap();
            heap.bytes_mut(&mut o).unwrap().fill(i);
            if i % 2 == 0 {
                keep.push(o);
            } else {
                // Freed from "signal context": reclaimed by freeze's drain.
                deferred.free_deferred(o).unwrap();
            }
        }
        let late = cache.alloc(GfpFlags::ZERO).unwrap();
        late_addr = late.addr().0;
        assert_eq!(cache.live(), 101);
        let (mut s, kv, _) = predecessor_on(&heap, 10);
        s.attach_deferred(Arc::clone(&deferred));
        s.register(Box::new(Conns {
            cache: Some(cache.clone()),
            objs: keep,
            late: Some((Arc::clone(&deferred), late)),
            heap: None,
            taken: Arc::default(),
        }))
        .unwrap();
        s.prepare().unwrap();
        s.freeze_and_commit().unwrap();
        let r = s.freeze_report();
        assert_eq!(r.drained.freed, 50);
        assert_eq!(r.drained.failed, 0);
        // 50 kept plus the one freed after the drain, still live.
        assert_eq!(r.stats.live_objects, 51);
        assert_eq!(cache.live(), 51);
        assert!(!deferred.is_empty(), "the late free waits for a drain");
        drop((s, kv, cache));
    }
    let (mut s, start) = Session::start(Arena::open(&path).unwrap()).unwrap();
    assert!(matches!(start, Start::Handover { .. }));
    let kv: KvHandle = Arc::new(RwLock::new(None));
    s.register(Box::new(KvSubsystem::new(
        "kv",
        Arc::clone(&kv),
        kv_cfg(10),
    )))
    .unwrap();
    s.register(Box::new(Probe::new("probe", "probe-v1").0))
        .unwrap();
    let taken = Arc::new(Mutex::new(Vec::new()));
    s.register(Box::new(Conns {
        cache: None,
        objs: Vec::new(),
        late: None,
        heap: None,
        taken: Arc::clone(&taken),
    }))
    .unwrap();
    s.restore().unwrap();
    let taken = taken.lock().unwrap().clone();
    assert_eq!(taken.len(), 50);
    for (i, (_, byte)) in taken.iter().enumerate() {
        assert_eq!(usize::from(*byte), 2 * i, "object {i} content");
    }
    s.finish().unwrap();
    // The object freed after the drain was handed over as live, and freed
    // here since no subsystem took it.
    assert_eq!(s.restore_report().unclaimed, 1);
    let heap = s.heap().unwrap().clone();
    let cache = heap.cache("conns", 64, 8).unwrap();
    assert_eq!(cache.live(), 50);
    assert!(taken.iter().all(|(a, _)| *a != late_addr));
    verify(&kv, 10);
}

// ---- a quiesced store -------------------------------------------------------

#[test]
fn freeze_quiesces_the_store_and_cancel_lets_writers_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, kv, _) = predecessor(&dir.path().join("a"), 10);
    s.prepare().unwrap();
    // Writers go on while prepared.
    kv.write()
        .unwrap()
        .as_mut()
        .unwrap()
        .insert(100, b"v")
        .unwrap();
    s.freeze().unwrap();
    {
        let mut g = kv.write().unwrap();
        let store = g.as_mut().unwrap();
        assert!(store.is_frozen());
        assert!(matches!(
            store.insert(101, b"v"),
            Err(KvError::Frozen { op: "insert" })
        ));
        assert!(matches!(
            store.remove(100),
            Err(KvError::Frozen { op: "remove" })
        ));
        // Readers are not affected.
        assert_eq!(store.get(100).unwrap().as_deref(), Some(&b"v"[..]));
    }
    s.cancel().unwrap();
    assert!(!kv.read().unwrap().as_ref().unwrap().is_frozen());
    kv.write()
        .unwrap()
        .as_mut()
        .unwrap()
        .insert(101, b"v")
        .unwrap();
}

#[test]
fn a_writer_holding_the_store_fails_freeze_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    let heap = Heap::new(Arena::create_file(&path, &cfg()).unwrap()).unwrap();
    let kv = filled_store(&heap, 10);
    let mut s = Session::new(&heap);
    s.register(Box::new(
        KvSubsystem::new("kv", Arc::clone(&kv), kv_cfg(10))
            .freeze_wait(std::time::Duration::from_millis(20)),
    ))
    .unwrap();
    s.prepare().unwrap();
    let (held_tx, held) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let w = Arc::clone(&kv);
    let writer = std::thread::spawn(move || {
        let _g = w.write().unwrap();
        held_tx.send(()).unwrap();
        release_rx.recv().unwrap();
    });
    held.recv().unwrap();
    match s.freeze() {
        Err(SessionError::Subsystem {
            subsystem,
            op,
            source,
        }) => {
            assert_eq!((subsystem.as_str(), op), ("kv", Op::Freeze));
            assert!(matches!(
                source.downcast_ref::<KvError>(),
                Some(KvError::Busy { .. })
            ));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.state(), State::Normal);
    release.send(()).unwrap();
    writer.join().unwrap();
    s.barrier();
    assert_eq!(heap.stats().preserved_folios, 0);
    kv.write()
        .unwrap()
        .as_mut()
        .unwrap()
        .insert(77, b"v")
        .unwrap();
}

// ---- crash consistency ------------------------------------------------------

mod crash {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Command;

    use kho_alloc::session::{arm_from_env, FAULT_ENV};

    use super::*;

    const ROLE: &str = "KHO_SESSION_TEST_ROLE";
    const PATH: &str = "KHO_SESSION_TEST_ARENA";
    const EXTRA: u64 = 25;

    /// A second session's subsystem over an already committed heap.
    fn second_probe() -> Box<Probe> {
        Box::new(Probe::new("probe2", "probe-v1").0)
    }

    /// The child: a process that crashes at the armed fault point. Each
    /// role sets up its starting state unarmed, then arms and runs the
    /// step under test.
    #[test]
    fn child() {
        let Ok(role) = std::env::var(ROLE) else {
            return;
        };
        let path = std::path::PathBuf::from(std::env::var(PATH).unwrap());
        match role.as_str() {
            // First handover of a fresh arena.
            "fresh" => {
                let heap = Heap::new(Arena::open(&path).unwrap()).unwrap();
                let (mut s, _kv, _) = predecessor_on(&heap, ENTRIES);
                arm_from_env().unwrap();
                s.prepare().unwrap();
                s.freeze_and_commit().unwrap();
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
                arm_from_env().unwrap();
                s.prepare().unwrap();
                s.freeze_and_commit().unwrap();
            }
            // Generation 2 committed and restorable; a newer handover of
            // the same heap crashes.
            "recommit" => {
                let heap = Heap::new(Arena::open(&path).unwrap()).unwrap();
                let (mut s, _kv, _) = predecessor_on(&heap, ENTRIES);
                s.prepare().unwrap();
                s.freeze_and_commit().unwrap();
                let mut s2 = Session::new(&heap);
                s2.register(second_probe()).unwrap();
                arm_from_env().unwrap();
                s2.prepare().unwrap();
                s2.freeze_and_commit().unwrap();
            }
            // Generation 2 committed; its abort crashes.
            "abort" => {
                let heap = Heap::new(Arena::open(&path).unwrap()).unwrap();
                let (mut s, _kv, _) = predecessor_on(&heap, ENTRIES);
                s.prepare().unwrap();
                s.freeze_and_commit().unwrap();
                arm_from_env().unwrap();
                s.abort().unwrap();
            }
            // The successor of generation 2 crashes in restore or finish.
            "successor" => {
                let (mut s, _, _, _) = successor(&path);
                arm_from_env().unwrap();
                s.restore().unwrap();
                s.finish().unwrap();
            }
            other => panic!("role {other}"),
        }
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

    /// What a fresh process must find after the crash.
    #[derive(Debug, Clone, Copy)]
    enum After {
        /// This generation's handover of the store with `entries`.
        Store { generation: u64, entries: u64 },
        /// The handover of the second session (`probe2` only).
        Second { generation: u64 },
        /// No handover, at this generation.
        Cold { generation: u64 },
    }

    fn check(path: &Path, after: After, what: &str) {
        let arena = Arena::open(path).unwrap();
        match after {
            After::Store {
                generation,
                entries,
            } => {
                assert_eq!(arena.generation(), generation, "{what}");
                drop(arena);
                restore_and_verify(path, generation, entries);
            }
            After::Second { generation } => {
                assert_eq!(arena.generation(), generation, "{what}");
                let (mut s, start) = Session::start(arena).unwrap();
                assert_eq!(start, Start::Handover { generation }, "{what}");
                s.register(second_probe()).unwrap();
                s.restore().unwrap();
                s.finish().unwrap();
                // The first session's store was still preserved by the
                // heap; nobody claims it here, so finish frees it.
                assert!(s.restore_report().unclaimed > 0, "{what}");
            }
            After::Cold { generation } => {
                assert_eq!(arena.generation(), generation, "{what}");
                let (_, start) = Session::start(arena).unwrap();
                assert!(matches!(start, Start::Cold { .. }), "{what}: {start:?}");
            }
        }
    }

    /// Run `role` crashing at `point` by both actions, from the state
    /// `setup` leaves, and check what a fresh process finds.
    fn scenario(role: &str, point: FaultPoint, setup: impl Fn(&Path), after: After) {
        for action in ["kill", "abort"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("arena");
            setup(&path);
            let fault = format!("{}:{action}", point.name());
            let st = run_child(role, &path, &fault);
            let sig = if action == "kill" { 9 } else { 6 };
            assert_eq!(st.signal(), Some(sig), "{role} {fault}: {st:?}");
            check(&path, after, &format!("{role} {fault}"));
        }
    }

    const COMMIT_POINTS: [FaultPoint; 7] = [
        FaultPoint::BeforeFreeze,
        FaultPoint::AfterSubsystemFreeze,
        FaultPoint::AfterImageWrite,
        FaultPoint::AfterImageSync,
        FaultPoint::TornSuperblock,
        FaultPoint::BeforeSlotSync,
        FaultPoint::AfterPublish,
    ];

    fn empty_arena(path: &Path) {
        drop(Arena::create_file(path, &cfg()).unwrap());
    }

    #[test]
    fn a_crash_in_a_first_commit_leaves_no_handover_or_the_new_one() {
        for point in COMMIT_POINTS {
            let after = if point.publishes() {
                After::Store {
                    generation: 2,
                    entries: ENTRIES,
                }
            } else {
                After::Cold { generation: 1 }
            };
            scenario("fresh", point, empty_arena, after);
        }
    }

    #[test]
    fn a_crash_in_a_successors_handover_leaves_the_restored_state_or_the_new_one() {
        for point in COMMIT_POINTS {
            let after = if point.publishes() {
                After::Store {
                    generation: 4,
                    entries: ENTRIES + EXTRA,
                }
            } else {
                After::Cold { generation: 3 }
            };
            scenario("second", point, |p| committed(p, ENTRIES), after);
        }
    }

    /// Generation 2 is committed and restorable; a crash anywhere in the
    /// commit of generation 3 leaves generation 2 restorable intact.
    #[test]
    fn a_committed_generation_survives_a_crash_of_the_next() {
        for point in COMMIT_POINTS {
            let after = if point.publishes() {
                After::Second { generation: 3 }
            } else {
                After::Store {
                    generation: 2,
                    entries: ENTRIES,
                }
            };
            scenario("recommit", point, empty_arena, after);
        }
    }

    #[test]
    fn a_crash_in_abort_leaves_the_handover_or_none() {
        for point in FaultPoint::PUBLISH {
            let after = if point.publishes() {
                After::Cold { generation: 3 }
            } else {
                After::Store {
                    generation: 2,
                    entries: ENTRIES,
                }
            };
            scenario("abort", point, empty_arena, after);
        }
    }

    /// A successor that dies before `finish` recorded the restore leaves
    /// the handover to the next one, intact.
    #[test]
    fn a_crash_in_the_successors_restore_leaves_the_handover() {
        for point in [
            FaultPoint::AfterHeapRestore,
            FaultPoint::AfterSubsystemRestore,
            FaultPoint::TornSuperblock,
            FaultPoint::BeforeSlotSync,
            FaultPoint::AfterPublish,
        ] {
            let after = if point.publishes() {
                After::Cold { generation: 3 }
            } else {
                After::Store {
                    generation: 2,
                    entries: ENTRIES,
                }
            };
            scenario("successor", point, |p| committed(p, ENTRIES), after);
        }
    }

    #[test]
    fn fault_names_round_trip_and_bad_ones_are_refused() {
        assert!(FaultPoint::from_name("nowhere").is_none());
        for p in FaultPoint::ALL {
            assert_eq!(FaultPoint::from_name(p.name()), Some(p));
        }
        assert!(FaultPoint::AfterHeapRestore.in_restore());
        assert!(!FaultPoint::AfterPublish.in_restore());
    }
}

// ---- signal-context frees ---------------------------------------------------

mod signal {
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    use std::sync::OnceLock;

    use kho_alloc::RawObj;

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
    committed(&path, ENTRIES);
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
