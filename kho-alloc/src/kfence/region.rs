//! A [`PoolMemory`] over the KFENCE region of an [`Arena`].

use std::fmt;

use kho_core::{Pfn, PhysAddr, PAGE_SIZE};

use super::memory::{PageClass, PoolMemory};
use super::{KfenceError, Result};
use crate::arena::Arena;
use crate::layout::{Layout, Region};

/// Answers whether a page is preserved (or will be at the next freeze), for
/// the exclusion checks of a pool over arena memory.
pub trait PreservedQuery: Send + Sync {
    /// Whether `pfn` is preserved. May wait for locks: asked for every page
    /// when the pool is built.
    fn is_preserved(&self, pfn: Pfn) -> bool;

    /// The same without waiting: `None` when it cannot be told right now.
    /// Asked for an object's page at every sampled allocation, which never
    /// blocks; `None` keeps the object out of that page.
    fn try_is_preserved(&self, pfn: Pfn) -> Option<bool> {
        Some(self.is_preserved(pfn))
    }
}

/// A closure that never waits answers both questions.
impl<F: Fn(Pfn) -> bool + Send + Sync> PreservedQuery for F {
    fn is_preserved(&self, pfn: Pfn) -> bool {
        self(pfn)
    }
}

/// The arena's KFENCE region as pool memory. Pages are classified by the
/// arena's layout and by a preserved-state query, so a pool over it is
/// checked against scratch, preservable and preserved memory at
/// construction and at every sampled allocation.
pub struct RegionMemory {
    base: usize,
    pages: usize,
    first: Pfn,
    layout: Layout,
    is_preserved: Box<dyn PreservedQuery>,
}

impl fmt::Debug for RegionMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionMemory")
            .field("base", &(self.base as *const u8))
            .field("pages", &self.pages)
            .field("first", &self.first)
            .finish()
    }
}

impl RegionMemory {
    /// The KFENCE region of `arena`.
    ///
    /// # Safety
    ///
    /// - `arena` must stay mapped, at the same address, for as long as the
    ///   returned value lives (its owner must drop the pool built over it
    ///   before the arena);
    /// - nothing else may read or write the KFENCE region's bytes meanwhile
    ///   (the pool makes its pages inaccessible).
    pub(crate) unsafe fn new(
        arena: &Arena,
        is_preserved: Box<dyn PreservedQuery>,
    ) -> Result<RegionMemory> {
        let layout = *arena.layout();
        Self::over(
            arena.base_ptr() as usize,
            layout,
            layout.kfence.start,
            layout.kfence.end,
            is_preserved,
        )
    }

    /// Pages `first..end` of an arena mapped at `base` with `layout`; the
    /// pages need not be KFENCE pages, which is what lets a misplaced pool
    /// be refused.
    fn over(
        base: usize,
        layout: Layout,
        first: Pfn,
        end: Pfn,
        is_preserved: Box<dyn PreservedQuery>,
    ) -> Result<RegionMemory> {
        let pages = end.raw().saturating_sub(first.raw());
        let offset = first.raw().checked_mul(PAGE_SIZE);
        let start = offset
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| base.checked_add(o));
        let (Some(start), Ok(pages)) = (start, usize::try_from(pages)) else {
            return Err(KfenceError::TooSmall {
                objects: 0,
                expected: 0,
                found: 0,
            });
        };
        Ok(RegionMemory {
            base: start,
            pages,
            first,
            layout,
            is_preserved,
        })
    }

    /// Pages `first..end` of `arena`, whatever their region: for pools
    /// deliberately placed elsewhere (which [`Pool::new`](super::Pool::new)
    /// then refuses unless every page is general or KFENCE memory).
    ///
    /// # Safety
    ///
    /// As for [`RegionMemory::new`], for pages `first..end`, which must lie
    /// inside the arena.
    #[cfg(test)]
    pub(crate) unsafe fn pages_of(
        arena: &Arena,
        first: Pfn,
        end: Pfn,
        is_preserved: Box<dyn PreservedQuery>,
    ) -> Result<RegionMemory> {
        let end = Pfn(end.raw().min(arena.pages()));
        Self::over(
            arena.base_ptr() as usize,
            *arena.layout(),
            first,
            end,
            is_preserved,
        )
    }
}

// SAFETY:
// - `base` is the arena mapping's base (page aligned, as every mmap) plus a
//   whole number of pages, and the pages lie inside the mapping (`new` takes
//   the layout's KFENCE range; `pages_of` clamps to the arena);
// - the constructors' callers promise the mapping outlives the value and
//   that nothing else touches those bytes;
// - all fields are fixed at construction.
unsafe impl PoolMemory for RegionMemory {
    fn base(&self) -> *mut u8 {
        self.base as *mut u8
    }

    fn pages(&self) -> usize {
        self.pages
    }

    fn phys_base(&self) -> PhysAddr {
        self.first.addr().unwrap_or(PhysAddr(u64::MAX))
    }

    fn classify(&self, page: usize) -> PageClass {
        match self.region_class(page) {
            Ok((pfn, class)) => {
                if self.is_preserved.is_preserved(pfn) {
                    PageClass::Preserved
                } else {
                    class
                }
            }
            Err(class) => class,
        }
    }

    fn try_classify(&self, page: usize) -> Option<PageClass> {
        Some(match self.region_class(page) {
            Ok((pfn, class)) => {
                if self.is_preserved.try_is_preserved(pfn)? {
                    PageClass::Preserved
                } else {
                    class
                }
            }
            Err(class) => class,
        })
    }
}

impl RegionMemory {
    /// The PFN of pool page `page` and its class by region, if that region
    /// may hold pool pages (then its preserved state decides); otherwise
    /// the final class.
    fn region_class(&self, page: usize) -> std::result::Result<(Pfn, PageClass), PageClass> {
        let pfn = self
            .first
            .checked_add(page as u64)
            .ok_or(PageClass::Reserved)?;
        match self.layout.region_of(pfn) {
            Some(Region::Kfence) => Ok((pfn, PageClass::Kfence)),
            Some(Region::General) => Ok((pfn, PageClass::General)),
            Some(Region::Scratch) => Err(PageClass::Scratch),
            Some(Region::Preservable) => Err(PageClass::Preservable),
            _ => Err(PageClass::Reserved),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kfence::{CacheTag, Pool, PoolConfig};
    use crate::layout::ArenaConfig;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn arena() -> Arena {
        let mut config = ArenaConfig::with_size(8 << 20);
        config.kfence = 64 * PAGE_SIZE;
        Arena::anonymous(&config).expect("arena")
    }

    #[test]
    #[cfg_attr(miri, ignore = "mprotect")]
    fn pool_over_the_kfence_region() {
        let arena = arena();
        // SAFETY: the arena outlives the pool (dropped first, below) and
        // nothing else touches its KFENCE region in this test.
        let memory = unsafe { RegionMemory::new(&arena, Box::new(|_| false)) }.unwrap();
        let objects = (memory.pages() - 1) / 2;
        let pool = Pool::new(
            Box::new(memory),
            PoolConfig {
                objects,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        let kfence = arena.layout().bytes_of(Region::Kfence);
        let r = pool.ranges()[0];
        assert!(r.start >= kfence.start && r.start + r.len <= kfence.start + kfence.len);
        let p = pool.alloc(100, 8, CacheTag::size_class(100)).unwrap();
        let phys = pool.phys_addr(p.as_ptr()).unwrap();
        assert_eq!(arena.region_of(phys.pfn()), Some(Region::Kfence));
        // SAFETY: `p` is a live pool object, not used after this free.
        unsafe { pool.free(p.as_ptr()) }.unwrap();
        drop(pool);
        drop(arena);
    }

    #[test]
    #[cfg_attr(miri, ignore)]
    fn pools_outside_the_kfence_region_are_refused() {
        let arena = arena();
        let layout = *arena.layout();
        for (region, class) in [
            (layout.scratch, PageClass::Scratch),
            (layout.preservable, PageClass::Preservable),
        ] {
            // SAFETY: construction fails before any page is touched; the
            // arena outlives the attempt.
            let memory = unsafe {
                RegionMemory::pages_of(&arena, region.start, region.end, Box::new(|_| false))
            }
            .unwrap();
            match Pool::new(
                Box::new(memory),
                PoolConfig {
                    objects: 1,
                    ..PoolConfig::default()
                },
            ) {
                Err(KfenceError::Excluded { offset, found }) => {
                    assert_eq!(found, class);
                    assert_eq!(Some(offset), region.start.addr());
                }
                other => panic!("{other:?}"),
            }
        }
        // A KFENCE page that is (wrongly) preserved is refused too.
        let preserved = Arc::new(AtomicU64::new(layout.kfence.start.raw() + 2));
        let q = Arc::clone(&preserved);
        // SAFETY: as above.
        let memory = unsafe {
            RegionMemory::new(
                &arena,
                Box::new(move |pfn: Pfn| pfn.raw() == q.load(Ordering::Relaxed)),
            )
        }
        .unwrap();
        assert!(matches!(
            Pool::new(
                Box::new(memory),
                PoolConfig {
                    objects: 4,
                    ..PoolConfig::default()
                }
            ),
            Err(KfenceError::Excluded {
                found: PageClass::Preserved,
                ..
            })
        ));
    }
}
