//! The memory a pool is built from, and what each of its pages is.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use kho_core::{PhysAddr, PAGE_SIZE};

use super::{KfenceError, Result};

/// What a page of the memory under a pool is, for the exclusion check.
///
/// Only [`PageClass::General`] and [`PageClass::Kfence`] pages may hold a
/// pool; everything else is refused at construction and at every sampled
/// allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PageClass {
    /// General-purpose memory.
    General,
    /// The arena's KFENCE region.
    Kfence,
    /// Scratch memory: the successor's bootstrap allocations land here.
    Scratch,
    /// The preservable pool.
    Preservable,
    /// A page currently recorded as preserved.
    Preserved,
    /// Anything else the pool must not touch (superblocks, outside the arena).
    Reserved,
}

impl PageClass {
    /// Whether a pool may use a page of this class.
    #[inline]
    pub const fn is_poolable(self) -> bool {
        matches!(self, PageClass::General | PageClass::Kfence)
    }

    /// Lower-case name, for messages.
    pub const fn name(self) -> &'static str {
        match self {
            PageClass::General => "general",
            PageClass::Kfence => "kfence",
            PageClass::Scratch => "scratch",
            PageClass::Preservable => "preservable",
            PageClass::Preserved => "preserved",
            PageClass::Reserved => "reserved",
        }
    }

    const fn to_u8(self) -> u8 {
        match self {
            PageClass::General => 0,
            PageClass::Kfence => 1,
            PageClass::Scratch => 2,
            PageClass::Preservable => 3,
            PageClass::Preserved => 4,
            PageClass::Reserved => 5,
        }
    }

    const fn from_u8(v: u8) -> PageClass {
        match v {
            0 => PageClass::General,
            1 => PageClass::Kfence,
            2 => PageClass::Scratch,
            3 => PageClass::Preservable,
            4 => PageClass::Preserved,
            _ => PageClass::Reserved,
        }
    }
}

impl fmt::Display for PageClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Memory a [`Pool`](super::Pool) is laid out in: a page-aligned run of
/// pages, each classified for the exclusion check.
///
/// # Safety
///
/// An implementation promises that:
/// - `base()` is aligned to [`PAGE_SIZE`] and `base()..base() + pages() *
///   PAGE_SIZE` is a readable and writable mapping that stays mapped, at the
///   same address, for as long as the value lives;
/// - nothing but the pool reads, writes or changes the protection of those
///   bytes while the value is owned by a pool (the pool makes pages
///   inaccessible with `mprotect`);
/// - `base()`, `pages()` and `phys_base()` return the same values on every
///   call.
pub unsafe trait PoolMemory: Send + Sync {
    /// Address of the first page.
    fn base(&self) -> *mut u8;
    /// Number of pages.
    fn pages(&self) -> usize;
    /// Arena offset of the first page, for [`Pool::ranges`](super::Pool::ranges)
    /// and reports.
    fn phys_base(&self) -> PhysAddr;
    /// What page `page` (an index from 0) currently is. Called for every pool
    /// page at construction; may wait for locks.
    fn classify(&self, page: usize) -> PageClass;

    /// [`classify`](Self::classify) without waiting: `None` when the class
    /// cannot be told right now. Called for an object's page at every
    /// sampled allocation, so a page preserved later is still refused; a
    /// `None` keeps that object out of the page this time. The default
    /// asks `classify`, for implementations that never wait.
    fn try_classify(&self, page: usize) -> Option<PageClass> {
        Some(self.classify(page))
    }
}

/// A [`PoolMemory`] over a private anonymous mapping, with a per-page class
/// the owner can change. Useful standalone and in tests; `phys_base` is a
/// chosen offset so that ranges look like arena ranges.
pub struct AnonMemory {
    map: memmap2::MmapMut,
    pages: usize,
    phys_base: PhysAddr,
    classes: Box<[AtomicU8]>,
}

impl fmt::Debug for AnonMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnonMemory")
            .field("base", &self.map.as_ptr())
            .field("pages", &self.pages)
            .field("phys_base", &self.phys_base)
            .finish()
    }
}

impl AnonMemory {
    /// `pages` pages of fresh anonymous memory, all [`PageClass::Kfence`],
    /// at arena offset 0.
    pub fn new(pages: usize) -> Result<Self> {
        Self::with_phys_base(pages, PhysAddr(0))
    }

    /// Like [`AnonMemory::new`], reporting `phys_base` as the arena offset of
    /// the first page.
    pub fn with_phys_base(pages: usize, phys_base: PhysAddr) -> Result<Self> {
        let len = pages
            .checked_mul(PAGE_SIZE as usize)
            .ok_or(KfenceError::Map {
                len: usize::MAX,
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })?;
        let map = memmap2::MmapMut::map_anon(len.max(1))
            .map_err(|source| KfenceError::Map { len, source })?;
        if map.as_ptr() as usize % PAGE_SIZE as usize != 0 {
            return Err(KfenceError::Misaligned {
                expected: PAGE_SIZE,
                found: map.as_ptr() as usize,
            });
        }
        let classes = (0..pages)
            .map(|_| AtomicU8::new(PageClass::Kfence.to_u8()))
            .collect();
        Ok(AnonMemory {
            map,
            pages,
            phys_base,
            classes,
        })
    }

    /// Sets the class of pages `first..first + count` (pages past the end
    /// are ignored).
    pub fn set_class(&self, first: usize, count: usize, class: PageClass) {
        let end = first.saturating_add(count).min(self.pages);
        for c in self.classes.get(first..end).unwrap_or(&[]) {
            c.store(class.to_u8(), Ordering::Release);
        }
    }
}

// SAFETY:
// - the mapping is created by mmap, hence page aligned (checked in the
//   constructor), readable and writable, and it is unmapped only on drop;
// - the mapping is private to this value, which exposes no access to the
//   bytes, so only the pool that owns the value touches them;
// - `pages` and `phys_base` are fixed at construction.
unsafe impl PoolMemory for AnonMemory {
    fn base(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }

    fn pages(&self) -> usize {
        self.pages
    }

    fn phys_base(&self) -> PhysAddr {
        self.phys_base
    }

    fn classify(&self, page: usize) -> PageClass {
        self.classes.get(page).map_or(PageClass::Reserved, |c| {
            PageClass::from_u8(c.load(Ordering::Acquire))
        })
    }
}
