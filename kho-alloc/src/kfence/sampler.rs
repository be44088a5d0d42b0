//! Sampling gates: which allocation requests go to the pool.

use std::cell::Cell;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kho_core::PhysAddr;

use super::pool::{CacheTag, Pool, Stats};
use super::report::Report;
use super::{KfenceError, Result};

/// Default time-gate interval, as the kernel's `kfence.sample_interval`.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);

/// How requests are chosen for the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleMode {
    /// Nothing is sampled.
    Off,
    /// A background timer opens the gate once per interval; the first
    /// eligible request after that is sampled.
    Interval(Duration),
    /// Each thread samples one request out of a randomized countdown with
    /// mean `rate` (GWP-ASan style); `Count(1)` samples every eligible
    /// request.
    Count(u32),
}

impl Default for SampleMode {
    fn default() -> Self {
        SampleMode::Interval(DEFAULT_INTERVAL)
    }
}

/// Gate states: one byte, so the unsampled path is a single relaxed load and
/// compare. The timer only ever moves `CLOSED` to `OPEN`.
const OFF: u8 = 0;
const CLOSED: u8 = 1;
const OPEN: u8 = 2;
const COUNT: u8 = 3;

/// Process-wide number of gates that may sample right now: open time gates
/// plus count-mode samplers. While it is zero no request anywhere is
/// sampled, so an allocator's hook costs one relaxed load of a global (the
/// role the kernel's static key plays for KFENCE). It may be transiently
/// off by one while a gate opens and closes concurrently; that only costs a
/// look at the gate itself.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Whether any sampler in the process may sample the next request. `false`
/// means the request is certainly not sampled; allocators call this before
/// touching their sampler.
#[inline(always)]
pub fn may_sample() -> bool {
    ACTIVE.load(Ordering::Relaxed) != 0
}

/// Whether a gate state counts in [`ACTIVE`].
const fn active(state: u8) -> bool {
    state == OPEN || state == COUNT
}

/// Moves `gate` to `new`, keeping [`ACTIVE`] in step.
fn set_gate(gate: &AtomicU8, new: u8) {
    let old = gate.swap(new, Ordering::AcqRel);
    match (active(old), active(new)) {
        (false, true) => {
            ACTIVE.fetch_add(1, Ordering::Relaxed);
        }
        (true, false) => {
            ACTIVE.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

thread_local! {
    /// Requests left before this thread's next sample; 0 means "draw".
    static COUNTDOWN: Cell<u32> = const { Cell::new(0) };
    /// This thread's xorshift state; 0 means "seed me".
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A uniform draw in `1..=2 * rate - 1`, mean `rate`.
fn draw(rate: u32) -> u32 {
    let rate = rate.max(1);
    let span = u64::from(rate) * 2 - 1;
    RNG.with(|r| {
        let mut x = r.get();
        if x == 0 {
            // Seed from the thread-local's address and the clock: distinct per
            // thread, no dependency needed.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            x = (r as *const Cell<u64> as u64).rotate_left(29) ^ t | 1;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        r.set(x);
        u32::try_from(1 + x % span).unwrap_or(rate)
    })
}

struct Timer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

/// Feeds a [`Pool`] with sampled allocation requests.
///
/// The embedding allocator asks [`Sampler::alloc`] first on every request;
/// it returns `None` (the caller proceeds normally) unless the request is
/// sampled and the pool can serve it. While no gate in the process is open
/// the unsampled path is one relaxed load of a global ([`may_sample`]);
/// otherwise one more load of the gate byte, or a thread-local decrement
/// (count gate).
pub struct Sampler {
    gate: Arc<AtomicU8>,
    rate: AtomicU32,
    pool_base: usize,
    pool_len: usize,
    pool: Arc<Pool>,
    timer: Mutex<Option<Timer>>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("pool", &self.pool)
            .field("gate", &self.gate.load(Ordering::Relaxed))
            .field("rate", &self.rate.load(Ordering::Relaxed))
            .finish()
    }
}

impl Sampler {
    /// A sampler over `pool`, started in `mode`.
    pub fn new(pool: Arc<Pool>, mode: SampleMode) -> Result<Sampler> {
        let (pool_base, pool_len) = pool.bounds();
        let s = Sampler {
            gate: Arc::new(AtomicU8::new(OFF)),
            rate: AtomicU32::new(1),
            pool_base,
            pool_len,
            pool,
            timer: Mutex::new(None),
        };
        s.enable(mode)?;
        Ok(s)
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Switches to `mode`, stopping or starting the timer as needed.
    pub fn enable(&self, mode: SampleMode) -> Result<()> {
        self.disable();
        match mode {
            SampleMode::Off => Ok(()),
            SampleMode::Count(rate) => {
                if rate == 0 {
                    return Err(KfenceError::Rate {
                        expected: 1,
                        found: 0,
                    });
                }
                self.rate.store(rate, Ordering::Relaxed);
                set_gate(&self.gate, COUNT);
                self.pool.shared().enabled.store(true, Ordering::Relaxed);
                Ok(())
            }
            SampleMode::Interval(interval) => {
                if interval.is_zero() {
                    return Err(KfenceError::Rate {
                        expected: 1,
                        found: 0,
                    });
                }
                let stop = Arc::new(AtomicBool::new(false));
                let gate = Arc::clone(&self.gate);
                let thread_stop = Arc::clone(&stop);
                let handle = thread::Builder::new()
                    .name("kfence-timer".into())
                    .spawn(move || {
                        // Opens the gate once per interval. It never waits for
                        // an allocation to take the gate, so stopping it only
                        // needs an unpark.
                        while !thread_stop.load(Ordering::Acquire) {
                            thread::park_timeout(interval);
                            if thread_stop.load(Ordering::Acquire) {
                                break;
                            }
                            if gate
                                .compare_exchange(
                                    CLOSED,
                                    OPEN,
                                    Ordering::Release,
                                    Ordering::Relaxed,
                                )
                                .is_ok()
                            {
                                ACTIVE.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                    .map_err(|source| KfenceError::Timer { source })?;
                *self.timer.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Timer { stop, handle });
                set_gate(&self.gate, CLOSED);
                self.pool.shared().enabled.store(true, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Stops sampling and the timer. Bounded: it wakes the timer thread and
    /// joins it, waiting on nothing that needs allocation traffic.
    /// Objects already in the pool stay valid and can still be freed.
    pub fn disable(&self) {
        set_gate(&self.gate, OFF);
        self.pool.shared().enabled.store(false, Ordering::Relaxed);
        let timer = self.timer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = timer {
            t.stop.store(true, Ordering::Release);
            t.handle.thread().unpark();
            // The timer body cannot panic; a join error leaves nothing to do.
            let _ = t.handle.join();
        }
    }

    /// Whether sampling is on.
    pub fn is_enabled(&self) -> bool {
        self.gate.load(Ordering::Relaxed) != OFF
    }

    /// Whether the time gate is open (for tests and diagnostics).
    pub fn gate_open(&self) -> bool {
        self.gate.load(Ordering::Relaxed) == OPEN
    }

    /// Statistics of the pool, with `enabled` from this sampler.
    pub fn stats(&self) -> Stats {
        self.pool.stats()
    }

    /// Offers an allocation request to the pool. `preservable` requests (the
    /// allocator's `PRESERVE` flag) are never sampled. Returns the guarded
    /// object if the request was sampled and served; otherwise the caller
    /// allocates normally.
    #[inline]
    pub fn alloc(
        &self,
        size: usize,
        align: usize,
        cache: CacheTag,
        preservable: bool,
    ) -> Option<NonNull<u8>> {
        self.alloc_with(size, align, || cache, preservable)
    }

    #[inline(always)]
    fn alloc_with(
        &self,
        size: usize,
        align: usize,
        cache: impl FnOnce() -> CacheTag,
        preservable: bool,
    ) -> Option<NonNull<u8>> {
        if !may_sample() {
            return None;
        }
        match self.gate.load(Ordering::Relaxed) {
            OPEN => self.alloc_gated(size, align, cache(), preservable),
            COUNT => {
                let left = COUNTDOWN.with(Cell::get);
                if left > 1 {
                    COUNTDOWN.with(|c| c.set(left - 1));
                    return None;
                }
                self.alloc_counted(left, size, align, cache(), preservable)
            }
            _ => None,
        }
    }

    /// Whether a request is refused before taking a sample; counted.
    fn refuse(&self, size: usize, align: usize, preservable: bool) -> bool {
        let c = &self.pool.shared().counters;
        if preservable {
            c.skip_excluded.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if size > kho_core::PAGE_SIZE as usize || align > kho_core::PAGE_SIZE as usize {
            c.skip_incompatible.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    #[cold]
    fn alloc_gated(
        &self,
        size: usize,
        align: usize,
        cache: CacheTag,
        preservable: bool,
    ) -> Option<NonNull<u8>> {
        // Ineligible requests leave the gate open for the next one.
        if self.refuse(size, align, preservable) {
            return None;
        }
        if self
            .gate
            .compare_exchange(OPEN, CLOSED, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
        self.pool.alloc(size, align, cache)
    }

    #[cold]
    fn alloc_counted(
        &self,
        left: u32,
        size: usize,
        align: usize,
        cache: CacheTag,
        preservable: bool,
    ) -> Option<NonNull<u8>> {
        let rate = self.rate.load(Ordering::Relaxed);
        if left == 0 {
            // First request on this thread: draw, and count this request.
            let n = draw(rate);
            if n > 1 {
                COUNTDOWN.with(|c| c.set(n - 1));
                return None;
            }
        }
        // The countdown stays at 1 while requests are ineligible.
        if self.refuse(size, align, preservable) {
            COUNTDOWN.with(|c| c.set(1));
            return None;
        }
        COUNTDOWN.with(|c| c.set(draw(rate)));
        self.pool.alloc(size, align, cache)
    }

    /// Whether `ptr` is a pool object (route its free to [`Sampler::free`]).
    #[inline]
    pub fn owns(&self, ptr: *const u8) -> bool {
        (ptr as usize).wrapping_sub(self.pool_base) < self.pool_len
    }

    /// [`Sampler::alloc`] for allocators that address memory by arena
    /// offset, tagging the object with its general size class (computed only
    /// for sampled requests): the sampled object's arena offset.
    #[inline]
    pub fn alloc_phys(&self, size: usize, align: usize, preservable: bool) -> Option<PhysAddr> {
        let p = self.alloc_with(size, align, || CacheTag::size_class(size), preservable)?;
        self.pool.phys_addr(p.as_ptr())
    }

    /// Frees the pool object at arena offset `addr`; an offset outside the
    /// pool is reported as an invalid free.
    pub fn free_phys(&self, addr: PhysAddr) -> std::result::Result<(), Report> {
        let ptr = self.pool.ptr_of(addr).unwrap_or(usize::MAX as *const u8);
        self.pool.free(ptr)
    }

    /// Frees a pool object; see [`Pool::free`].
    pub fn free(&self, ptr: *const u8) -> std::result::Result<(), Report> {
        self.pool.free(ptr)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.disable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "the wall clock")]
    fn draw_stays_in_range_with_the_right_mean() {
        assert!((0..1000).all(|_| draw(1) == 1));
        let n = 20_000u64;
        let mut sum = 0u64;
        for _ in 0..n {
            let d = draw(10);
            assert!((1..=19).contains(&d), "{d}");
            sum += u64::from(d);
        }
        let mean = sum as f64 / n as f64;
        assert!((9.5..10.5).contains(&mean), "mean {mean}");
        assert!((1..=u32::MAX).contains(&draw(u32::MAX)));
    }
}
