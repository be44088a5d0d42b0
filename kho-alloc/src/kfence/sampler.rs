//! Sampling gates: which allocation requests go to the pool.

use std::cell::Cell;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

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

/// Gate states, in the low byte of the gate word.
const OFF: u8 = 0;
const CLOSED: u8 = 1;
const OPEN: u8 = 2;
const COUNT: u8 = 3;

/// A gate word is `generation << 8 | state`. Every enable and disable
/// installs a word with a fresh generation, drawn from one process-wide
/// counter, so a word names one sampler in one mode: a timer whose
/// generation is gone stops, a racing enable whose generation was replaced
/// loses, and a thread's count-gate countdown knows whose it is.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

fn fresh_word(state: u8) -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed) << 8 | u64::from(state)
}

const fn state_of(word: u64) -> u8 {
    (word & 0xff) as u8
}

const fn with_state(word: u64, state: u8) -> u64 {
    word & !0xff | state as u64
}

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

/// Keeps [`ACTIVE`] in step with one gate transition.
fn count_active(old: u64, new: u64) {
    match (active(state_of(old)), active(state_of(new))) {
        (false, true) => {
            ACTIVE.fetch_add(1, Ordering::Relaxed);
        }
        (true, false) => {
            ACTIVE.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// A request the gate let through to the slow path (see [`Sampler::pass`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pass {
    /// The time gate was open (this word).
    Open(u64),
    /// The count gate's countdown reached its end, or belongs to another
    /// word than this one (`mine` false) and must be drawn afresh.
    Counted {
        /// The gate word.
        word: u64,
        /// Whether this thread's countdown belongs to `word`.
        mine: bool,
        /// The countdown's value.
        left: u32,
    },
}

thread_local! {
    /// The count-gate word this thread's countdown belongs to, and the
    /// requests left before its next sample. Another word (another
    /// sampler, or the same one re-enabled) means "draw afresh".
    static COUNTDOWN: Cell<(u64, u32)> = const { Cell::new((0, 0)) };
    /// This thread's xorshift state; 0 means "seed me".
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A geometric draw on `1..`, mean `rate`: the number of requests up to and
/// including the next sampled one when each is sampled with probability
/// `1 / rate`. Memoryless, so a countdown drawn afresh (a thread switching
/// between samplers) keeps every sampler at its rate.
fn draw(rate: u32) -> u32 {
    if rate <= 1 {
        return 1;
    }
    let x = RNG.with(|r| {
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
        x
    });
    // Uniform in (0, 1], from the top 53 bits.
    let u = ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let n = 1.0 + (u.ln() / (-1.0 / f64::from(rate)).ln_1p()).floor();
    // `as` saturates: a draw past u32::MAX is u32::MAX.
    n as u32
}

/// Feeds a [`Pool`] with sampled allocation requests.
///
/// The embedding allocator asks [`Sampler::alloc`] first on every request;
/// it returns `None` (the caller proceeds normally) unless the request is
/// sampled and the pool can serve it. While no gate in the process is open
/// the unsampled path is one relaxed load of a global ([`may_sample`]);
/// otherwise one more load of the gate word, or a thread-local decrement
/// (count gate).
///
/// [`enable`](Self::enable) calls are serialized; [`disable`](Self::disable)
/// takes no lock, joins no thread and waits for nothing, so it is safe at
/// freeze, at shutdown and in a forked child. Each operation takes effect
/// as one atomic step on the gate word: a disable that overlaps an enable
/// either comes after it (and sampling ends off) or before it.
pub struct Sampler {
    gate: Arc<AtomicU64>,
    rate: AtomicU32,
    pool_base: usize,
    pool_len: usize,
    pool: Arc<Pool>,
    /// Serializes enables; holds the running timer thread's handle, to wake
    /// it when its generation ends.
    control: Mutex<Option<Thread>>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = self.gate.load(Ordering::Relaxed);
        f.debug_struct("Sampler")
            .field("pool", &self.pool)
            .field("gate", &state_of(word))
            .field("generation", &(word >> 8))
            .field("rate", &self.rate.load(Ordering::Relaxed))
            .finish()
    }
}

impl Sampler {
    /// A sampler over `pool`, started in `mode`.
    pub fn new(pool: Arc<Pool>, mode: SampleMode) -> Result<Sampler> {
        let (pool_base, pool_len) = pool.bounds();
        let s = Sampler {
            gate: Arc::new(AtomicU64::new(fresh_word(OFF))),
            rate: AtomicU32::new(1),
            pool_base,
            pool_len,
            pool,
            control: Mutex::new(None),
        };
        s.enable(mode)?;
        Ok(s)
    }

    /// The pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Switches to `mode`, stopping or starting the timer as needed. An
    /// invalid mode (a zero rate or interval) is refused and changes
    /// nothing. Enables are serialized with each other; a
    /// [`disable`](Self::disable) running meanwhile wins.
    pub fn enable(&self, mode: SampleMode) -> Result<()> {
        match mode {
            SampleMode::Count(0) => {
                return Err(KfenceError::Rate {
                    expected: 1,
                    found: 0,
                })
            }
            SampleMode::Interval(i) if i.is_zero() => {
                return Err(KfenceError::Rate {
                    expected: 1,
                    found: 0,
                })
            }
            _ => {}
        }
        let mut timer = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let off = self.turn_off();
        if let Some(t) = timer.take() {
            t.unpark();
        }
        match mode {
            SampleMode::Off => Ok(()),
            SampleMode::Count(rate) => {
                self.rate.store(rate, Ordering::Relaxed);
                self.publish(off, fresh_word(COUNT));
                Ok(())
            }
            SampleMode::Interval(interval) => {
                let armed = fresh_word(CLOSED);
                if !self.publish(off, armed) {
                    return Ok(());
                }
                let gate = Arc::clone(&self.gate);
                match thread::Builder::new()
                    .name("kfence-timer".into())
                    .spawn(move || run_timer(&gate, armed, interval))
                {
                    // The handle is dropped: the thread is detached, and
                    // stops by itself once its generation is gone.
                    Ok(handle) => {
                        *timer = Some(handle.thread().clone());
                        Ok(())
                    }
                    Err(source) => {
                        if let Ok(old) = self.gate.compare_exchange(
                            armed,
                            fresh_word(OFF),
                            Ordering::AcqRel,
                            Ordering::Relaxed,
                        ) {
                            self.account(old, OFF);
                        }
                        Err(KfenceError::Timer { source })
                    }
                }
            }
        }
    }

    /// Installs `new` in place of `off` (the word this enable's own stop
    /// installed); `false` if a disable replaced it meanwhile.
    fn publish(&self, off: u64, new: u64) -> bool {
        let ok = self
            .gate
            .compare_exchange(off, new, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if ok {
            self.account(off, state_of(new));
        }
        ok
    }

    /// Installs a fresh `OFF` word; returns it.
    fn turn_off(&self) -> u64 {
        let off = fresh_word(OFF);
        let old = self.gate.swap(off, Ordering::AcqRel);
        self.account(old, OFF);
        off
    }

    /// Keeps [`ACTIVE`] and the pool's count of enabled samplers in step
    /// with a transition from `old` to a word in state `new`.
    fn account(&self, old: u64, new: u8) {
        count_active(old, u64::from(new));
        let feeders = &self.pool.shared().feeders;
        match (state_of(old) != OFF, new != OFF) {
            (false, true) => {
                feeders.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                feeders.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// Stops sampling and the timer. Bounded, lock-free and allocation-free:
    /// one atomic swap ends the current generation (the timer thread stops
    /// by itself when it sees that), then the timer is woken so it does so
    /// at once, if its handle can be had without waiting. Nothing is
    /// joined, so this cannot hang on a thread that no longer exists (after
    /// `fork`) or on one that waits for an allocation. Objects already in
    /// the pool stay valid and can still be freed.
    pub fn disable(&self) {
        self.turn_off();
        let timer = match self.control.try_lock() {
            Ok(mut t) => t.take(),
            Err(TryLockError::Poisoned(e)) => e.into_inner().take(),
            // An enable is running: it stops its own timer if this disable
            // replaced its word, and has stopped the previous one.
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(t) = timer {
            t.unpark();
        }
    }

    /// Whether sampling is on.
    pub fn is_enabled(&self) -> bool {
        state_of(self.gate.load(Ordering::Relaxed)) != OFF
    }

    /// Whether the time gate is open (for tests and diagnostics).
    pub fn gate_open(&self) -> bool {
        state_of(self.gate.load(Ordering::Relaxed)) == OPEN
    }

    /// Statistics of the pool; `enabled` says whether any sampler feeds it.
    pub fn stats(&self) -> Stats {
        self.pool.stats()
    }

    /// Offers an allocation request to the pool. `preservable` requests (the
    /// allocator's `PRESERVE` flag) are never sampled. Returns the guarded
    /// object if the request was sampled and served; otherwise the caller
    /// allocates normally.
    ///
    /// A sampled request captures a stack trace, which may take the dynamic
    /// loader's lock and allocate: requests that must never block are not
    /// for this call (the heap never offers its `NOWAIT` requests).
    #[inline]
    pub fn alloc(
        &self,
        size: usize,
        align: usize,
        cache: CacheTag,
        preservable: bool,
    ) -> Option<NonNull<u8>> {
        let pass = self.pass()?;
        self.alloc_passed(pass, size, (align, cache), preservable, false)
    }

    /// The gate's fast decision for one request: `None`, it is not sampled
    /// (one relaxed load while no gate in the process is open; otherwise
    /// one more, or a thread-local countdown step), or the pass to take to
    /// [`Sampler::alloc_passed`]. Split so that callers keep the slow path,
    /// and the work of describing the request, out of line.
    #[inline(always)]
    pub(crate) fn pass(&self) -> Option<Pass> {
        if !may_sample() {
            return None;
        }
        let word = self.gate.load(Ordering::Relaxed);
        match state_of(word) {
            OPEN => Some(Pass::Open(word)),
            COUNT => {
                let (owner, left) = COUNTDOWN.with(Cell::get);
                if owner == word && left > 1 {
                    COUNTDOWN.with(|c| c.set((word, left - 1)));
                    return None;
                }
                Some(Pass::Counted {
                    word,
                    mine: owner == word,
                    left,
                })
            }
            _ => None,
        }
    }

    /// The slow path of a request the gate let through: eligibility, the
    /// gate's bookkeeping, and the pool.
    #[cold]
    #[inline(never)]
    pub(crate) fn alloc_passed(
        &self,
        pass: Pass,
        size: usize,
        req: (usize, CacheTag),
        preservable: bool,
        nowait: bool,
    ) -> Option<NonNull<u8>> {
        match pass {
            Pass::Open(word) => self.alloc_gated(word, size, req, preservable, nowait),
            Pass::Counted { word, mine, left } => {
                self.alloc_counted(word, mine, left, size, req, preservable, nowait)
            }
        }
    }

    /// Whether a request is refused before taking a sample; counted.
    fn refuse(&self, size: usize, align: usize, preservable: bool, nowait: bool) -> bool {
        let c = &self.pool.shared().counters;
        if preservable {
            c.skip_excluded.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        // A sampled allocation captures a stack (the loader's lock, heap
        // allocation) and may wait for the pool's page check: not for a
        // request that must never block.
        if nowait || size > kho_core::PAGE_SIZE as usize || align > kho_core::PAGE_SIZE as usize {
            c.skip_incompatible.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    #[cold]
    fn alloc_gated(
        &self,
        word: u64,
        size: usize,
        (align, cache): (usize, CacheTag),
        preservable: bool,
        nowait: bool,
    ) -> Option<NonNull<u8>> {
        // Ineligible requests leave the gate open for the next one.
        if self.refuse(size, align, preservable, nowait) {
            return None;
        }
        let closed = with_state(word, CLOSED);
        if self
            .gate
            .compare_exchange(word, closed, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        count_active(word, closed);
        self.pool.alloc(size, align, cache)
    }

    #[cold]
    #[allow(clippy::too_many_arguments)]
    fn alloc_counted(
        &self,
        word: u64,
        mine: bool,
        left: u32,
        size: usize,
        (align, cache): (usize, CacheTag),
        preservable: bool,
        nowait: bool,
    ) -> Option<NonNull<u8>> {
        let rate = self.rate.load(Ordering::Relaxed);
        if !mine || left == 0 {
            // A countdown of another gate, or none yet: draw, and count this
            // request as the first of the new countdown.
            let n = draw(rate);
            if n > 1 {
                COUNTDOWN.with(|c| c.set((word, n - 1)));
                return None;
            }
        }
        // The countdown stays at 1 while requests are ineligible.
        if self.refuse(size, align, preservable, nowait) {
            COUNTDOWN.with(|c| c.set((word, 1)));
            return None;
        }
        COUNTDOWN.with(|c| c.set((word, draw(rate))));
        self.pool.alloc(size, align, cache)
    }

    /// Whether `ptr` is a pool object (route its free to [`Sampler::free`]).
    #[inline]
    pub fn owns(&self, ptr: *const u8) -> bool {
        (ptr as usize).wrapping_sub(self.pool_base) < self.pool_len
    }

    /// [`Sampler::alloc_passed`] for allocators that address memory by
    /// arena offset, tagging the object with its general size class: the
    /// sampled object's arena offset. `nowait` requests (which must never
    /// block) are not sampled.
    pub(crate) fn alloc_phys(
        &self,
        pass: Pass,
        size: usize,
        align: usize,
        preservable: bool,
        nowait: bool,
    ) -> Option<PhysAddr> {
        let req = (align, CacheTag::size_class(size));
        let p = self.alloc_passed(pass, size, req, preservable, nowait)?;
        self.pool.phys_addr(p.as_ptr())
    }

    /// Frees the pool object at arena offset `addr`; an offset outside the
    /// pool is reported as an invalid free. For the heap only: it passes
    /// the address of an owned object handle that it consumes, which is
    /// what [`Pool::free`] requires.
    pub(crate) fn free_phys(&self, addr: PhysAddr) -> std::result::Result<(), Report> {
        let ptr = self.pool.ptr_of(addr).unwrap_or(usize::MAX as *const u8);
        // SAFETY: the heap calls this with the address of an object whose
        // handle it consumes; the handle was the only one, and every slice of
        // the object's bytes borrowed it, so none is live and nothing
        // accesses the object after this free.
        unsafe { self.pool.free(ptr) }
    }

    /// Frees a pool object; see [`Pool::free`].
    ///
    /// # Safety
    ///
    /// As for [`Pool::free`].
    pub unsafe fn free(&self, ptr: *const u8) -> std::result::Result<(), Report> {
        // SAFETY: the caller upholds `Pool::free`'s contract.
        unsafe { self.pool.free(ptr) }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.disable();
    }
}

/// The timer thread of the generation `armed` (a `CLOSED` word): opens the
/// gate once per interval while that generation lasts. It never waits for
/// an allocation to take the gate, and stops as soon as it sees another
/// generation in the gate word.
fn run_timer(gate: &AtomicU64, armed: u64, interval: Duration) {
    let generation = armed >> 8;
    let open = with_state(armed, OPEN);
    loop {
        let deadline = Instant::now().checked_add(interval);
        loop {
            if gate.load(Ordering::Acquire) >> 8 != generation {
                return;
            }
            let now = Instant::now();
            match deadline {
                Some(d) if now >= d => break,
                Some(d) => thread::park_timeout(d - now),
                None => thread::park(),
            }
        }
        if gate
            .compare_exchange(armed, open, Ordering::Release, Ordering::Relaxed)
            .is_ok()
        {
            count_active(armed, open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "the wall clock")]
    fn draw_is_geometric_with_the_right_mean() {
        assert!((0..1000).all(|_| draw(1) == 1));
        let n = 40_000u64;
        let (mut sum, mut ones) = (0u64, 0u64);
        for _ in 0..n {
            let d = draw(10);
            assert!(d >= 1);
            sum += u64::from(d);
            ones += u64::from(d == 1);
        }
        let mean = sum as f64 / n as f64;
        assert!((9.5..10.5).contains(&mean), "mean {mean}");
        // P(1) = 1/10 for a memoryless draw (a uniform 1..=19 gives 1/19).
        let p1 = ones as f64 / n as f64;
        assert!((0.09..0.11).contains(&p1), "P(1) = {p1}");
        assert!(draw(u32::MAX) >= 1);
    }

    #[test]
    fn gate_words_keep_state_and_generation_apart() {
        let a = fresh_word(CLOSED);
        let b = fresh_word(CLOSED);
        assert_ne!(a, b);
        assert_eq!(state_of(a), CLOSED);
        assert_eq!(state_of(with_state(a, OPEN)), OPEN);
        assert_eq!(with_state(a, OPEN) >> 8, a >> 8);
    }
}
