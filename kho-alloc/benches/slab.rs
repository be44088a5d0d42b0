//! Slab alloc+free throughput against `std::alloc::System`, same run.
//!
//! Each iteration allocates a batch of objects and frees them again, so
//! both allocators go through their refill and flush paths, not only the
//! per-thread fast path. `1thread/*` runs on the bench thread; `2threads/*`
//! runs the same loop on two threads at once and reports the combined
//! rate. `preservable/*` is a named preservable cache (locked path, no
//! magazines) for reference. The ratio to report is System time / kho time
//! for the same size and thread count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kho_alloc::{Arena, ArenaConfig, GfpFlags, Heap};

const BATCH: usize = 64;
const SIZES: [usize; 3] = [16, 64, 256];

fn heap() -> Heap {
    Heap::new(Arena::anonymous(&ArenaConfig::with_size(256 << 20)).expect("arena")).expect("heap")
}

fn kho_batch(heap: &Heap, size: usize, objs: &mut Vec<kho_alloc::Obj>) {
    for _ in 0..BATCH {
        objs.push(heap.alloc(size, GfpFlags::NONE).expect("alloc"));
    }
    for o in objs.drain(..) {
        black_box(o.addr());
        heap.free(o).expect("free");
    }
}

fn system_batch(layout: Layout, ptrs: &mut Vec<*mut u8>) {
    for _ in 0..BATCH {
        // SAFETY:
        // - `layout` has a non-zero size.
        ptrs.push(unsafe { System.alloc(layout) });
    }
    for p in ptrs.drain(..) {
        black_box(p);
        // SAFETY:
        // - `p` came from `System.alloc(layout)` above and is freed once.
        unsafe { System.dealloc(p, layout) };
    }
}

/// Run `work` `iters` times on each of two threads; wall time of the whole.
fn two_threads(iters: u64, work: impl Fn() + Sync) -> Duration {
    let barrier = Barrier::new(3);
    let (work, barrier) = (&work, &barrier);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    work();
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        t.elapsed()
    })
}

fn slab(c: &mut Criterion) {
    let heap = heap();
    let mut g = c.benchmark_group("slab_alloc_free/1thread");
    g.throughput(Throughput::Elements(BATCH as u64));
    for size in SIZES {
        let mut objs = Vec::with_capacity(BATCH);
        g.bench_with_input(BenchmarkId::new("kho", size), &size, |b, &size| {
            b.iter(|| kho_batch(&heap, size, &mut objs))
        });
        let layout = Layout::from_size_align(size, 8).expect("layout");
        let mut ptrs = Vec::with_capacity(BATCH);
        g.bench_with_input(BenchmarkId::new("system", size), &size, |b, _| {
            b.iter(|| system_batch(layout, &mut ptrs))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("slab_alloc_free/2threads");
    g.throughput(Throughput::Elements(2 * BATCH as u64));
    for size in SIZES {
        g.bench_with_input(BenchmarkId::new("kho", size), &size, |b, &size| {
            b.iter_custom(|iters| {
                two_threads(iters, || {
                    let mut objs = Vec::with_capacity(BATCH);
                    kho_batch(&heap, size, &mut objs);
                })
            })
        });
        let layout = Layout::from_size_align(size, 8).expect("layout");
        g.bench_with_input(BenchmarkId::new("system", size), &size, |b, _| {
            b.iter_custom(|iters| {
                two_threads(iters, || {
                    let mut ptrs = Vec::with_capacity(BATCH);
                    system_batch(layout, &mut ptrs);
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("slab_alloc_free/preservable");
    g.throughput(Throughput::Elements(BATCH as u64));
    for size in SIZES {
        let cache = heap
            .cache(&format!("bench-{size}"), size as u32, 8)
            .expect("cache");
        let mut objs = Vec::with_capacity(BATCH);
        g.bench_with_input(BenchmarkId::new("kho", size), &size, |b, _| {
            b.iter(|| {
                for _ in 0..BATCH {
                    objs.push(cache.alloc(GfpFlags::NONE).expect("alloc"));
                }
                for o in objs.drain(..) {
                    cache.free(o).expect("free");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, slab);
criterion_main!(benches);
