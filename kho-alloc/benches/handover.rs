//! Freeze and restore of a 1 GiB arena holding 1,000,000 live 64-byte
//! objects in a preservable cache (target: at most 50 ms each).
//!
//! - `freeze`: preserve every slab page, scrub, build and write the image
//!   (then discard it, untimed work being nil).
//! - `restore`: parse the image, claim the preserved folios, release the
//!   rest, and rebuild the cache with its live objects (their handles are
//!   handed out lazily, from per-slab bitmaps, so this costs time per slab
//!   page rather than per object). Each sample restores an arena that the
//!   previous sample froze and committed again (untimed).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kho_alloc::{Arena, ArenaConfig, GfpFlags, Heap};

const OBJECTS: usize = 1_000_000;

fn populated() -> Heap {
    let heap = Heap::new(Arena::anonymous(&ArenaConfig::default()).expect("arena")).expect("heap");
    let kv = heap.cache("kv", 64, 8).expect("cache");
    for i in 0..OBJECTS {
        let mut o = kv.alloc(GfpFlags::NONE).expect("alloc");
        heap.bytes_mut(&mut o).expect("bytes")[..8].copy_from_slice(&(i as u64).to_le_bytes());
        o.leak();
    }
    heap
}

fn handover(c: &mut Criterion) {
    let mut g = c.benchmark_group("handover_1m_objects");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    let heap = populated();
    g.bench_function("freeze", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let frozen = heap.freeze(None).expect("freeze");
                total += t.elapsed();
                assert_eq!(frozen.stats().live_objects, OBJECTS as u64);
                heap.discard(frozen).expect("discard");
            }
            total
        })
    });
    heap.freeze_and_commit(None).expect("commit");
    let mut arena = Some(heap.into_arena().expect("sole owner"));
    g.bench_function("restore", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let a = arena.take().expect("arena");
                let t = Instant::now();
                let (heap, restored) = Heap::restore(a).expect("restore");
                total += t.elapsed();
                let live: usize = restored.caches.iter().map(|c| c.len()).sum();
                assert_eq!(live, OBJECTS);
                drop(restored);
                heap.freeze_and_commit(None).expect("commit");
                arena = Some(heap.into_arena().expect("sole owner"));
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, handover);
criterion_main!(benches);
