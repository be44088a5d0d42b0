//! Slab alloc+free throughput against `std::alloc::System`, same run.
//!
//! Each iteration allocates a batch of objects and frees them again, so
//! both allocators go through their refill and flush paths, not only the
//! per-thread fast path. `1thread/*` runs on the bench thread; `2threads/*`
//! runs the same loop on two threads at once and reports the combined
//! rate. `preservable/*` is a named preservable cache (locked path, no
//! magazines) for reference.
//!
//! The ratio to report is System time / kho time for the same size and
//! thread count (target: at least 1.0). After the criterion groups the
//! bench computes it and prints one line per size and thread count,
//! `slab ratio <threads>thread <size>B system/kho = <ratio>`, from rounds
//! of the two loops interleaved (the median of each side), so that both
//! sides see the same machine state.

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

/// Rounds per ratio, and batches per round and thread.
const ROUNDS: usize = 11;
const ROUND_BATCHES: u64 = 2_000;

/// Wall time of `iters` runs of `work` on one thread.
fn one_thread(iters: u64, mut work: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..iters {
        work();
    }
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// System time / kho time for every size and thread count of the groups
/// above, printed to standard error. Only a measuring run (`--bench`)
/// computes them; test runners list and smoke-test the groups without it.
fn ratios(_: &mut Criterion) {
    let mut args = std::env::args();
    if !args.any(|a| a == "--bench") || std::env::args().any(|a| a == "--list") {
        return;
    }
    let heap = heap();
    for threads in [1, 2] {
        for size in SIZES {
            let layout = Layout::from_size_align(size, 8).expect("layout");
            let (mut kho, mut system) = (Vec::new(), Vec::new());
            let mut objs = Vec::with_capacity(BATCH);
            let mut ptrs = Vec::with_capacity(BATCH);
            for _ in 0..ROUNDS {
                if threads == 1 {
                    kho.push(one_thread(ROUND_BATCHES, || {
                        kho_batch(&heap, size, &mut objs)
                    }));
                    system.push(one_thread(ROUND_BATCHES, || {
                        system_batch(layout, &mut ptrs)
                    }));
                } else {
                    kho.push(two_threads(ROUND_BATCHES, || {
                        kho_batch(&heap, size, &mut Vec::with_capacity(BATCH))
                    }));
                    system.push(two_threads(ROUND_BATCHES, || {
                        system_batch(layout, &mut Vec::with_capacity(BATCH))
                    }));
                }
            }
            let (k, s) = (median(kho), median(system));
            eprintln!(
                "slab ratio {threads}thread {size}B system/kho = {:.2}",
                s.as_secs_f64() / k.as_secs_f64().max(f64::MIN_POSITIVE)
            );
        }
    }
}

criterion_group!(benches, slab, ratios);
criterion_main!(benches);
