//! Per-thread magazines for the general size classes.
//!
//! Each thread keeps, per heap and size class, a small stack of free
//! objects taken from the slab layer in batches, so that an alloc+free pair
//! touches no lock and no shared cache line. Magazines serve only the
//! general (never preserved) classes: their objects look allocated to the
//! slab layer, which would be wrong for a preservable slab at freeze.
//!
//! A thread's magazines go back to their caches when the thread exits; the
//! heap is reached through a `Weak`, so a heap dropped first simply loses
//! them with its memory.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use crate::heap::Shared;

/// Objects per magazine before half are flushed.
pub(crate) const MAG_CAP: usize = 128;
/// Objects fetched per refill.
pub(crate) const MAG_BATCH: usize = 32;

pub(crate) struct ThreadCache {
    heap: u32,
    shared: Weak<Shared>,
    pub(crate) mags: Vec<Vec<(u64, u32)>>,
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            for (class, mag) in self.mags.iter_mut().enumerate() {
                shared.flush_magazine(class, mag);
            }
        }
    }
}

thread_local! {
    static CACHES: RefCell<Vec<ThreadCache>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's magazines for `shared`, creating them on
/// first use. Returns `None` when thread-local storage is gone (the thread
/// is exiting) or already borrowed; callers then use the locked path.
#[inline]
pub(crate) fn with<R>(
    shared: &Arc<Shared>,
    classes: usize,
    f: impl FnOnce(&mut ThreadCache) -> R,
) -> Option<R> {
    CACHES
        .try_with(|cell| {
            let mut v = cell.try_borrow_mut().ok()?;
            let id = shared.id();
            let pos = match v.iter().position(|t| t.heap == id) {
                Some(p) => p,
                None => {
                    v.retain(|t| t.shared.strong_count() > 0);
                    v.push(ThreadCache {
                        heap: id,
                        shared: Arc::downgrade(shared),
                        mags: (0..classes).map(|_| Vec::with_capacity(MAG_CAP)).collect(),
                    });
                    v.len() - 1
                }
            };
            Some(f(&mut v[pos]))
        })
        .ok()
        .flatten()
}
