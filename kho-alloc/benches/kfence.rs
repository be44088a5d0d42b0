//! KFENCE sampler costs.
//!
//! - `heap/interleaved_interval_100ms`: `Heap::alloc(64)` + `Heap::free`
//!   (slab size class through the thread-local magazine) on a heap
//!   sampling at the default 100 ms interval, measured in blocks of 10,000
//!   pairs that alternate (ABBA) with the same work on a heap whose sampler
//!   is off, inside every criterion sample: drift of a shared machine hits
//!   both alike. Each heap runs on a thread of its own (taking turns, never
//!   at once, both pinned to one CPU), where it is the only heap in the
//!   thread's magazine list. Both heaps have a pool attached, so their memory layouts
//!   match (a heap with no pool at all runs the same instructions, as
//!   `scripts/kfence-overhead.sh` counts, yet differs in time by placement
//!   alone, by a few percent either way on a small machine).
//! - `heap/interleaved_control_off`: the same between two heaps that are
//!   both off: the heap-to-heap bias of this run, to read the first
//!   against.
//!
//!   Criterion reports the second heap's time; printed after each are the
//!   median of the ratios of adjacent blocks (robust to a block hit by
//!   preemption) with its 95% interval, the total time ratio, and the
//!   allocations sampled meanwhile. Short blocks matter: while a gate is
//!   open every heap in the process takes the hook's out-of-line check, so
//!   the other heap runs at most one block with the gate open.
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
use std::sync::{mpsc, Arc};
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

/// The `q` quantile of `sorted`, or NaN when it is empty (criterion's
/// `--list` and `--test` modes run no or few blocks).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let i = (last as f64 * q).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// A heap with a sampler attached in `mode`.
fn heap_with(mode: SampleMode) -> Heap {
    let heap = new_heap();
    heap.enable_kfence(mode, PoolConfig::default())
        .expect("kfence");
    heap
}

/// A thread that runs blocks of alloc+free pairs on one heap when asked
/// and answers with their time. Each heap gets its own thread so that it is
/// the only heap in that thread's magazine list: a thread finds its
/// magazines for a heap by a linear search, so a heap it met second would
/// pay a few instructions more per pair than the first.
struct Worker {
    ask: mpsc::Sender<u64>,
    done: mpsc::Receiver<Duration>,
}

impl Worker {
    /// A worker on CPU `cpu` (both workers of a comparison share one, so
    /// that neither gets the quieter core or the warmer caches).
    fn new(heap: Arc<Heap>, cpu: usize) -> Worker {
        let (ask, asked) = mpsc::channel::<u64>();
        let (tell, done) = mpsc::channel();
        std::thread::spawn(move || {
            pin(cpu);
            for n in asked {
                if tell.send(run(&heap, n)).is_err() {
                    break;
                }
            }
        });
        Worker { ask, done }
    }

    fn block(&self, n: u64) -> Duration {
        self.ask.send(n).expect("worker");
        self.done.recv().expect("worker")
    }
}

/// Pins the calling thread to `cpu`; a failure leaves it unpinned.
fn pin(cpu: usize) {
    let set = std::mem::MaybeUninit::<libc::cpu_set_t>::zeroed();
    // SAFETY: all-zero is an empty cpu_set_t.
    let mut set = unsafe { set.assume_init() };
    // SAFETY: `set` is a valid cpu_set_t; CPU_SET ignores a CPU past its end.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// The CPU the calling thread runs on.
fn current_cpu() -> usize {
    // SAFETY: sched_getcpu has no preconditions.
    usize::try_from(unsafe { libc::sched_getcpu() }).unwrap_or(0)
}

/// Benchmarks `b` interleaved with `a` (see the module documentation) and
/// prints the ratio of `b` to `a`; returns its median.
fn interleaved(c: &mut Criterion, name: &str, a: &Arc<Heap>, b: &Arc<Heap>) -> f64 {
    let cpu = current_cpu();
    let (wa, wb) = (
        Worker::new(Arc::clone(a), cpu),
        Worker::new(Arc::clone(b), cpu),
    );
    // Per adjacent pair of blocks (run within a millisecond of each other):
    // b's time over a's; and the totals.
    let blocks: RefCell<Vec<f64>> = RefCell::new(Vec::new());
    let totals = RefCell::new((Duration::ZERO, Duration::ZERO));
    let before = sampled_count(b);
    let started = Instant::now();
    let mut g = c.benchmark_group("heap");
    g.measurement_time(Duration::from_secs(10));
    g.bench_function(name, |bench| {
        bench.iter_custom(|iters| {
            let mut b_total = Duration::ZERO;
            let mut left = iters;
            let mut k = 0u64;
            while left > 0 {
                let n = left.min(BLOCK);
                // ABBA: each heap goes first as often as second.
                let (ta, tb) = if k % 4 == 0 || k % 4 == 3 {
                    let ta = wa.block(n);
                    (ta, wb.block(n))
                } else {
                    let tb = wb.block(n);
                    (wa.block(n), tb)
                };
                blocks
                    .borrow_mut()
                    .push(tb.as_secs_f64() / ta.as_secs_f64());
                let mut t = totals.borrow_mut();
                t.0 += ta;
                t.1 += tb;
                b_total += tb;
                left -= n;
                k += 1;
            }
            b_total
        })
    });
    g.finish();
    let mut ratios = blocks.into_inner();
    ratios.sort_by(f64::total_cmp);
    let (ta, tb) = totals.into_inner();
    if ratios.is_empty() {
        // Listed, not measured.
        return f64::NAN;
    }
    let median = quantile(&ratios, 0.5);
    let iqr = quantile(&ratios, 0.75) - quantile(&ratios, 0.25);
    // The median's 95% interval by the notch rule: +-1.58 IQR / sqrt(n).
    let half = 1.58 * iqr / (ratios.len() as f64).sqrt();
    eprintln!(
        "heap/{name}: median of {} adjacent {BLOCK}-pair block ratios = {median:.4} \
         (95% interval {:.4}..{:.4}); total time ratio {:.4}; {} allocations sampled in \
         {:.1} s",
        ratios.len(),
        median - half,
        median + half,
        tb.as_secs_f64() / ta.as_secs_f64(),
        sampled_count(b) - before,
        started.elapsed().as_secs_f64(),
    );
    median
}

fn heap(c: &mut Criterion) {
    let off = Arc::new(heap_with(SampleMode::Off));
    let on = Arc::new(heap_with(SampleMode::Interval(DEFAULT_INTERVAL)));
    let off2 = Arc::new(heap_with(SampleMode::Off));
    let ratio = interleaved(c, "interleaved_interval_100ms", &off, &on);
    let control = interleaved(c, "interleaved_control_off", &off, &off2);
    if ratio.is_nan() {
        return;
    }
    eprintln!(
        "heap: sampling at {DEFAULT_INTERVAL:?} over sampling off = {ratio:.4} \
         (target <= {TARGET}: {}); two heaps both off, same run: {control:.4}",
        if ratio <= TARGET { "met" } else { "NOT met" },
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
