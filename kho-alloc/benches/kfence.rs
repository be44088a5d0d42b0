//! KFENCE sampler costs.
//!
//! - `hook/*`: alloc+free of 64 bytes through a stand-in general allocator
//!   (the system allocator) with the sampling hook in front of it: no hook
//!   (baseline), hook with sampling off, hook with the default 100 ms time
//!   gate, and hook with a count gate that practically never fires (the
//!   thread-local decrement alone). Overhead is each one's time over the
//!   baseline's, from the same run.
//! - `heap/*`: the real target: `Heap::alloc(64)` + `Heap::free` (slab size
//!   class through the thread-local magazine) on a heap without KFENCE
//!   (baseline), with the sampler enabled but off, and with the default
//!   100 ms time gate; plus a paired alternating-blocks ratio.
//! - `sampled/alloc_free`: one guarded allocation and its free (page
//!   protection, canaries, stack capture), in µs.
//! - `disable/no_traffic`: `Sampler::disable` while the timer sleeps and no
//!   allocation ever arrives.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kho_alloc::kfence::{
    AnonMemory, CacheTag, Pool, PoolConfig, SampleMode, Sampler, DEFAULT_INTERVAL,
};
use kho_alloc::{Arena, ArenaConfig, GfpFlags, Heap};

const SIZE: usize = 64;
const CACHE: CacheTag = CacheTag::named("size-64");

fn pool(objects: usize) -> Arc<Pool> {
    let memory = AnonMemory::new(PoolConfig::pages_for(objects)).expect("memory");
    let config = PoolConfig {
        objects,
        ..PoolConfig::default()
    };
    let pool = Pool::new(Box::new(memory), config).expect("pool");
    // Keep benchmark output clean should a report ever happen.
    pool.set_sink(Arc::new(|_: &kho_alloc::kfence::Report| {}));
    Arc::new(pool)
}

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 8).expect("layout")
}

#[inline(always)]
fn plain_alloc_free() {
    // SAFETY: the layout has a non-zero size; the block is freed with the
    // same layout right after.
    let p = unsafe { System.alloc(layout()) };
    black_box(p);
    if !p.is_null() {
        // SAFETY: `p` came from System.alloc with this layout and is freed
        // once.
        unsafe { System.dealloc(p, layout()) };
    }
}

/// Alloc+free through the hook as the general allocator would wire it: ask
/// the sampler first, and route the free by address.
#[inline(always)]
fn hooked_alloc_free(sampler: &Sampler) {
    let p = match sampler.alloc(SIZE, 8, CACHE, false) {
        Some(p) => p.as_ptr(),
        // SAFETY: the layout has a non-zero size.
        None => unsafe { System.alloc(layout()) },
    };
    black_box(p);
    if sampler.owns(p) {
        // SAFETY: `p` is a live pool object from this call, never used again.
        let _ = unsafe { sampler.free(p) };
    } else if !p.is_null() {
        // SAFETY: `p` came from System.alloc with this layout and is freed
        // once.
        unsafe { System.dealloc(p, layout()) };
    }
}

/// Alternating blocks of baseline and hooked alloc+free, long enough for the
/// time gate to fire in most blocks: total hooked time over total baseline
/// time, robust to drift that separate criterion runs suffer from on a
/// shared machine.
fn paired_ratio(name: &str, sampler: &Sampler) {
    const OPS: u32 = 5_000_000;
    const ROUNDS: u32 = 12;
    let mut base = Duration::ZERO;
    let mut hooked = Duration::ZERO;
    let before = sampler.stats().total_allocs;
    for round in 0..ROUNDS {
        let run_base = |total: &mut Duration| {
            let t = Instant::now();
            for _ in 0..OPS {
                plain_alloc_free();
            }
            *total += t.elapsed();
        };
        let run_hooked = |total: &mut Duration| {
            let t = Instant::now();
            for _ in 0..OPS {
                hooked_alloc_free(sampler);
            }
            *total += t.elapsed();
        };
        if round % 2 == 0 {
            run_base(&mut base);
            run_hooked(&mut hooked);
        } else {
            run_hooked(&mut hooked);
            run_base(&mut base);
        }
    }
    let n = f64::from(OPS * ROUNDS);
    eprintln!(
        "paired/{name}: baseline {:.2} ns/op, hooked {:.2} ns/op, ratio {:.4} ({} sampled)",
        base.as_nanos() as f64 / n,
        hooked.as_nanos() as f64 / n,
        hooked.as_secs_f64() / base.as_secs_f64(),
        sampler.stats().total_allocs - before,
    );
}

fn hook(c: &mut Criterion) {
    {
        let off = Sampler::new(pool(255), SampleMode::Off).expect("sampler");
        paired_ratio("sampling_off", &off);
        let timed =
            Sampler::new(pool(255), SampleMode::Interval(DEFAULT_INTERVAL)).expect("sampler");
        paired_ratio("interval_100ms", &timed);
    }
    let mut g = c.benchmark_group("hook");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("baseline", |b| b.iter(plain_alloc_free));
    let off = Sampler::new(pool(255), SampleMode::Off).expect("sampler");
    g.bench_function("sampling_off", |b| b.iter(|| hooked_alloc_free(&off)));
    drop(off);
    let timed = Sampler::new(pool(255), SampleMode::Interval(DEFAULT_INTERVAL)).expect("sampler");
    g.bench_function("interval_100ms", |b| b.iter(|| hooked_alloc_free(&timed)));
    let sampled = timed.stats().total_allocs;
    drop(timed);
    eprintln!("hook/interval_100ms: {sampled} sampled allocations during the run");
    let counted = Sampler::new(pool(255), SampleMode::Count(u32::MAX / 2)).expect("sampler");
    g.bench_function("count_gate_fast_path", |b| {
        b.iter(|| hooked_alloc_free(&counted))
    });
    g.finish();
}

fn new_heap() -> Heap {
    let config = ArenaConfig::with_size(256 << 20);
    Heap::new(Arena::anonymous(&config).expect("arena")).expect("heap")
}

#[inline(always)]
fn heap_alloc_free(heap: &Heap) {
    let obj = heap.alloc(SIZE, GfpFlags::NONE).expect("alloc");
    let _ = heap.free(black_box(obj));
}

/// Alternating blocks on two heaps, one without KFENCE and one with the
/// default time gate: total time ratio.
fn heap_paired_ratio(plain: &Heap, sampled: &Heap) {
    const OPS: u32 = 2_000_000;
    const ROUNDS: u32 = 12;
    let run = |h: &Heap, total: &mut Duration| {
        let t = Instant::now();
        for _ in 0..OPS {
            heap_alloc_free(h);
        }
        *total += t.elapsed();
    };
    let (mut base, mut with) = (Duration::ZERO, Duration::ZERO);
    let before = sampled.kfence().map_or(0, |k| k.stats().total_allocs);
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            run(plain, &mut base);
            run(sampled, &mut with);
        } else {
            run(sampled, &mut with);
            run(plain, &mut base);
        }
    }
    let n = f64::from(OPS * ROUNDS);
    eprintln!(
        "paired/heap_interval_100ms: baseline {:.2} ns/op, sampled heap {:.2} ns/op, ratio {:.4} ({} sampled)",
        base.as_nanos() as f64 / n,
        with.as_nanos() as f64 / n,
        with.as_secs_f64() / base.as_secs_f64(),
        sampled.kfence().map_or(0, |k| k.stats().total_allocs) - before,
    );
}

fn heap(c: &mut Criterion) {
    let plain = new_heap();
    let timed = new_heap();
    timed
        .enable_kfence(
            SampleMode::Interval(DEFAULT_INTERVAL),
            PoolConfig::default(),
        )
        .expect("kfence");
    heap_paired_ratio(&plain, &timed);
    let off = new_heap();
    off.enable_kfence(SampleMode::Off, PoolConfig::default())
        .expect("kfence");
    let mut g = c.benchmark_group("heap");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("baseline", |b| b.iter(|| heap_alloc_free(&plain)));
    g.bench_function("sampling_off", |b| b.iter(|| heap_alloc_free(&off)));
    g.bench_function("interval_100ms", |b| b.iter(|| heap_alloc_free(&timed)));
    g.finish();
}

fn sampled(c: &mut Criterion) {
    let mut g = c.benchmark_group("sampled");
    let p = pool(255);
    g.bench_function("alloc_free", |b| {
        b.iter(|| {
            let obj = p.alloc(SIZE, 8, CACHE).expect("slot");
            // SAFETY: `obj` is a live object of `p`, never used again.
            let _ = unsafe { p.free(black_box(obj).as_ptr()) };
        })
    });
    g.finish();
}

fn disable(c: &mut Criterion) {
    let mut g = c.benchmark_group("disable");
    g.sample_size(30);
    let p = pool(4);
    g.bench_function("no_traffic", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let s = Sampler::new(Arc::clone(&p), SampleMode::Interval(DEFAULT_INTERVAL))
                    .expect("sampler");
                let t = Instant::now();
                s.disable();
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, heap, hook, sampled, disable);
criterion_main!(benches);
