//! Raw on-image structures of format v1, exactly as `docs/FORMAT.md`
//! describes them.
//!
//! Every struct is `#[repr(C)]`, built only from little-endian byte-order
//! types and byte arrays, so it has alignment 1 and can be viewed in place in
//! any byte slice (a file mapping included) without copying. These types say
//! nothing about validity: only [`Image::parse`](super::Image::parse) turns
//! bytes into checked views.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The eight bytes every image starts with (FORMAT.md §2). The high first
/// byte catches 7-bit transports, `\r\n` catches newline translation and
/// `\x1a` stops DOS `type`, as in PNG.
pub const MAGIC: [u8; 8] = [0x89, b'K', b'H', b'O', b'\r', b'\n', 0x1a, b'\n'];
/// The only major version this reader accepts.
pub const VERSION_MAJOR: u16 = 1;
/// The minor version this writer emits.
pub const VERSION_MINOR: u16 = 0;
/// Byte offset of `header_crc32` inside the header.
pub const HEADER_CRC_OFFSET: usize = 68;
/// Section flag bit 0: a reader that does not know the kind must reject the
/// image.
pub const SECTION_REQUIRED: u32 = 1;
/// Every alignment in the image (sections, table) is relative to its start.
pub const SECTION_ALIGN: u64 = 8;

/// The fixed header at offset 0 (FORMAT.md §2), 72 bytes in v1.0.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// 0: [`MAGIC`].
    pub magic: [u8; 8],
    /// 8: size of the header in bytes, a multiple of 8, at least 72.
    pub header_size: U32,
    /// 12: major version, must equal [`VERSION_MAJOR`].
    pub version_major: U16,
    /// 14: minor version; any value is accepted.
    pub version_minor: U16,
    /// 16: log2 of the page size, must be 12.
    pub page_shift: U32,
    /// 20: header flags; none are defined, must be zero.
    pub flags: U32,
    /// 24: arena size in bytes, a multiple of the page size.
    pub arena_size: U64,
    /// 32: total image length in bytes, a multiple of 8.
    pub image_len: U64,
    /// 40: handover generation, free for the writer to use.
    pub generation: U64,
    /// 48: offset of the section table, a multiple of 8.
    pub table_offset: U64,
    /// 56: number of section table entries.
    pub section_count: U32,
    /// 60: size of one section table entry, a multiple of 8, at least 32.
    pub entry_size: U32,
    /// 64: CRC32 of the section table bytes.
    pub table_crc32: U32,
    /// 68: CRC32 of the header bytes with this field read as zero.
    pub header_crc32: U32,
}

/// Size of [`RawHeader`]: the v1.0 header.
pub const HEADER_SIZE: usize = core::mem::size_of::<RawHeader>();

/// One section table entry (FORMAT.md §3), 32 bytes in v1.0.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSection {
    /// 0: section kind.
    pub kind: U32,
    /// 4: flags; bit 0 is [`SECTION_REQUIRED`], the others must be zero.
    pub flags: U32,
    /// 8: offset of the section from the image start, a multiple of 8.
    pub offset: U64,
    /// 16: length in bytes.
    pub len: U64,
    /// 24: CRC32 of the section bytes.
    pub crc32: U32,
    /// 28: reserved, zero.
    pub reserved: U32,
}

/// Size of [`RawSection`].
pub const ENTRY_SIZE: usize = core::mem::size_of::<RawSection>();

/// One MEMMAP bitmap block (FORMAT.md §4.1), 520 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawBlock {
    /// 0: `base_pfn | order`. The PFN of the folio bit 0 describes is a
    /// multiple of `4096 << order`, so its low 12 bits are always zero; they
    /// hold the folio order (at most 18) instead.
    pub key: U64,
    /// 8: 4096 bits, bit `i` in word `i / 64` at position `i % 64`.
    pub bits: [U64; 64],
}

impl RawBlock {
    /// The bits of [`key`](Self::key) that hold the order.
    pub const ORDER_MASK: u64 = 0xfff;

    /// A block for `base_pfn` (a multiple of 4096) and `order`.
    pub fn new(base_pfn: u64, order: u8, bits: [U64; 64]) -> RawBlock {
        RawBlock {
            key: U64::new(base_pfn | u64::from(order)),
            bits,
        }
    }

    /// The PFN of the folio bit 0 describes.
    #[inline]
    pub fn base_pfn(&self) -> u64 {
        self.key.get() & !Self::ORDER_MASK
    }

    /// The order field, not yet checked against `MAX_MAP_ORDER`.
    #[inline]
    pub fn order_field(&self) -> u64 {
        self.key.get() & Self::ORDER_MASK
    }

    /// Whether any bit is set; stops at the first non-zero word, so a
    /// populated block usually costs one read.
    #[inline]
    pub fn has_bits(&self) -> bool {
        self.bits.iter().any(|w| w.get() != 0)
    }
}

/// Size of [`RawBlock`].
pub const BLOCK_SIZE: usize = core::mem::size_of::<RawBlock>();

/// One SCRATCH or KFENCE range (FORMAT.md §4.2), 16 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawRange {
    /// 0: first byte, page aligned.
    pub start: U64,
    /// 8: length in bytes, a non-zero page multiple.
    pub len: U64,
}

/// One EXTENTS record (FORMAT.md §4.4), 24 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawExtent {
    /// 0: first byte.
    pub start: U64,
    /// 8: length in bytes, non-zero.
    pub len: U64,
    /// 16: owner tag chosen by the subsystem.
    pub tag: U32,
    /// 20: reserved, zero.
    pub reserved: U32,
}

/// The SLAB section header (FORMAT.md §4.3), 16 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSlabHeader {
    /// 0: number of cache records.
    pub cache_count: U32,
    /// 4: number of slab page records.
    pub page_count: U32,
    /// 8: number of bitmap words after the page records.
    pub word_count: U32,
    /// 12: reserved, zero.
    pub reserved: U32,
}

/// Bytes of a cache name, NUL padded.
pub const CACHE_NAME_LEN: usize = 32;

/// One SLAB cache record (FORMAT.md §4.3), 56 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSlabCache {
    /// 0: cache id, strictly increasing across records.
    pub id: U32,
    /// 4: object size in bytes, a non-zero multiple of `align`.
    pub object_size: U32,
    /// 8: object alignment, a power of two.
    pub align: U32,
    /// 12: objects per slab page, at least 1, all inside a folio of
    /// `order`.
    pub objects_per_slab: U32,
    /// 16: order of the cache's slab folios.
    pub order: u8,
    /// 17: reserved, zero.
    pub reserved: [u8; 7],
    /// 24: UTF-8 name, NUL padded; bytes after the first NUL are zero.
    pub name: [u8; CACHE_NAME_LEN],
}

/// One SLAB page record (FORMAT.md §4.3), 40 bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawSlabPage {
    /// 0: head PFN of the slab folio.
    pub pfn: U64,
    /// 8: id of the owning cache.
    pub cache_id: U32,
    /// 12: folio order, equal to the cache's.
    pub order: u8,
    /// 13: reserved, zero.
    pub reserved: [u8; 3],
    /// 16: object size, equal to the cache's.
    pub object_size: U32,
    /// 20: objects in this slab, equal to the cache's `objects_per_slab`.
    pub object_count: U32,
    /// 24: offset of object 0 from the folio start, a multiple of the
    /// cache's `align`.
    pub first_offset: U32,
    /// 28: number of bitmap words, `ceil(object_count / 64)`.
    pub bitmap_words: U32,
    /// 32: index of the first bitmap word in the word array.
    pub bitmap_index: U32,
    /// 36: reserved, zero.
    pub reserved2: U32,
}

/// Sizes of the SLAB records.
pub const SLAB_HEADER_SIZE: usize = core::mem::size_of::<RawSlabHeader>();
/// Size of [`RawSlabCache`].
pub const SLAB_CACHE_SIZE: usize = core::mem::size_of::<RawSlabCache>();
/// Size of [`RawSlabPage`].
pub const SLAB_PAGE_SIZE: usize = core::mem::size_of::<RawSlabPage>();

const _: () = {
    assert!(HEADER_SIZE == 72);
    assert!(ENTRY_SIZE == 32);
    assert!(BLOCK_SIZE == 520);
    assert!(core::mem::size_of::<RawRange>() == 16);
    assert!(core::mem::size_of::<RawExtent>() == 24);
    assert!(SLAB_HEADER_SIZE == 16);
    assert!(SLAB_CACHE_SIZE == 56);
    assert!(SLAB_PAGE_SIZE == 40);
};
