//! Arena geometry: which pages are superblocks, scratch, KFENCE pool,
//! preservable pool and general memory.
//!
//! ```text
//! page 0      1      2 ...          ...             ...               pages
//!     | sb 0 | sb 1 | scratch      | kfence | preservable  | general      |
//! ```
//!
//! Regions are contiguous and in this order. The preservable and general
//! regions start on a boundary of `min(2^max_order, 512)` pages so that
//! large folios are available in both; the scratch region absorbs the
//! padding.

use kho_core::{Order, Pfn, PfnRange, PhysAddr, MAX_MAP_ORDER, PAGE_SIZE};

use crate::error::{Error, Result};

/// Pages taken by the two superblock slots.
pub const SUPERBLOCK_PAGES: u64 = 2;
/// Smallest buddy `MAX_ORDER` accepted (4 MiB blocks).
pub const MIN_MAX_ORDER: u8 = 10;
/// Default buddy `MAX_ORDER`.
pub const DEFAULT_MAX_ORDER: u8 = 10;
/// Smallest arena: 64 pages.
pub const MIN_ARENA_SIZE: u64 = 64 * PAGE_SIZE;

/// What a page of the arena is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    /// Pages 0 and 1: the two superblock slots.
    Superblock,
    /// Bootstrap memory of a successor before restore; never preserved.
    Scratch,
    /// Pool of pages for preservable allocations only.
    Preservable,
    /// General-purpose memory.
    General,
    /// The KFENCE sampler's pool; never preserved.
    Kfence,
}

impl Region {
    /// Lower-case name, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            Region::Superblock => "superblock",
            Region::Scratch => "scratch",
            Region::Preservable => "preservable",
            Region::General => "general",
            Region::Kfence => "kfence",
        }
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The geometry of an arena, in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Total pages in the arena.
    pub pages: u64,
    /// Largest buddy order.
    pub max_order: Order,
    /// The superblock pages `[0, 2)`.
    pub superblock: PfnRange,
    /// Scratch memory.
    pub scratch: PfnRange,
    /// The KFENCE pool.
    pub kfence: PfnRange,
    /// The preservable pool.
    pub preservable: PfnRange,
    /// General memory.
    pub general: PfnRange,
}

impl Layout {
    /// Arena size in bytes.
    pub fn size(&self) -> u64 {
        self.pages * PAGE_SIZE
    }

    /// The region holding `pfn`, or `None` past the end of the arena.
    #[inline]
    pub fn region_of(&self, pfn: Pfn) -> Option<Region> {
        let within = |r: &PfnRange| r.start <= pfn && pfn < r.end;
        if within(&self.general) {
            Some(Region::General)
        } else if within(&self.preservable) {
            Some(Region::Preservable)
        } else if within(&self.kfence) {
            Some(Region::Kfence)
        } else if within(&self.scratch) {
            Some(Region::Scratch)
        } else if within(&self.superblock) {
            Some(Region::Superblock)
        } else {
            None
        }
    }

    /// The page range of `region`.
    pub fn range(&self, region: Region) -> PfnRange {
        match region {
            Region::Superblock => self.superblock,
            Region::Scratch => self.scratch,
            Region::Preservable => self.preservable,
            Region::General => self.general,
            Region::Kfence => self.kfence,
        }
    }

    /// The regions in address order with their ranges.
    pub fn regions(&self) -> [(Region, PfnRange); 5] {
        [
            (Region::Superblock, self.superblock),
            (Region::Scratch, self.scratch),
            (Region::Kfence, self.kfence),
            (Region::Preservable, self.preservable),
            (Region::General, self.general),
        ]
    }

    /// The byte range of `region`.
    pub fn bytes_of(&self, region: Region) -> kho_core::PhysRange {
        let r = self.range(region);
        kho_core::PhysRange::new(PhysAddr(r.start.0 * PAGE_SIZE), r.bytes())
    }

    /// Check that the regions tile the arena in the documented order.
    /// Returns the name of the first inconsistent field with the value it
    /// should have had and the value found.
    pub(crate) fn check(&self) -> std::result::Result<(), (&'static str, u64, u64)> {
        let mut expect = 0u64;
        for (name, r) in [
            ("superblock", self.superblock),
            ("scratch start", self.scratch),
            ("kfence start", self.kfence),
            ("preservable start", self.preservable),
            ("general start", self.general),
        ] {
            if r.start.0 != expect {
                return Err((name, expect, r.start.0));
            }
            if r.end < r.start || r.end.0 > self.pages {
                return Err(("region end", self.pages, r.end.0));
            }
            expect = r.end.0;
        }
        if self.general.end.0 != self.pages {
            return Err(("general end", self.pages, self.general.end.0));
        }
        if self.superblock.end.0 != SUPERBLOCK_PAGES {
            return Err(("superblock end", SUPERBLOCK_PAGES, self.superblock.end.0));
        }
        if self.max_order.get() < MIN_MAX_ORDER {
            return Err((
                "max order",
                u64::from(MIN_MAX_ORDER),
                u64::from(self.max_order.get()),
            ));
        }
        Ok(())
    }
}

/// How to carve a new arena. Sizes are in bytes and rounded up to pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaConfig {
    /// Total arena size.
    pub size: u64,
    /// Scratch memory (excluding the two superblock pages).
    pub scratch: u64,
    /// KFENCE pool.
    pub kfence: u64,
    /// Preservable pool.
    pub preservable: u64,
    /// Largest buddy order, `10..=18`.
    pub max_order: u8,
}

impl Default for ArenaConfig {
    /// A 1 GiB arena: 16 MiB scratch, 2 MiB KFENCE pool (255 objects and
    /// their guards, as the kernel's default), 256 MiB preservable pool.
    fn default() -> Self {
        ArenaConfig::with_size(1 << 30)
    }
}

impl ArenaConfig {
    /// Defaults scaled to `size`: scratch 1/64, KFENCE 1/512 (at most
    /// 2 MiB), preservable 1/4, the rest general.
    pub fn with_size(size: u64) -> Self {
        let pages = |b: u64| b / PAGE_SIZE * PAGE_SIZE;
        ArenaConfig {
            size,
            scratch: pages((size / 64).max(4 * PAGE_SIZE)) - SUPERBLOCK_PAGES * PAGE_SIZE,
            kfence: pages((size / 512).clamp(4 * PAGE_SIZE, 2 << 20)),
            preservable: pages(size / 4),
            max_order: DEFAULT_MAX_ORDER,
        }
    }

    /// Compute the layout, or say which setting does not fit.
    pub fn layout(&self) -> Result<Layout> {
        let bad = |what, value, limit| Error::InvalidConfig { what, value, limit };
        if self.size < MIN_ARENA_SIZE {
            return Err(Error::TooSmall {
                len: self.size,
                min: MIN_ARENA_SIZE,
            });
        }
        if self.size % PAGE_SIZE != 0 {
            return Err(bad("size not page aligned", self.size, PAGE_SIZE));
        }
        if !(MIN_MAX_ORDER..=MAX_MAP_ORDER).contains(&self.max_order) {
            return Err(bad(
                "max order",
                u64::from(self.max_order),
                u64::from(MAX_MAP_ORDER),
            ));
        }
        let max_order = Order::new(self.max_order).ok_or(bad(
            "max order",
            u64::from(self.max_order),
            u64::from(MAX_MAP_ORDER),
        ))?;
        let pages = self.size / PAGE_SIZE;
        let up = |b: u64| b.div_ceil(PAGE_SIZE);
        // Large folios in both pools, but never so coarse that padding
        // eats a small arena.
        let align = max_order
            .pages()
            .min(512)
            .min(1 << (63 - (pages / 8).max(1).leading_zeros()));
        let scratch = up(self.scratch);
        let kfence = up(self.kfence);
        let preservable = up(self.preservable).next_multiple_of(align);
        let kfence_end = SUPERBLOCK_PAGES
            .checked_add(scratch)
            .and_then(|p| p.checked_add(kfence))
            .and_then(|p| p.checked_next_multiple_of(align))
            .ok_or(bad("scratch + kfence", self.scratch, self.size))?;
        let general_start = kfence_end
            .checked_add(preservable)
            .filter(|&p| p < pages)
            .ok_or(bad(
                "scratch + kfence + preservable",
                (kfence_end.saturating_add(preservable)).saturating_mul(PAGE_SIZE),
                self.size,
            ))?;
        let r = |s: u64, e: u64| PfnRange {
            start: Pfn(s),
            end: Pfn(e),
        };
        let kfence_start = kfence_end - kfence;
        let layout = Layout {
            pages,
            max_order,
            superblock: r(0, SUPERBLOCK_PAGES),
            scratch: r(SUPERBLOCK_PAGES, kfence_start),
            kfence: r(kfence_start, kfence_end),
            preservable: r(kfence_end, general_start),
            general: r(general_start, pages),
        };
        debug_assert!(layout.check().is_ok());
        Ok(layout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_tiles_one_gib() {
        let l = ArenaConfig::default().layout().unwrap();
        assert_eq!(l.pages, 1 << 18);
        assert_eq!(l.scratch.start, Pfn(2));
        assert_eq!(l.scratch.end, Pfn(4096));
        assert_eq!(l.kfence.pages(), 512);
        assert_eq!(l.preservable.pages(), 65536);
        assert!(l.preservable.start.is_aligned(Order::new(9).unwrap()));
        assert!(l.general.start.is_aligned(Order::new(9).unwrap()));
        assert_eq!(l.general.end, Pfn(1 << 18));
        l.check().unwrap();
        // Every page has exactly one region, and region_of agrees.
        let mut count = 0;
        for (reg, range) in l.regions() {
            count += range.pages();
            assert_eq!(l.region_of(range.start), Some(reg));
            assert_eq!(l.region_of(Pfn(range.end.0 - 1)), Some(reg));
        }
        assert_eq!(count, l.pages);
        assert_eq!(l.region_of(Pfn(1 << 18)), None);
    }

    #[test]
    fn small_and_bad_configs() {
        for size in [MIN_ARENA_SIZE, 1 << 20, 16 << 20, 3 << 30] {
            let l = ArenaConfig::with_size(size).layout().unwrap();
            l.check().unwrap();
            assert!(l.general.pages() > 0, "size {size:#x}");
        }
        assert!(matches!(
            ArenaConfig::with_size(4096).layout(),
            Err(Error::TooSmall { .. })
        ));
        let mut c = ArenaConfig::with_size(1 << 20);
        c.preservable = 1 << 20;
        assert!(matches!(c.layout(), Err(Error::InvalidConfig { .. })));
        c = ArenaConfig::with_size(1 << 20);
        c.max_order = 9;
        assert!(matches!(c.layout(), Err(Error::InvalidConfig { .. })));
        c.max_order = 19;
        assert!(matches!(c.layout(), Err(Error::InvalidConfig { .. })));
        c = ArenaConfig::with_size((1 << 20) + 1);
        assert!(matches!(c.layout(), Err(Error::InvalidConfig { .. })));
        c = ArenaConfig::with_size(1 << 20);
        c.scratch = u64::MAX;
        assert!(c.layout().is_err());
    }
}
