//! Epoch-based grace periods for cleanups that must wait for readers.
//!
//! A [`Domain`] has a global epoch and a fixed table of reader slots,
//! allocated once. A reader registers once ([`Domain::register`]) and pins
//! the current epoch around each read-side section ([`Reader::pin`]). A
//! [`Cleanup`] is a record allocated up front (at subsystem registration);
//! queueing it ([`Domain::defer`]) never fails, never blocks and never
//! allocates: it stamps the record with the epoch, bumps the epoch and
//! pushes the record onto a lock-free list. The record's action runs in
//! [`Domain::poll`] or [`Domain::barrier`] once no reader is still pinned
//! at an epoch up to its stamp — every reader that could have seen the
//! state being cleaned up has left.
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::sync::Arc;
//! use kho_alloc::epoch::{Cleanup, Domain};
//!
//! let domain = Domain::new(4);
//! let runs = Arc::new(AtomicU32::new(0));
//! let r = Arc::clone(&runs);
//! let cleanup = Cleanup::new(move || { r.fetch_add(1, Ordering::SeqCst); });
//! let mut reader = domain.register().expect("a free slot");
//! let guard = reader.pin();
//! domain.defer(&cleanup);
//! domain.poll();
//! assert_eq!(runs.load(Ordering::SeqCst), 0); // the reader may still look
//! drop(guard);
//! domain.barrier();
//! assert_eq!(runs.load(Ordering::SeqCst), 1);
//! ```

use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Slot bit: the slot belongs to a registered reader.
const OWNED: u64 = 1 << 63;

const IDLE: u8 = 0;
const QUEUED: u8 = 1;

/// Errors of the epoch domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EpochError {
    /// Every reader slot is taken.
    #[error("no free reader slot: expected at most {expected} readers, found {found} registered")]
    NoSlots {
        /// Slots in the domain.
        expected: usize,
        /// Readers registered when the request came.
        found: usize,
    },
}

type Action = Box<dyn FnMut() + Send>;

struct Record {
    state: AtomicU8,
    /// Epoch at which the record was queued.
    epoch: AtomicU64,
    next: AtomicPtr<Record>,
    action: Mutex<Action>,
}

/// A cleanup action allocated ahead of time, queued with
/// [`Domain::defer`]. Cloning shares the record.
#[derive(Clone)]
pub struct Cleanup {
    rec: Arc<Record>,
}

impl std::fmt::Debug for Cleanup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cleanup")
            .field("queued", &self.is_queued())
            .finish()
    }
}

impl Cleanup {
    /// A record that runs `action` each time it is queued and its grace
    /// period has passed.
    pub fn new(action: impl FnMut() + Send + 'static) -> Cleanup {
        Cleanup {
            rec: Arc::new(Record {
                state: AtomicU8::new(IDLE),
                epoch: AtomicU64::new(0),
                next: AtomicPtr::new(std::ptr::null_mut()),
                action: Mutex::new(Box::new(action)),
            }),
        }
    }

    /// Whether the record waits in a domain's queue.
    pub fn is_queued(&self) -> bool {
        self.rec.state.load(Ordering::Acquire) == QUEUED
    }
}

struct Inner {
    global: AtomicU64,
    slots: Box<[AtomicU64]>,
    registered: AtomicUsize,
    pending: AtomicPtr<Record>,
    queued: AtomicUsize,
    /// Serialises runners so an action never runs twice concurrently.
    runner: Mutex<()>,
}

/// An epoch domain: readers, the global epoch and the queue of cleanups.
/// Cloning shares the domain.
#[derive(Clone)]
pub struct Domain {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("epoch", &self.epoch())
            .field("slots", &self.inner.slots.len())
            .field("pending", &self.pending())
            .finish()
    }
}

/// A registered reader; [`pin`](Reader::pin) it around read-side sections.
#[derive(Debug)]
pub struct Reader {
    domain: Domain,
    slot: usize,
}

/// A pinned read-side section; unpins on drop.
#[derive(Debug)]
#[must_use = "the section ends when the guard is dropped"]
pub struct Guard<'a> {
    reader: &'a mut Reader,
}

impl Domain {
    /// A domain with room for `readers` concurrent readers (at least one).
    pub fn new(readers: usize) -> Domain {
        Domain {
            inner: Arc::new(Inner {
                global: AtomicU64::new(1),
                slots: (0..readers.max(1)).map(|_| AtomicU64::new(0)).collect(),
                registered: AtomicUsize::new(0),
                pending: AtomicPtr::new(std::ptr::null_mut()),
                queued: AtomicUsize::new(0),
                runner: Mutex::new(()),
            }),
        }
    }

    /// The current global epoch.
    pub fn epoch(&self) -> u64 {
        self.inner.global.load(Ordering::SeqCst)
    }

    /// Cleanups queued and not yet run.
    pub fn pending(&self) -> usize {
        self.inner.queued.load(Ordering::SeqCst)
    }

    /// Register a reader in a free slot.
    pub fn register(&self) -> Result<Reader, EpochError> {
        for (i, slot) in self.inner.slots.iter().enumerate() {
            if slot
                .compare_exchange(0, OWNED, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
            {
                self.inner.registered.fetch_add(1, Ordering::Relaxed);
                return Ok(Reader {
                    domain: self.clone(),
                    slot: i,
                });
            }
        }
        Err(EpochError::NoSlots {
            expected: self.inner.slots.len(),
            found: self.inner.registered.load(Ordering::Relaxed),
        })
    }

    /// Queue `cleanup` to run after the current readers are done.
    ///
    /// Never fails, never blocks, never allocates. Returns `false` if the
    /// record was already queued (it will run once, after the later of the
    /// two grace periods would have been due — the earlier stamp is kept,
    /// so callers that need the later one queue after the first has run).
    pub fn defer(&self, cleanup: &Cleanup) -> bool {
        let rec = &cleanup.rec;
        if rec
            .state
            .compare_exchange(IDLE, QUEUED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let stamp = self.inner.global.fetch_add(1, Ordering::SeqCst);
        rec.epoch.store(stamp, Ordering::SeqCst);
        self.inner.queued.fetch_add(1, Ordering::SeqCst);
        // The queue holds one strong reference (a count increment, no
        // allocation) until the action has run.
        self.push(Arc::into_raw(Arc::clone(rec)).cast_mut());
        true
    }

    fn push(&self, node: *mut Record) {
        let mut head = self.inner.pending.load(Ordering::Relaxed);
        loop {
            // SAFETY: `node` comes from `Arc::into_raw` and the queue owns
            // that reference, so the record is alive.
            let rec = unsafe { &*node };
            rec.next.store(head, Ordering::Relaxed);
            match self.inner.pending.compare_exchange_weak(
                head,
                node,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => head = now,
            }
        }
    }

    /// The smallest epoch a reader is pinned at, if any reader is pinned.
    fn oldest_pin(&self) -> Option<u64> {
        self.inner
            .slots
            .iter()
            .map(|s| s.load(Ordering::SeqCst) & !OWNED)
            .filter(|&e| e != 0)
            .min()
    }

    /// Run every queued cleanup whose grace period has passed. Does not
    /// wait for readers. Returns how many ran.
    pub fn poll(&self) -> usize {
        self.poll_inner().0
    }

    /// [`poll`](Self::poll), also returning the smallest stamp among the
    /// records it had to leave queued (held back by a pinned reader).
    fn poll_inner(&self) -> (usize, Option<u64>) {
        let _runner = self
            .inner
            .runner
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut node = self
            .inner
            .pending
            .swap(std::ptr::null_mut(), Ordering::Acquire);
        let oldest = self.oldest_pin();
        let mut ran = 0;
        let mut blocked: Option<u64> = None;
        while !node.is_null() {
            // SAFETY: every node on the list came from `Arc::into_raw` in
            // `defer`; the swap above detached the list, so this loop owns
            // the queue's reference of each node exactly once.
            let rec = unsafe { Arc::from_raw(node) };
            node = rec.next.load(Ordering::Relaxed);
            let stamp = rec.epoch.load(Ordering::SeqCst);
            if oldest.is_some_and(|pin| pin <= stamp) {
                // A reader that may see the old state is still inside.
                blocked = Some(blocked.map_or(stamp, |b| b.min(stamp)));
                self.push(Arc::into_raw(rec).cast_mut());
                continue;
            }
            {
                let mut action = rec.action.lock().unwrap_or_else(PoisonError::into_inner);
                (*action)();
            }
            rec.state.store(IDLE, Ordering::Release);
            self.inner.queued.fetch_sub(1, Ordering::SeqCst);
            ran += 1;
        }
        (ran, blocked)
    }

    /// The epoch that separates cleanups queued before this call (stamped
    /// below it) from those queued after (stamped at or above it).
    fn ticket(&self) -> u64 {
        self.inner.global.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Wait until every cleanup queued before the call has run. Cleanups
    /// queued while it waits are not waited for, so it returns even under
    /// a continuous stream of new ones. Must not be called while this
    /// thread holds a pinned [`Guard`] of the domain at or before the
    /// stamp of such a cleanup (it would wait for itself).
    pub fn barrier(&self) {
        let ticket = self.ticket();
        let mut spins = 0u32;
        while !self.done_before(ticket) {
            spins = spins.saturating_add(1);
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// [`barrier`](Self::barrier) with a time limit; `false` if cleanups
    /// queued before the call were still pending when it expired.
    pub fn barrier_timeout(&self, limit: Duration) -> bool {
        let ticket = self.ticket();
        let start = std::time::Instant::now();
        loop {
            if self.done_before(ticket) {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Poll once; whether no cleanup stamped below `ticket` is left.
    /// Records are only ever queued with a stamp taken at `defer`, so one
    /// whose `defer` returned before the ticket was drawn is either run by
    /// this poll or left queued with its stamp reported.
    fn done_before(&self, ticket: u64) -> bool {
        let (_, blocked) = self.poll_inner();
        blocked.is_none_or(|stamp| stamp >= ticket)
    }

    /// Wait until `cleanup` is no longer queued (it ran, or was never
    /// queued). The same caveat as [`barrier`](Self::barrier) applies.
    pub fn wait_for(&self, cleanup: &Cleanup) {
        let mut spins = 0u32;
        while cleanup.is_queued() {
            self.poll();
            if !cleanup.is_queued() {
                return;
            }
            spins = spins.saturating_add(1);
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No reader can be pinned (readers hold the domain): run what is
        // left, so that no queued cleanup is ever skipped.
        let mut node = self.pending.swap(std::ptr::null_mut(), Ordering::Acquire);
        while !node.is_null() {
            // SAFETY: as in `poll`: detached list, one reference per node.
            let rec = unsafe { Arc::from_raw(node) };
            node = rec.next.load(Ordering::Relaxed);
            let mut action = rec.action.lock().unwrap_or_else(PoisonError::into_inner);
            (*action)();
            drop(action);
            rec.state.store(IDLE, Ordering::Release);
        }
    }
}

impl Reader {
    /// Enter a read-side section at the current epoch.
    pub fn pin(&mut self) -> Guard<'_> {
        let inner = &self.domain.inner;
        let slot = &inner.slots[self.slot];
        let mut e = inner.global.load(Ordering::SeqCst);
        loop {
            slot.store(OWNED | e, Ordering::SeqCst);
            // A cleanup queued between the load and the store bumped the
            // epoch; pin again so the poller cannot miss this reader.
            let now = inner.global.load(Ordering::SeqCst);
            if now == e {
                break;
            }
            e = now;
        }
        Guard { reader: self }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.domain.inner.slots[self.slot].store(0, Ordering::SeqCst);
        self.domain.inner.registered.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Guard<'_> {
    /// The epoch this section is pinned at.
    pub fn epoch(&self) -> u64 {
        self.reader.domain.inner.slots[self.reader.slot].load(Ordering::SeqCst) & !OWNED
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.reader.domain.inner.slots[self.reader.slot].store(OWNED, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    fn counter() -> (Arc<AtomicU32>, Cleanup) {
        let n = Arc::new(AtomicU32::new(0));
        let m = Arc::clone(&n);
        (
            n,
            Cleanup::new(move || {
                m.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    #[test]
    fn waits_for_pinned_readers_only() {
        let d = Domain::new(2);
        let (n, c) = counter();
        let mut early = d.register().unwrap();
        let mut late = d.register().unwrap();
        assert!(matches!(
            d.register(),
            Err(EpochError::NoSlots {
                expected: 2,
                found: 2
            })
        ));
        let g = early.pin();
        assert!(d.defer(&c));
        assert!(!d.defer(&c), "already queued");
        // A reader pinned after the defer cannot see the old state.
        let g2 = late.pin();
        assert!(g2.epoch() > g.epoch());
        assert_eq!(d.poll(), 0);
        assert_eq!(n.load(Ordering::SeqCst), 0);
        drop(g);
        assert_eq!(d.poll(), 1);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        drop(g2);
        assert!(!c.is_queued());
        // The record is reusable.
        assert!(d.defer(&c));
        d.barrier();
        assert_eq!(n.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn barrier_waits_for_a_reader_in_another_thread() {
        let d = Domain::new(4);
        let (n, c) = counter();
        let (tx, rx) = std::sync::mpsc::channel();
        let (tx2, rx2) = std::sync::mpsc::channel::<()>();
        let dd = d.clone();
        let t = std::thread::spawn(move || {
            let mut r = dd.register().unwrap();
            let _g = r.pin();
            tx.send(()).unwrap();
            rx2.recv().unwrap();
        });
        rx.recv().unwrap();
        d.defer(&c);
        assert!(!d.barrier_timeout(Duration::from_millis(20)));
        assert_eq!(n.load(Ordering::SeqCst), 0);
        tx2.send(()).unwrap();
        d.barrier();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        t.join().unwrap();
    }

    /// A barrier waits for cleanups queued before it, not for those queued
    /// while it waits: a reader that holds a later one back does not keep
    /// it from returning.
    #[test]
    fn barrier_ignores_cleanups_queued_after_it() {
        let d = Domain::new(4);
        let (mid_n, mid) = counter();
        let (late_n, late) = counter();
        // `mid` is queued before the barrier and held back by `early`
        // until `late` has been queued after it.
        let mut early = d.register().unwrap();
        let g = early.pin();
        d.defer(&mid);
        let e1 = d.epoch();
        let (pinned_tx, pinned) = std::sync::mpsc::channel();
        let (queued_tx, queued) = std::sync::mpsc::channel();
        let (stop_tx, stop) = std::sync::mpsc::channel::<()>();
        let dd = d.clone();
        let holder = std::thread::spawn(move || {
            let mut r = dd.register().unwrap();
            let _g = r.pin();
            pinned_tx.send(()).unwrap();
            // The barrier draws its ticket by moving the epoch.
            while dd.epoch() == e1 {
                std::thread::yield_now();
            }
            dd.defer(&late);
            queued_tx.send(()).unwrap();
            stop.recv().unwrap();
        });
        pinned.recv().unwrap();
        let (done_tx, done) = std::sync::mpsc::channel();
        let db = d.clone();
        let barrier = std::thread::spawn(move || {
            db.barrier();
            done_tx.send(()).unwrap();
        });
        queued.recv().unwrap();
        assert_eq!(mid_n.load(Ordering::SeqCst), 0);
        drop(g);
        done.recv_timeout(Duration::from_secs(30))
            .expect("barrier waited for a cleanup queued after it");
        barrier.join().unwrap();
        assert_eq!(mid_n.load(Ordering::SeqCst), 1);
        assert_eq!(late_n.load(Ordering::SeqCst), 0);
        assert_eq!(d.pending(), 1);
        stop_tx.send(()).unwrap();
        holder.join().unwrap();
        d.barrier();
        assert_eq!(late_n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn wait_for_one_cleanup() {
        let d = Domain::new(2);
        let (n, c) = counter();
        d.wait_for(&c);
        d.defer(&c);
        d.wait_for(&c);
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn dropping_the_domain_runs_pending_cleanups() {
        let (n, c) = counter();
        {
            let d = Domain::new(1);
            let mut r = d.register().unwrap();
            let g = r.pin();
            d.defer(&c);
            drop(g);
        }
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
