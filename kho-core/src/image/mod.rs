//! The handover image, format v1: writer, zero-copy validating reader and
//! restorer.
//!
//! An image is one contiguous, little-endian byte string:
//!
//! ```text
//! 0        72                    72 + 32*n
//! +--------+---------------------+----------+----------+-----+
//! | header | section table (n×32) | MEMMAP   | SCRATCH  | ... |
//! +--------+---------------------+----------+----------+-----+
//!   magic, header_size, version, page shift, arena size,
//!   image length, table location + CRC, header CRC
//! ```
//!
//! Sections are 8-byte aligned arrays of `#[repr(C)]` records (see
//! [`layout`]), each covered by a CRC32 in its table entry; only the metadata
//! tree is postcard. `docs/FORMAT.md` is the byte-exact specification.
//!
//! [`ImageBuilder`] writes an image and refuses to emit one its reader would
//! reject. [`Image::parse`] validates untrusted bytes completely, in the
//! order FORMAT.md gives, and then answers queries straight from the input
//! slice: [`Image::is_preserved`] binary-searches the mapped MEMMAP blocks.
//! [`Restorer`] hands out every preserved folio exactly once.
//!
//! ```
//! use kho_core::{Image, ImageBuilder, Order, Pfn, PhysAddr, PhysRange, PreservedMap, Restorer};
//!
//! let arena = 64 << 20; // 64 MiB
//! let mut map = PreservedMap::new(Pfn(arena >> 12));
//! map.preserve(Pfn(0x200), Order::new(9).unwrap())?;
//! map.preserve_range(PhysAddr(0x10_000), 0x3000)?;
//! let bytes = ImageBuilder::new(arena)
//!     .memmap(&map)
//!     .scratch(vec![PhysRange::new(PhysAddr(0), 0x10_000)])
//!     .build()?;
//!
//! let image = Image::parse(&bytes)?;
//! assert_eq!(image.is_preserved(Pfn(0x2ff)), Some((Pfn(0x200), Order::new(9).unwrap())));
//! let mut restorer = Restorer::new(&image);
//! assert_eq!(restorer.restore_folio(Pfn(0x200))?, Order::new(9).unwrap());
//! assert!(restorer.restore_folio(Pfn(0x200)).is_err()); // only once
//! assert_eq!(restorer.restore_all().count(), 2); // 0x10 (order 1) and 0x12
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;

use crate::addr::{Order, Pfn, PhysRange};

mod build;
mod error;
pub mod layout;
mod parse;
mod restore;
mod slab;
pub mod testing;
mod walk;

pub use build::ImageBuilder;
pub use error::{BuildError, ParseError, RestoreError};
pub use parse::{ExtentIter, Image, ImageBlocks, ImageHeader, RangeIter, SectionInfo, SectionIter};
pub use restore::{RestoreAll, Restorer};
pub use slab::{SlabCacheIter, SlabCacheView, SlabPageIter, SlabPageView};
pub use walk::{ImageFolios, ImageRanges};

/// Result alias for parsing.
pub type ParseResult<T> = Result<T, ParseError>;

/// The kind of a section, from its table entry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SectionKind {
    /// 1: preserved-memory bitmap blocks.
    Memmap,
    /// 2: scratch ranges.
    Scratch,
    /// 3: KFENCE pool ranges.
    Kfence,
    /// 4: slab caches and preserved slab pages.
    Slab,
    /// 5: valid byte extents inside preserved memory.
    Extents,
    /// 6: the postcard-encoded metadata tree.
    Tree,
    /// A kind this version does not know.
    Unknown(u32),
}

impl SectionKind {
    /// The kinds of format v1, in the order the writer lays them out.
    pub const KNOWN: [SectionKind; 6] = [
        SectionKind::Memmap,
        SectionKind::Scratch,
        SectionKind::Kfence,
        SectionKind::Slab,
        SectionKind::Extents,
        SectionKind::Tree,
    ];

    /// The kind for an on-image code.
    pub const fn from_raw(raw: u32) -> SectionKind {
        match raw {
            1 => SectionKind::Memmap,
            2 => SectionKind::Scratch,
            3 => SectionKind::Kfence,
            4 => SectionKind::Slab,
            5 => SectionKind::Extents,
            6 => SectionKind::Tree,
            other => SectionKind::Unknown(other),
        }
    }

    /// The on-image code.
    pub const fn raw(self) -> u32 {
        match self {
            SectionKind::Memmap => 1,
            SectionKind::Scratch => 2,
            SectionKind::Kfence => 3,
            SectionKind::Slab => 4,
            SectionKind::Extents => 5,
            SectionKind::Tree => 6,
            SectionKind::Unknown(other) => other,
        }
    }

    /// Index into per-kind tables for known kinds.
    pub(crate) const fn index(self) -> Option<usize> {
        match self {
            SectionKind::Unknown(_) => None,
            known => Some(known.raw() as usize - 1),
        }
    }

    /// The upper-case name used in the specification.
    pub const fn name(self) -> &'static str {
        match self {
            SectionKind::Memmap => "MEMMAP",
            SectionKind::Scratch => "SCRATCH",
            SectionKind::Kfence => "KFENCE",
            SectionKind::Slab => "SLAB",
            SectionKind::Extents => "EXTENTS",
            SectionKind::Tree => "TREE",
            SectionKind::Unknown(_) => "UNKNOWN",
        }
    }
}

impl fmt::Display for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SectionKind::Unknown(raw) => write!(f, "UNKNOWN({raw:#x})"),
            known => f.write_str(known.name()),
        }
    }
}

impl fmt::Debug for SectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A byte range a subsystem declared valid inside preserved memory, with an
/// owner tag. Bytes of preserved folios outside every extent are stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    /// The bytes.
    pub range: PhysRange,
    /// Owner tag, chosen by the subsystem.
    pub tag: u32,
}

/// A slab cache as the writer describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlabCacheInfo {
    /// Unique id, referenced by [`SlabPageInfo::cache_id`].
    pub id: u32,
    /// Name, at most 32 bytes of UTF-8 without NUL.
    pub name: String,
    /// Object size in bytes, a non-zero multiple of `align`.
    pub object_size: u32,
    /// Object alignment, a power of two.
    pub align: u32,
    /// Objects per slab page, at least 1 and all inside a folio of `order`.
    pub objects_per_slab: u32,
    /// Order of the cache's slab folios.
    pub order: Order,
}

/// A preserved slab page as the writer describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlabPageInfo {
    /// Head PFN of the slab folio, which must be preserved with `order`.
    pub pfn: Pfn,
    /// The owning cache.
    pub cache_id: u32,
    /// Folio order, equal to the cache's.
    pub order: Order,
    /// Object size, equal to the cache's.
    pub object_size: u32,
    /// Objects in this slab, equal to the cache's `objects_per_slab`.
    pub object_count: u32,
    /// Offset of object 0 from the folio start, a multiple of the cache's
    /// `align`; the objects must end inside the folio.
    pub first_offset: u32,
    /// Allocation bitmap, bit `i` for object `i`; exactly
    /// `ceil(object_count / 64)` words.
    pub bitmap: Vec<u64>,
}
