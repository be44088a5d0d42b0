//! The handover blackout of a key-value store of 1,000,000 entries with
//! 100-byte values on a 4 GiB memfd arena (target: freeze + commit +
//! restore at most 50 ms, the `exec` itself excluded).
//!
//! Each sample is one full handover cycle: `prepare` (untimed), `freeze`
//! (sampler disable, deferred-free drain, subsystem nodes, slab scrub and
//! image write), `commit` (`msync` and superblock publish), then a successor
//! in the same process maps the memfd anew through a duplicate of its
//! descriptor (as an `exec`'d successor inherits it), and restores and
//! finishes its session (`restore`). The successor is the
//! predecessor of the next sample.
//!
//! Baseline in the same run: `copy_out`, copying every entry (key and
//! value, walked through the index) out of the store into one buffer — the least a handover that does not preserve
//! memory in place would do before its successor could even start reading
//! it back.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kho_alloc::deferred::DeferredFrees;
use kho_alloc::kfence::{AnonMemory, Pool, PoolConfig, SampleMode, Sampler};
use kho_alloc::kv::demo::fill_value;
use kho_alloc::kv::{KvConfig, KvHandle, KvStore, KvSubsystem};
use kho_alloc::session::{Session, Start};
use kho_alloc::{Arena, ArenaConfig, Heap};

const ENTRIES: u64 = 1_000_000;
const VALUE: u32 = 100;

fn kv_cfg() -> KvConfig {
    KvConfig {
        capacity: ENTRIES,
        value_size: VALUE,
    }
}

struct Live {
    session: Session,
    kv: KvHandle,
    keep: std::fs::File,
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

fn attach(session: &mut Session, heap: &Heap) {
    let s = sampler();
    session.attach_sampler(s, SampleMode::Interval(Duration::from_millis(100)));
    session.attach_deferred(Arc::new(DeferredFrees::new(heap)));
}

fn first() -> Live {
    let arena =
        Arena::create_memfd("kho-blackout", &ArenaConfig::with_size(4 << 30)).expect("arena");
    // A descriptor of the memfd that outlives every arena of the run, for
    // each successor to map the same memory from (it shares the arena's
    // open file description, and so its lock).
    let keep = arena.file().expect("memfd").try_clone().expect("dup");
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
    attach(&mut session, &heap);
    Live { session, kv, keep }
}

/// Durations of one cycle: (freeze, commit, restore).
fn cycle(live: Live) -> (Live, Duration, Duration, Duration) {
    let Live {
        mut session,
        kv,
        keep,
    } = live;
    session.prepare().expect("prepare");
    let t = Instant::now();
    session.freeze().expect("freeze");
    let freeze = t.elapsed();
    let t = Instant::now();
    session.commit().expect("commit");
    let commit = t.elapsed();
    // The predecessor is gone before its successor maps the same memfd.
    drop(session);
    drop(kv);
    let arena = Arena::open_file(keep.try_clone().expect("dup")).expect("reopen");
    let t = Instant::now();
    let (mut session, start) = Session::start(arena).expect("start");
    assert!(matches!(start, Start::Handover { .. }));
    let kv: KvHandle = Arc::new(RwLock::new(None));
    session
        .register(Box::new(KvSubsystem::new("kv", Arc::clone(&kv), kv_cfg())))
        .expect("register");
    session.restore().expect("restore");
    session.finish().expect("finish");
    let restore = t.elapsed();
    let heap = session.heap().expect("heap").clone();
    attach(&mut session, &heap);
    let len = kv
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map_or(0, KvStore::len);
    assert_eq!(len, ENTRIES);
    (Live { session, kv, keep }, freeze, commit, restore)
}

fn blackout(c: &mut Criterion) {
    let mut g = c.benchmark_group("blackout_1m_entries_4g_arena");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    g.warm_up_time(Duration::from_secs(1));
    let mut live = Some(first());
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
                    let (next, f, c, r) = cycle(live.take().expect("live"));
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
    g.finish();
}

criterion_group!(benches, blackout);
criterion_main!(benches);
