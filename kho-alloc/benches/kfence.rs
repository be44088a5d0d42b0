//! KFENCE sampler costs.
//!
//! - `heap/interleaved_interval_100ms`: `Heap::alloc(64)` + `Heap::free`
//!   (slab size class through the thread-local magazine) on a heap with the
//!   default 100 ms time gate, measured in blocks of 10,000 pairs that
//!   alternate (ABBA) with the same work on a heap without KFENCE, inside
//!   every criterion sample: drift of a shared machine hits both alike.
//!   Criterion reports the sampled heap's time; the ratio to the plain heap
//!   (per sample and overall) is printed after the group, with the number
//!   of allocations the gate sampled meanwhile. Short blocks matter: while
//!   a gate is open every heap in the process takes the hook's slower path,
//!   so the plain heap runs a block at most with the gate open.
//! - `sampled/pool_alloc_free`: one guarded allocation and its free straight
//!   from the pool (page protection, canaries, stack capture), in µs.
//! - `sampled/heap_alloc_free`: the same through `Heap::alloc`/`free` with
//!   every request sampled: what one sample costs the heap.
//! - `disable/no_traffic`: `Sampler::disable` while the timer sleeps and no
//!   allocation ever arrives.
//!
//! After `sampled`, the cost of sampling at the default interval is
//! estimated from the same run: 10 samples per second times the cost of one
//! sampled pair, as a share of one core. Deterministic instruction counts
//! of the unsampled path are `scripts/kfence-overhead.sh`'s job.

use std::cell::RefCell;
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
/// Pairs per interleaved block.
const BLOCK: u64 = 10_000;
/// The target: unsampled overhead at the default interval.
const TARGET: f64 = 1.01;

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

fn new_heap() -> Heap {
    let config = ArenaConfig::with_size(256 << 20);
    Heap::new(Arena::anonymous(&config).expect("arena")).expect("heap")
}

#[inline(always)]
fn heap_alloc_free(heap: &Heap) {
    let obj = heap.alloc(SIZE, GfpFlags::NONE).expect("alloc");
    let _ = heap.free(black_box(obj));
}

fn run(heap: &Heap, n: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        heap_alloc_free(heap);
    }
    t.elapsed()
}

fn sampled_count(heap: &Heap) -> u64 {
    heap.kfence().map_or(0, |k| k.stats().total_allocs)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
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
    let samples: RefCell<Vec<(Duration, Duration)>> = RefCell::new(Vec::new());
    let before = sampled_count(&timed);
    let started = Instant::now();
    let mut g = c.benchmark_group("heap");
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("interleaved_interval_100ms", |b| {
        b.iter_custom(|iters| {
            let (mut base, mut with) = (Duration::ZERO, Duration::ZERO);
            let mut left = iters;
            let mut k = 0u64;
            while left > 0 {
                let n = left.min(BLOCK);
                // ABBA: each heap goes first as often as second.
                if k % 4 == 0 || k % 4 == 3 {
                    base += run(&plain, n);
                    with += run(&timed, n);
                } else {
                    with += run(&timed, n);
                    base += run(&plain, n);
                }
                left -= n;
                k += 1;
            }
            samples.borrow_mut().push((base, with));
            with
        })
    });
    g.finish();
    let samples = samples.into_inner();
    let mut ratios: Vec<f64> = samples
        .iter()
        .map(|(b, w)| w.as_secs_f64() / b.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let (base, with) = samples.iter().fold((0.0, 0.0), |(b, w), (sb, sw)| {
        (b + sb.as_secs_f64(), w + sw.as_secs_f64())
    });
    let overall = with / base;
    eprintln!(
        "heap/interleaved_interval_100ms: sampled heap / plain heap = {overall:.4} overall, \
         median {:.4} (quartiles {:.4}..{:.4}) over {} samples; {} allocations sampled in \
         {:.1} s; target <= {TARGET}: {}",
        quantile(&ratios, 0.5),
        quantile(&ratios, 0.25),
        quantile(&ratios, 0.75),
        ratios.len(),
        sampled_count(&timed) - before,
        started.elapsed().as_secs_f64(),
        if quantile(&ratios, 0.5) <= TARGET {
            "met"
        } else {
            "NOT met"
        },
    );
}

fn sampled(c: &mut Criterion) {
    let mut g = c.benchmark_group("sampled");
    let p = pool(255);
    g.bench_function("pool_alloc_free", |b| {
        b.iter(|| {
            let obj = p.alloc(SIZE, 8, CACHE).expect("slot");
            // SAFETY: `obj` is a live object of `p`, never used again.
            let _ = unsafe { p.free(black_box(obj).as_ptr()) };
        })
    });
    let heap = new_heap();
    heap.enable_kfence(SampleMode::Count(1), PoolConfig::default())
        .expect("kfence")
        .pool()
        .set_sink(Arc::new(|_: &kho_alloc::kfence::Report| {}));
    g.bench_function("heap_alloc_free", |b| b.iter(|| heap_alloc_free(&heap)));
    g.finish();
    // The cost of sampling at the default interval, from this run: one
    // sample per interval, each costing one sampled pair.
    const PAIRS: u32 = 2_000;
    let before = sampled_count(&heap);
    let t = Instant::now();
    for _ in 0..PAIRS {
        heap_alloc_free(&heap);
    }
    let per_pair = t.elapsed() / PAIRS;
    assert_eq!(sampled_count(&heap) - before, u64::from(PAIRS));
    let per_second = 1.0 / DEFAULT_INTERVAL.as_secs_f64();
    let busy = per_second * per_pair.as_secs_f64();
    eprintln!(
        "sampling at {DEFAULT_INTERVAL:?}: {per_second:.0} samples/s x {:.1} us per sampled \
         alloc+free = {:.1} us/s, {:.4}% of one core",
        per_pair.as_secs_f64() * 1e6,
        busy * 1e6,
        busy * 100.0,
    );
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

criterion_group!(benches, heap, sampled, disable);
criterion_main!(benches);
