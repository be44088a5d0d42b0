//! What a cancel hands to its cleanup record: the session's undo record,
//! moved through a one-slot mailbox by atomic swaps, so that the hand-over
//! never blocks, fails or allocates, whoever is running cleanups.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;

use crate::heap::{FrozenImage, Heap};
use crate::kfence::{SampleMode, Sampler};

use super::Preserved;

/// A slot holding at most one boxed value. `put` and `take` are single
/// atomic swaps: they never block, fail or allocate.
pub(crate) struct Mailbox<T> {
    ptr: AtomicPtr<T>,
    _owns: PhantomData<Box<T>>,
}

impl<T> Mailbox<T> {
    pub(crate) fn new() -> Mailbox<T> {
        Mailbox {
            ptr: AtomicPtr::new(std::ptr::null_mut()),
            _owns: PhantomData,
        }
    }

    /// Put `value` in; returns what was there.
    pub(crate) fn put(&self, value: Box<T>) -> Option<Box<T>> {
        Self::reclaim(self.ptr.swap(Box::into_raw(value), Ordering::AcqRel))
    }

    /// Take the value out, if any.
    pub(crate) fn take(&self) -> Option<Box<T>> {
        Self::reclaim(self.ptr.swap(std::ptr::null_mut(), Ordering::AcqRel))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ptr.load(Ordering::Acquire).is_null()
    }

    fn reclaim(p: *mut T) -> Option<Box<T>> {
        if p.is_null() {
            return None;
        }
        // SAFETY:
        // - Every non-null pointer in the slot came from `Box::into_raw` in
        //   `put`, and the swap that returned `p` removed it from the slot,
        //   so this is its only owner and it is reclaimed once.
        Some(unsafe { Box::from_raw(p) })
    }
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Mailbox::new()
    }
}

impl<T> Drop for Mailbox<T> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// Everything a cancel must undo, collected while the handover is built.
#[derive(Default)]
pub(crate) struct Undo {
    pub(crate) heap: Option<Heap>,
    /// What prepare preserved through [`PrepareCx`](super::PrepareCx).
    pub(crate) preserved: Vec<Preserved>,
    /// The image freeze wrote, until commit publishes it.
    pub(crate) frozen: Option<FrozenImage>,
    /// The attached sampler, if freeze disabled it, and its mode.
    pub(crate) sampler: Option<(Arc<Sampler>, SampleMode)>,
    /// The mode to re-enable the heap's own sampler in, if freeze disabled
    /// it.
    pub(crate) heap_kfence: Option<SampleMode>,
    /// An earlier record not yet run (never expected, never lost).
    pub(crate) next: Option<Box<Undo>>,
}

impl Undo {
    /// Undo everything; returns how many steps the heap refused.
    fn run(&mut self) -> u64 {
        let mut errors = 0;
        let heap = self.heap.clone();
        for p in self.preserved.drain(..) {
            let r = match (&heap, p) {
                (Some(h), Preserved::Folio(f)) => h.unpreserve_folio(f),
                (Some(h), Preserved::Range(r)) => h.unpreserve_range(r),
                (None, _) => Err(crate::Error::InvalidConfig {
                    what: "undo record without a heap",
                    value: 0,
                    limit: 0,
                }),
            };
            errors += u64::from(r.is_err());
        }
        if let Some(frozen) = self.frozen.take() {
            match &heap {
                Some(h) => errors += u64::from(h.discard(frozen).is_err()),
                // Dropping a frozen image frees it in its own heap.
                None => drop(frozen),
            }
        }
        if let Some((sampler, mode)) = self.sampler.take() {
            errors += u64::from(sampler.enable(mode).is_err());
        }
        if let (Some(mode), Some(k)) = (
            self.heap_kfence.take(),
            heap.as_ref().and_then(Heap::kfence),
        ) {
            errors += u64::from(k.enable(mode).is_err());
        }
        errors
    }
}

/// State shared by a session and its undo cleanup record.
#[derive(Default)]
pub(crate) struct UndoShared {
    /// Records handed over by cancel, waiting for their grace period.
    pub(crate) pending: Mailbox<Undo>,
    /// An emptied record, for the next prepare to reuse.
    pub(crate) spare: Mailbox<Undo>,
    /// Undo steps the heap refused.
    pub(crate) errors: AtomicU64,
}

impl UndoShared {
    /// The cleanup action: run every record handed over, then keep one
    /// emptied record for reuse.
    pub(crate) fn run_pending(&self) {
        while let Some(mut u) = self.pending.take() {
            loop {
                let errors = u.run();
                self.errors.fetch_add(errors, Ordering::Relaxed);
                let next = u.next.take();
                u.heap = None;
                // One spare is enough; an extra one is freed here, at a
                // safe point, never in cancel.
                drop(self.spare.put(u));
                match next {
                    Some(n) => u = n,
                    None => break,
                }
            }
        }
    }
}
