//! Frees from async-signal context.
//!
//! [`DeferredFrees::free_deferred`] may run inside a signal handler (or any
//! context that may have interrupted the allocator while it held a lock):
//! it takes no lock, allocates nothing and calls nothing but atomics. The
//! freed object itself becomes the list node:
//!
//! ```text
//!  head ──► obj C                 obj B                 obj A
//!          | next = B | meta |──►| next = A | meta |──►| next = 0 | meta |
//!          (first 16 bytes of each freed object; arena offsets, not pointers)
//! ```
//!
//! Pushing is a compare-and-swap loop on `head`; draining detaches the
//! whole list with one `swap(0)` at a safe point ([`DeferredFrees::drain`],
//! called by the session before every freeze) and frees each object
//! through the heap. Nodes are never popped one by one, so the list has no
//! ABA problem: a node is only ever linked by the push that owns it, and
//! only the drain that detached it reads it again.
//!
//! Objects must have at least [`MIN_DEFERRED_LEN`] usable bytes to carry a
//! node; shorter ones are handed back.

use std::sync::atomic::{AtomicU64, Ordering};

use kho_core::PhysAddr;

use crate::heap::{Heap, Obj, RawObj};

/// Smallest object [`DeferredFrees::free_deferred`] accepts: the link and
/// the packed handle metadata.
pub const MIN_DEFERRED_LEN: usize = 16;

/// A lock-free list of objects to free at the next safe point.
#[derive(Debug)]
pub struct DeferredFrees {
    heap: Heap,
    /// Arena offset of the newest node, 0 for none (offset 0 is a
    /// superblock page and never an object).
    head: AtomicU64,
    /// Objects pushed (for statistics and tests).
    pushed: AtomicU64,
    /// Objects freed by drains.
    drained: AtomicU64,
}

/// What a drain did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DrainStats {
    /// Objects freed.
    pub freed: u64,
    /// Objects the heap refused to free (reported, then skipped: a bad
    /// object is never retried in a loop).
    pub failed: u64,
}

impl DeferredFrees {
    /// A list whose objects belong to `heap`.
    pub fn new(heap: &Heap) -> DeferredFrees {
        DeferredFrees {
            heap: heap.clone(),
            head: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            drained: AtomicU64::new(0),
        }
    }

    /// Queue `obj` to be freed at the next [`drain`](Self::drain).
    ///
    /// Async-signal-safe: no lock, no allocation, no system call. Returns
    /// the object unchanged if it belongs to another heap or has fewer than
    /// [`MIN_DEFERRED_LEN`] bytes.
    pub fn free_deferred(&self, obj: Obj) -> std::result::Result<(), Obj> {
        if obj.len() < MIN_DEFERRED_LEN || !self.owns(&obj) {
            return Err(obj);
        }
        let raw = obj.into_raw();
        let node = raw.addr;
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            write_link(self.heap.arena().base_ptr(), node, head, raw.meta);
            match self
                .head
                .compare_exchange_weak(head, node, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => head = now,
            }
        }
        self.pushed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`free_deferred`](Self::free_deferred) for a handle taken apart
    /// with [`Obj::into_raw`] (for example to pass it to a signal handler
    /// through atomics).
    ///
    /// # Safety
    ///
    /// - As for [`Obj::from_raw`]: `raw` is the only remaining form of a
    ///   live object's handle and is used once.
    pub unsafe fn free_deferred_raw(&self, raw: RawObj) -> std::result::Result<(), RawObj> {
        // SAFETY: the caller's contract is `from_raw`'s.
        let obj = unsafe { Obj::from_raw(raw) };
        self.free_deferred(obj).map_err(Obj::into_raw)
    }

    fn owns(&self, obj: &Obj) -> bool {
        obj.heap_id() == self.heap.id()
            && obj
                .addr()
                .0
                .checked_add(MIN_DEFERRED_LEN as u64)
                .is_some_and(|end| end <= self.heap.size())
            && obj.addr().0 >= kho_core::PAGE_SIZE * crate::layout::SUPERBLOCK_PAGES
    }

    /// Whether objects are waiting.
    pub fn is_empty(&self) -> bool {
        self.head.load(Ordering::Acquire) == 0
    }

    /// Objects queued so far.
    pub fn pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }

    /// Objects freed by drains so far.
    pub fn drained(&self) -> u64 {
        self.drained.load(Ordering::Relaxed)
    }

    /// Free every queued object. Call at a safe point: not from a signal
    /// handler (it takes the allocator's locks). Objects pushed while the
    /// drain runs wait for the next drain.
    pub fn drain(&self) -> DrainStats {
        let mut node = self.head.swap(0, Ordering::Acquire);
        let mut stats = DrainStats::default();
        let heap_id = self.heap.id();
        while node != 0 {
            let (next, meta) = read_link(self.heap.arena().base_ptr(), node);
            let raw = RawObj {
                addr: node,
                heap: heap_id,
                len: MIN_DEFERRED_LEN as u32,
                meta,
            };
            // SAFETY: `node` was pushed by `free_deferred`, which consumed
            // the only handle; the swap above detached it from the list, so
            // this is the one place that turns it back into a handle.
            let obj = unsafe { Obj::from_raw(raw) };
            match self.heap.free(obj) {
                Ok(()) => stats.freed += 1,
                Err(_) => stats.failed += 1,
            }
            node = next;
        }
        self.drained.fetch_add(stats.freed, Ordering::Relaxed);
        stats
    }

    /// The address of the newest queued object, if any (diagnostics).
    pub fn peek(&self) -> Option<PhysAddr> {
        match self.head.load(Ordering::Acquire) {
            0 => None,
            a => Some(PhysAddr(a)),
        }
    }
}

impl Drop for DeferredFrees {
    fn drop(&mut self) {
        // Objects still queued go back to the heap rather than leak.
        self.drain();
    }
}

/// Write a list node (`next`, `meta`) into the first 16 bytes of the
/// object at arena offset `node`.
fn write_link(base: *mut u8, node: u64, next: u64, meta: u64) {
    let p = base.wrapping_add(node as usize).cast::<[u64; 2]>();
    // SAFETY:
    // - `node + 16 <= arena size` (checked by `owns` before the first
    //   push of this node), so `p` is inside the live mapping.
    // - The handle was consumed by `free_deferred`: nothing else refers to
    //   these bytes. Unaligned writes: caches may use any alignment.
    unsafe { p.write_unaligned([next, meta]) };
}

/// Read the node written by [`write_link`].
fn read_link(base: *mut u8, node: u64) -> (u64, u64) {
    let p = base.wrapping_add(node as usize).cast::<[u64; 2]>();
    // SAFETY:
    // - `node` was checked in bounds when it was pushed and the mapping
    //   lives as long as the heap this list holds.
    // - The list was detached by the drain's swap; no push writes this
    //   node any more.
    let [next, meta] = unsafe { p.read_unaligned() };
    (next, meta)
}
