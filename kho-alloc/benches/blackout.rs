//! The handover blackout of a key-value store of 1,000,000 entries with
//! 100-byte values on a 4 GiB arena (target: freeze + commit + restore at
//! most 50 ms, the `exec` itself excluded), on a memfd and on a file on
//! disk, and the same with a real `exec` of a successor.
//!
//! Each sample of `blackout_1m_entries_4g_{memfd,disk}` is one full
//! handover cycle: `prepare` (untimed), `freeze` (sampler disable,
//! deferred-free drain, subsystem nodes, slab scrub and image write),
//! `commit` (`msync` of the image and superblock publish), then the
//! predecessor goes away (untimed) and a successor in the same process
//! takes the arena over (`restore`): it opens and maps it — the memfd
//! through a duplicate of the descriptor, as a successor started by `exec`
//! holds it; the disk file by its path, as a restarted service does — then
//! starts, restores and finishes its session. The successor is the
//! predecessor of the next sample.
//!
//! `blackout_exec_1m_entries_4g_memfd/freeze_to_serving` spawns this
//! benchmark binary as the successor, with the memfd inherited: each sample
//! is freeze start in the predecessor to the successor serving (after
//! `finish`), which adds process creation, `exec`, dynamic loading and
//! `main` to the parts above. The successor then hands the store back
//! (untimed). A real `exec` replacing the predecessor also tears its
//! mappings down first; `kho demo` measures that path.
//!
//! Baseline in the same run: `copy_out`, copying every entry (key and
//! value, walked through the index) out of the store into one buffer — the
//! least a handover that does not preserve memory in place would do before
//! its successor could even start reading it back.

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use kho_alloc::deferred::DeferredFrees;
use kho_alloc::kfence::{AnonMemory, Pool, PoolConfig, SampleMode, Sampler};
use kho_alloc::kv::demo::fill_value;
use kho_alloc::kv::{KvConfig, KvHandle, KvStore, KvSubsystem};
use kho_alloc::session::{self, monotonic_ns, Session, Start};
use kho_alloc::{Arena, ArenaConfig, Heap};

const ENTRIES: u64 = 1_000_000;
const VALUE: u32 = 100;
const ARENA: u64 = 4 << 30;
/// Set in the environment of the spawned successor.
const CHILD_ENV: &str = "KHO_BLACKOUT_SUCCESSOR";

fn kv_cfg() -> KvConfig {
    KvConfig {
        capacity: ENTRIES,
        value_size: VALUE,
    }
}

/// Where the arena lives.
enum Backing {
    /// A memfd and a duplicate of its descriptor that outlives each
    /// cycle's arena (the same open file, as an inherited descriptor).
    Memfd(File),
    /// A file on disk, reopened by path, in a directory of its own (test
    /// runners run each benchmark in a process of its own, concurrently)
    /// that is removed with it.
    Disk {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
}

impl Backing {
    fn create(disk: bool) -> (Backing, Arena) {
        let cfg = ArenaConfig::with_size(ARENA);
        if disk {
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
            let path = dir.path().join("blackout.arena");
            let arena = Arena::create_file(&path, &cfg).expect("disk arena");
            (Backing::Disk { _dir: dir, path }, arena)
        } else {
            let arena = Arena::create_memfd("kho-blackout", &cfg).expect("memfd arena");
            let keep = arena.file().expect("memfd").try_clone().expect("dup");
            (Backing::Memfd(keep), arena)
        }
    }

    /// The successor's arena: opened and mapped anew.
    fn open(&self) -> Arena {
        match self {
            Backing::Memfd(keep) => {
                Arena::open_file(keep.try_clone().expect("dup")).expect("open memfd")
            }
            Backing::Disk { path, .. } => Arena::open(path).expect("open file"),
        }
    }
}

struct Live {
    session: Session,
    kv: KvHandle,
}

fn sampler() -> Arc<Sampler> {
    let memory = AnonMemory::new(PoolConfig::pages_for(64)).expect("kfence memory");
    let pool = Pool::new(
        Box::new(memory),
        PoolConfig {
            objects: 64,
            ..PoolConfig::default()
        },
    )
    .expect("kfence pool");
    let mode = SampleMode::Interval(Duration::from_millis(100));
    Arc::new(Sampler::new(Arc::new(pool), mode).expect("sampler"))
}

fn attach(session: &mut Session) {
    let heap = session.heap().expect("heap").clone();
    session.attach_sampler(sampler(), SampleMode::Interval(Duration::from_millis(100)));
    session.attach_deferred(Arc::new(DeferredFrees::new(&heap)));
}

fn first(arena: Arena) -> Live {
    let heap = Heap::new(arena).expect("heap");
    let mut kv = KvStore::new(&heap, kv_cfg()).expect("store");
    let mut v = vec![0u8; VALUE as usize];
    for k in 0..ENTRIES {
        fill_value(k, &mut v);
        kv.insert(k, &v).expect("insert");
    }
    let kv: KvHandle = Arc::new(RwLock::new(Some(kv)));
    let mut session = Session::new(&heap);
    session
        .register(Box::new(KvSubsystem::new("kv", Arc::clone(&kv), kv_cfg())))
        .expect("register");
    attach(&mut session);
    Live { session, kv }
}

/// A successor over `arena`: start, restore, finish.
fn take_over(arena: Arena) -> Live {
    let (mut session, start) = Session::start(arena).expect("start");
    assert!(matches!(start, Start::Handover { .. }), "{start:?}");
    let kv: KvHandle = Arc::new(RwLock::new(None));
    session
        .register(Box::new(KvSubsystem::new("kv", Arc::clone(&kv), kv_cfg())))
        .expect("register");
    session.restore().expect("restore");
    session.finish().expect("finish");
    Live { session, kv }
}

fn entries(live: &Live) -> u64 {
    live.kv
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map_or(0, KvStore::len)
}

/// Durations of one cycle: (freeze, commit, restore).
fn cycle(live: Live, backing: &Backing) -> (Live, Duration, Duration, Duration) {
    let Live { mut session, kv } = live;
    session.prepare().expect("prepare");
    let t = Instant::now();
    session.freeze().expect("freeze");
    let freeze = t.elapsed();
    let t = Instant::now();
    session.commit().expect("commit");
    let commit = t.elapsed();
    // The predecessor is gone before its successor maps the arena.
    drop(session);
    drop(kv);
    let t = Instant::now();
    let mut next = take_over(backing.open());
    let restore = t.elapsed();
    attach(&mut next.session);
    assert_eq!(entries(&next), ENTRIES);
    (next, freeze, commit, restore)
}

fn in_process(c: &mut Criterion, disk: bool) {
    let name = if disk {
        "blackout_1m_entries_4g_disk"
    } else {
        "blackout_1m_entries_4g_memfd"
    };
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.warm_up_time(Duration::from_secs(1));
    let (backing, arena) = Backing::create(disk);
    let mut live = Some(first(arena));
    // (part selector) 0 freeze, 1 commit, 2 restore, 3 all three.
    for (name, part) in [
        ("freeze", 0),
        ("commit", 1),
        ("restore", 2),
        ("freeze+commit+restore", 3),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (next, f, c, r) = cycle(live.take().expect("live"), &backing);
                    live = Some(next);
                    total += match part {
                        0 => f,
                        1 => c,
                        2 => r,
                        _ => f + c + r,
                    };
                }
                total
            })
        });
    }
    let l = live.take().expect("live");
    if !disk {
        g.bench_function("copy_out (baseline)", |b| {
            let guard = l.kv.read().unwrap_or_else(PoisonError::into_inner);
            let store = guard.as_ref().expect("store");
            let mut out = Vec::with_capacity((ENTRIES * u64::from(VALUE + 16)) as usize);
            b.iter(|| {
                out.clear();
                store
                    .for_each(|k, v| {
                        out.extend_from_slice(&k.to_le_bytes());
                        out.extend_from_slice(v);
                    })
                    .expect("walk");
                out.len()
            })
        });
    }
    g.finish();
    drop(l);
}

fn blackout(c: &mut Criterion) {
    in_process(c, false);
    in_process(c, true);
    across_exec(c);
}

/// One handover to a spawned successor: freeze start to the successor
/// serving. The successor hands the store back before it exits.
fn exec_cycle(live: Live, backing: &Backing) -> (Live, Duration) {
    let Live { mut session, kv } = live;
    session.prepare().expect("prepare");
    session.freeze_and_commit().expect("freeze and commit");
    let started = session.freeze_report().started_ns;
    let (var, fd) = session.exec_env().expect("exec env");
    let out = Command::new(std::env::current_exe().expect("bench binary"))
        .env(CHILD_ENV, "1")
        .env(var, fd)
        .output()
        .expect("spawn the successor");
    assert!(
        out.status.success(),
        "successor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serving: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("the successor's serving time");
    drop(session);
    drop(kv);
    // Back from the successor (untimed).
    let mut next = take_over(backing.open());
    attach(&mut next.session);
    assert_eq!(entries(&next), ENTRIES);
    (next, Duration::from_nanos(serving.saturating_sub(started)))
}

fn across_exec(c: &mut Criterion) {
    let mut g = c.benchmark_group("blackout_exec_1m_entries_4g_memfd");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.warm_up_time(Duration::from_secs(1));
    let (backing, arena) = Backing::create(false);
    let mut live = Some(first(arena));
    g.bench_function("freeze_to_serving", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (next, d) = exec_cycle(live.take().expect("live"), &backing);
                live = Some(next);
                total += d;
            }
            total
        })
    });
    g.finish();
}

/// The spawned successor: restore from the inherited memfd, report when
/// it serves, hand the store back, exit.
fn successor() {
    let arena = session::inherited_arena()
        .expect("inherited arena")
        .expect("KHO_ARENA_FD set");
    let mut live = take_over(arena);
    let serving = monotonic_ns();
    assert_eq!(entries(&live), ENTRIES);
    live.session.prepare().expect("prepare");
    live.session.freeze_and_commit().expect("hand back");
    println!("{serving}");
}

criterion_group!(benches, blackout);

fn main() {
    if std::env::var_os(CHILD_ENV).is_some() {
        successor();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
