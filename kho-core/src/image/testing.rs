//! Building deliberately malformed images, for tests, fuzz seeds and
//! fixture generators (kho's own tests, its fuzz targets and `kho`'s
//! `gen-fixtures` use it; so can a successor's tests of its own error
//! handling). Nothing here is needed to write or read a valid image:
//! [`ImageBuilder`](super::ImageBuilder) and [`Image`] do that.
//!
//! [`RawImage`] is an image taken apart into editable fields. Start from a
//! valid one ([`RawImage::from_image`]), change what a test needs (a CRC, a
//! size, a payload), and reassemble with [`RawImage::to_bytes`]. Fields left
//! as `None` are computed as the writer would, so a change to one field does
//! not trip an unrelated check (a new payload gets a matching CRC unless
//! `crc` is forced).

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use super::layout::{
    RawBlock, RawExtent, RawHeader, RawRange, RawSection, RawSlabCache, RawSlabHeader, RawSlabPage,
    CACHE_NAME_LEN, ENTRY_SIZE, HEADER_SIZE, MAGIC, VERSION_MAJOR, VERSION_MINOR,
};
use super::parse::header_crc;
use super::{Image, SectionKind};
use crate::addr::PAGE_SHIFT;

/// One section of a [`RawImage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSectionSpec {
    /// Kind code.
    pub kind: u32,
    /// Flags.
    pub flags: u32,
    /// The bytes written at the section's position.
    pub payload: Vec<u8>,
    /// Offset written in the entry; `None` for the real position.
    pub offset: Option<u64>,
    /// Length written in the entry; `None` for the payload length.
    pub len: Option<u64>,
    /// CRC written in the entry; `None` for the payload's CRC.
    pub crc: Option<u32>,
    /// The entry's reserved field.
    pub reserved: u32,
    /// Padding bytes written before the payload (on top of 8-byte
    /// alignment).
    pub gap: Vec<u8>,
}

impl RawSectionSpec {
    /// A section with computed offset, length and CRC.
    pub fn new(kind: u32, flags: u32, payload: Vec<u8>) -> Self {
        RawSectionSpec {
            kind,
            flags,
            payload,
            offset: None,
            len: None,
            crc: None,
            reserved: 0,
            gap: Vec::new(),
        }
    }
}

/// An image as editable parts; see the [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawImage {
    /// Magic bytes.
    pub magic: [u8; 8],
    /// `header_size`; `None` for 72 plus the tail.
    pub header_size: Option<u32>,
    /// Bytes written after the 72 known header bytes.
    pub header_tail: Vec<u8>,
    /// Major version.
    pub version_major: u16,
    /// Minor version.
    pub version_minor: u16,
    /// Page shift.
    pub page_shift: u32,
    /// Header flags.
    pub flags: u32,
    /// Arena size in bytes.
    pub arena_size: u64,
    /// Generation.
    pub generation: u64,
    /// `image_len`; `None` for the real length.
    pub image_len: Option<u64>,
    /// `table_offset`; `None` for the real position.
    pub table_offset: Option<u64>,
    /// `section_count`; `None` for the number of sections.
    pub section_count: Option<u32>,
    /// Entry size; extra bytes past 32 are written as `entry_tail`.
    pub entry_size: u32,
    /// Bytes written after the 32 known bytes of every entry.
    pub entry_tail: Vec<u8>,
    /// `table_crc32`; `None` for the real CRC.
    pub table_crc: Option<u32>,
    /// `header_crc32`; `None` for the real CRC.
    pub header_crc: Option<u32>,
    /// Sections in table and layout order.
    pub sections: Vec<RawSectionSpec>,
    /// Bytes appended after the last section (before `image_len` rounding).
    pub trailer: Vec<u8>,
}

impl RawImage {
    /// An empty-but-valid v1 image for an arena of `arena_size` bytes: an
    /// empty MEMMAP and nothing else.
    pub fn new(arena_size: u64) -> Self {
        RawImage {
            magic: MAGIC,
            header_size: None,
            header_tail: Vec::new(),
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            page_shift: PAGE_SHIFT,
            flags: 0,
            arena_size,
            generation: 0,
            image_len: None,
            table_offset: None,
            section_count: None,
            entry_size: ENTRY_SIZE as u32,
            entry_tail: Vec::new(),
            table_crc: None,
            header_crc: None,
            sections: vec![RawSectionSpec::new(
                SectionKind::Memmap.raw(),
                super::layout::SECTION_REQUIRED,
                Vec::new(),
            )],
            trailer: Vec::new(),
        }
    }

    /// Take a valid image apart.
    pub fn from_image(image: &Image<'_>) -> Self {
        let h = image.header();
        let bytes = image.bytes();
        RawImage {
            magic: MAGIC,
            header_size: None,
            header_tail: bytes
                .get(HEADER_SIZE..h.header_size as usize)
                .unwrap_or(&[])
                .to_vec(),
            version_major: h.version_major,
            version_minor: h.version_minor,
            page_shift: h.page_shift,
            flags: h.flags,
            arena_size: h.arena_size,
            generation: h.generation,
            image_len: None,
            table_offset: None,
            section_count: None,
            entry_size: ENTRY_SIZE as u32,
            entry_tail: Vec::new(),
            table_crc: None,
            header_crc: None,
            sections: image
                .sections()
                .map(|s| {
                    let payload = bytes
                        .get(s.offset as usize..(s.offset + s.len) as usize)
                        .unwrap_or(&[])
                        .to_vec();
                    RawSectionSpec::new(s.kind.raw(), s.flags, payload)
                })
                .collect(),
            trailer: Vec::new(),
        }
    }

    /// The section of `kind`, if any.
    pub fn section_mut(&mut self, kind: SectionKind) -> Option<&mut RawSectionSpec> {
        self.sections.iter_mut().find(|s| s.kind == kind.raw())
    }

    /// Replace (or add, keeping layout order) the payload of `kind`.
    pub fn set_payload(&mut self, kind: SectionKind, payload: Vec<u8>) -> &mut Self {
        if let Some(s) = self.section_mut(kind) {
            s.payload = payload;
        } else {
            let at = self
                .sections
                .iter()
                .position(|s| s.kind > kind.raw())
                .unwrap_or(self.sections.len());
            self.sections.insert(
                at,
                RawSectionSpec::new(kind.raw(), super::layout::SECTION_REQUIRED, payload),
            );
        }
        self
    }

    /// Assemble the bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header_len = HEADER_SIZE + self.header_tail.len();
        let mut out = vec![0u8; header_len];
        out[HEADER_SIZE..].copy_from_slice(&self.header_tail);
        let table_at = align8(out.len());
        let entry_size = self.entry_size as usize;
        out.resize(table_at + entry_size * self.sections.len(), 0);
        let mut entries = Vec::new();
        for s in &self.sections {
            out.extend_from_slice(&s.gap);
            out.resize(align8(out.len()), 0);
            let offset = out.len() as u64;
            out.extend_from_slice(&s.payload);
            entries.push(RawSection {
                kind: U32::new(s.kind),
                flags: U32::new(s.flags),
                offset: U64::new(s.offset.unwrap_or(offset)),
                len: U64::new(s.len.unwrap_or(s.payload.len() as u64)),
                crc32: U32::new(s.crc.unwrap_or_else(|| crc32fast::hash(&s.payload))),
                reserved: U32::new(s.reserved),
            });
        }
        out.extend_from_slice(&self.trailer);
        out.resize(align8(out.len()), 0);
        for (i, e) in entries.iter().enumerate() {
            let at = table_at + i * entry_size;
            let mut entry = e.as_bytes().to_vec();
            entry.extend_from_slice(&self.entry_tail);
            entry.resize(entry_size, 0);
            if let Some(dst) = out.get_mut(at..at + entry_size) {
                dst.copy_from_slice(&entry);
            }
        }
        let table_crc = crc32fast::hash(
            out.get(table_at..table_at + entry_size * self.sections.len())
                .unwrap_or(&[]),
        );
        let header = RawHeader {
            magic: self.magic,
            header_size: U32::new(self.header_size.unwrap_or(header_len as u32)),
            version_major: U16::new(self.version_major),
            version_minor: U16::new(self.version_minor),
            page_shift: U32::new(self.page_shift),
            flags: U32::new(self.flags),
            arena_size: U64::new(self.arena_size),
            image_len: U64::new(self.image_len.unwrap_or(out.len() as u64)),
            generation: U64::new(self.generation),
            table_offset: U64::new(self.table_offset.unwrap_or(table_at as u64)),
            section_count: U32::new(self.section_count.unwrap_or(self.sections.len() as u32)),
            entry_size: U32::new(self.entry_size),
            table_crc32: U32::new(self.table_crc.unwrap_or(table_crc)),
            header_crc32: U32::new(0),
        };
        out[..HEADER_SIZE].copy_from_slice(header.as_bytes());
        let crc = self.header_crc.unwrap_or_else(|| {
            let hs = (self.header_size.unwrap_or(header_len as u32) as usize).min(out.len());
            header_crc(&out[..hs])
        });
        out[68..72].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Encode one MEMMAP block. The key is `base_pfn | order`, so a
    /// `base_pfn` with any of its low 12 bits set changes the order field:
    /// that is how a test writes an out-of-range order.
    pub fn block(base_pfn: u64, order: u8, bits: &[u64; 64]) -> Vec<u8> {
        RawBlock::new(base_pfn, order, bits.map(U64::new))
            .as_bytes()
            .to_vec()
    }

    /// Encode one SCRATCH or KFENCE range.
    pub fn range(start: u64, len: u64) -> Vec<u8> {
        RawRange {
            start: U64::new(start),
            len: U64::new(len),
        }
        .as_bytes()
        .to_vec()
    }

    /// Encode one EXTENTS record.
    pub fn extent(start: u64, len: u64, tag: u32) -> Vec<u8> {
        RawExtent {
            start: U64::new(start),
            len: U64::new(len),
            tag: U32::new(tag),
            reserved: U32::new(0),
        }
        .as_bytes()
        .to_vec()
    }

    /// Encode a SLAB section header.
    pub fn slab_header(caches: u32, pages: u32, words: u32) -> Vec<u8> {
        RawSlabHeader {
            cache_count: U32::new(caches),
            page_count: U32::new(pages),
            word_count: U32::new(words),
            reserved: U32::new(0),
        }
        .as_bytes()
        .to_vec()
    }

    /// Encode a SLAB cache record; `name` is truncated to 32 bytes.
    pub fn slab_cache(
        id: u32,
        name: &[u8],
        object_size: u32,
        align: u32,
        objects_per_slab: u32,
        order: u8,
    ) -> Vec<u8> {
        let mut n = [0u8; CACHE_NAME_LEN];
        let len = name.len().min(CACHE_NAME_LEN);
        n[..len].copy_from_slice(&name[..len]);
        RawSlabCache {
            id: U32::new(id),
            object_size: U32::new(object_size),
            align: U32::new(align),
            objects_per_slab: U32::new(objects_per_slab),
            order,
            reserved: [0; 7],
            name: n,
        }
        .as_bytes()
        .to_vec()
    }

    /// Encode a SLAB page record; fields in on-image order.
    #[allow(clippy::too_many_arguments)]
    pub fn slab_page(
        pfn: u64,
        cache_id: u32,
        order: u8,
        object_size: u32,
        object_count: u32,
        first_offset: u32,
        bitmap_words: u32,
        bitmap_index: u32,
    ) -> Vec<u8> {
        RawSlabPage {
            pfn: U64::new(pfn),
            cache_id: U32::new(cache_id),
            order,
            reserved: [0; 3],
            object_size: U32::new(object_size),
            object_count: U32::new(object_count),
            first_offset: U32::new(first_offset),
            bitmap_words: U32::new(bitmap_words),
            bitmap_index: U32::new(bitmap_index),
            reserved2: U32::new(0),
        }
        .as_bytes()
        .to_vec()
    }
}

fn align8(v: usize) -> usize {
    (v + 7) & !7
}
