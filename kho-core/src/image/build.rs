//! The image writer.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use super::layout::{
    RawBlock, RawExtent, RawHeader, RawRange, RawSection, RawSlabCache, RawSlabHeader, RawSlabPage,
    BLOCK_SIZE, CACHE_NAME_LEN, ENTRY_SIZE, HEADER_SIZE, MAGIC, SECTION_REQUIRED, SLAB_CACHE_SIZE,
    SLAB_HEADER_SIZE, SLAB_PAGE_SIZE, VERSION_MAJOR, VERSION_MINOR,
};
use super::parse::header_crc;
use super::{BuildError, Extent, Image, SectionKind, SlabCacheInfo, SlabPageInfo};
use crate::addr::{PhysRange, PAGE_SHIFT};
use crate::memmap::PreservedMap;
use crate::tree::Tree;

/// Writes a handover image.
///
/// Collect the parts, then [`build`](Self::build). The builder sorts
/// ranges, extents, caches and slab pages, lays the sections out in the
/// order of FORMAT.md §5, and validates the result with [`Image::parse`]
/// before returning it: it never emits an image its reader rejects.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    arena_size: u64,
    generation: u64,
    memmap: Vec<u8>,
    scratch: Vec<PhysRange>,
    kfence: Vec<PhysRange>,
    caches: Vec<SlabCacheInfo>,
    pages: Vec<SlabPageInfo>,
    extents: Vec<Extent>,
    tree: Vec<u8>,
    tree_error: Option<crate::tree::TreeError>,
}

/// Round `v` up to a multiple of 8.
const fn align8(v: u64) -> u64 {
    (v + 7) & !7
}

impl ImageBuilder {
    /// An image for an arena of `arena_size` bytes, with nothing preserved.
    pub fn new(arena_size: u64) -> ImageBuilder {
        ImageBuilder {
            arena_size,
            generation: 0,
            memmap: Vec::new(),
            scratch: Vec::new(),
            kfence: Vec::new(),
            caches: Vec::new(),
            pages: Vec::new(),
            extents: Vec::new(),
            tree: Vec::new(),
            tree_error: None,
        }
    }

    /// Record a handover generation in the header.
    pub fn generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// The preserved folios. Encodes the MEMMAP section now, so the map may
    /// change afterwards.
    pub fn memmap(mut self, map: &PreservedMap) -> Self {
        self.memmap.clear();
        self.memmap.reserve(map.block_count() * BLOCK_SIZE);
        for b in map.blocks() {
            let raw = RawBlock::new(b.base.0, b.order.get(), b.words.map(U64::new));
            self.memmap.extend_from_slice(raw.as_bytes());
        }
        self
    }

    /// Scratch ranges (sorted by the builder).
    pub fn scratch(mut self, mut ranges: Vec<PhysRange>) -> Self {
        ranges.sort_unstable();
        self.scratch = ranges;
        self
    }

    /// KFENCE pool ranges (sorted by the builder).
    pub fn kfence(mut self, mut ranges: Vec<PhysRange>) -> Self {
        ranges.sort_unstable();
        self.kfence = ranges;
        self
    }

    /// Slab caches and their preserved pages (sorted by id and PFN).
    pub fn slab(mut self, mut caches: Vec<SlabCacheInfo>, mut pages: Vec<SlabPageInfo>) -> Self {
        caches.sort_unstable_by_key(|c| c.id);
        pages.sort_unstable_by_key(|p| p.pfn);
        self.caches = caches;
        self.pages = pages;
        self
    }

    /// Valid-byte extents inside preserved memory (sorted by the builder).
    pub fn extents(mut self, mut extents: Vec<Extent>) -> Self {
        extents.sort_unstable();
        self.extents = extents;
        self
    }

    /// The metadata tree, already encoded.
    pub fn tree_bytes(mut self, bytes: Vec<u8>) -> Self {
        self.tree = bytes;
        self.tree_error = None;
        self
    }

    /// The metadata tree; an encoding failure is reported by `build`.
    pub fn tree(mut self, tree: &Tree) -> Self {
        match tree.encode() {
            Ok(bytes) => {
                self.tree = bytes;
                self.tree_error = None;
            }
            Err(e) => self.tree_error = Some(e),
        }
        self
    }

    fn slab_len(&self) -> u64 {
        if self.caches.is_empty() && self.pages.is_empty() {
            return 0;
        }
        let words: u64 = self.pages.iter().map(|p| p.bitmap.len() as u64).sum();
        (SLAB_HEADER_SIZE + self.caches.len() * SLAB_CACHE_SIZE + self.pages.len() * SLAB_PAGE_SIZE)
            as u64
            + words * 8
    }

    /// `(kind, flags, len)` of every section written, in layout order.
    fn plan(&self) -> [(SectionKind, u32, u64); 6] {
        [
            (
                SectionKind::Memmap,
                SECTION_REQUIRED,
                self.memmap.len() as u64,
            ),
            (
                SectionKind::Scratch,
                SECTION_REQUIRED,
                self.scratch.len() as u64 * 16,
            ),
            (
                SectionKind::Kfence,
                SECTION_REQUIRED,
                self.kfence.len() as u64 * 16,
            ),
            (SectionKind::Slab, SECTION_REQUIRED, self.slab_len()),
            (SectionKind::Extents, 0, self.extents.len() as u64 * 24),
            (SectionKind::Tree, SECTION_REQUIRED, self.tree.len() as u64),
        ]
    }

    /// Sections actually emitted: MEMMAP always, the others when non-empty.
    fn emitted(&self) -> impl Iterator<Item = (SectionKind, u32, u64)> {
        self.plan()
            .into_iter()
            .filter(|&(k, _, len)| k == SectionKind::Memmap || len != 0)
    }

    /// Bytes [`build`](Self::build) will produce.
    pub fn encoded_len(&self) -> u64 {
        let n = self.emitted().count() as u64;
        let mut end = HEADER_SIZE as u64 + n * ENTRY_SIZE as u64;
        for (_, _, len) in self.emitted() {
            end = align8(end) + len;
        }
        align8(end)
    }

    /// Write and validate the image.
    pub fn build(&self) -> Result<Vec<u8>, BuildError> {
        let mut out = Vec::new();
        self.build_into(&mut out)?;
        Ok(out)
    }

    /// Replace the contents of `out` with the validated image.
    pub fn build_into(&self, out: &mut Vec<u8>) -> Result<(), BuildError> {
        let len = usize::try_from(self.encoded_len()).map_err(|_| BuildError::TooMany {
            what: "image bytes",
            expected: usize::BITS,
            found: self.encoded_len(),
        })?;
        out.clear();
        out.resize(len, 0);
        self.write_to(out).map(|_| ())
    }

    /// Write the validated image at the start of `out`, which must hold at
    /// least [`encoded_len`](Self::encoded_len) bytes (for example pages of
    /// the arena). Returns the image length.
    pub fn write_to(&self, out: &mut [u8]) -> Result<usize, BuildError> {
        if let Some(e) = &self.tree_error {
            return Err(BuildError::Tree(e.clone()));
        }
        let image_len = self.encoded_len();
        let Some(out) = usize::try_from(image_len)
            .ok()
            .and_then(|n| out.get_mut(..n))
        else {
            return Err(BuildError::BufferTooSmall {
                expected: image_len,
                found: out.len() as u64,
            });
        };
        out.fill(0);
        let count = self.emitted().count();
        let table_offset = HEADER_SIZE;
        let mut end = (HEADER_SIZE + count * ENTRY_SIZE) as u64;
        for (i, (kind, flags, len)) in self.emitted().enumerate() {
            let offset = align8(end);
            end = offset + len;
            let dst =
                out.get_mut(offset as usize..end as usize)
                    .ok_or(BuildError::BufferTooSmall {
                        expected: end,
                        found: image_len,
                    })?;
            self.write_section(kind, dst)?;
            let entry = RawSection {
                kind: U32::new(kind.raw()),
                flags: U32::new(flags),
                offset: U64::new(offset),
                len: U64::new(len),
                crc32: U32::new(crc32fast::hash(dst)),
                reserved: U32::new(0),
            };
            let eo = table_offset + i * ENTRY_SIZE;
            out[eo..eo + ENTRY_SIZE].copy_from_slice(entry.as_bytes());
        }
        let table_crc = crc32fast::hash(&out[table_offset..table_offset + count * ENTRY_SIZE]);
        let mut header = RawHeader {
            magic: MAGIC,
            header_size: U32::new(HEADER_SIZE as u32),
            version_major: U16::new(VERSION_MAJOR),
            version_minor: U16::new(VERSION_MINOR),
            page_shift: U32::new(PAGE_SHIFT),
            flags: U32::new(0),
            arena_size: U64::new(self.arena_size),
            image_len: U64::new(image_len),
            generation: U64::new(self.generation),
            table_offset: U64::new(table_offset as u64),
            section_count: U32::new(count as u32),
            entry_size: U32::new(ENTRY_SIZE as u32),
            table_crc32: U32::new(table_crc),
            header_crc32: U32::new(0),
        };
        header.header_crc32 = U32::new(header_crc(header.as_bytes()));
        out[..HEADER_SIZE].copy_from_slice(header.as_bytes());
        Image::parse(out)?;
        Ok(out.len())
    }

    fn write_section(&self, kind: SectionKind, dst: &mut [u8]) -> Result<(), BuildError> {
        match kind {
            SectionKind::Memmap => dst.copy_from_slice(&self.memmap),
            SectionKind::Scratch | SectionKind::Kfence => {
                let ranges = if kind == SectionKind::Scratch {
                    &self.scratch
                } else {
                    &self.kfence
                };
                for (chunk, r) in dst.chunks_exact_mut(16).zip(ranges) {
                    let raw = RawRange {
                        start: U64::new(r.start),
                        len: U64::new(r.len),
                    };
                    chunk.copy_from_slice(raw.as_bytes());
                }
            }
            SectionKind::Slab => self.write_slab(dst)?,
            SectionKind::Extents => {
                for (chunk, e) in dst.chunks_exact_mut(24).zip(&self.extents) {
                    let raw = RawExtent {
                        start: U64::new(e.range.start),
                        len: U64::new(e.range.len),
                        tag: U32::new(e.tag),
                        reserved: U32::new(0),
                    };
                    chunk.copy_from_slice(raw.as_bytes());
                }
            }
            SectionKind::Tree => dst.copy_from_slice(&self.tree),
            SectionKind::Unknown(_) => {}
        }
        Ok(())
    }

    fn write_slab(&self, dst: &mut [u8]) -> Result<(), BuildError> {
        let fits = |what, n: usize| {
            u32::try_from(n).map_err(|_| BuildError::TooMany {
                what,
                expected: 32,
                found: n as u64,
            })
        };
        let words: usize = self.pages.iter().map(|p| p.bitmap.len()).sum();
        let header = RawSlabHeader {
            cache_count: U32::new(fits("slab caches", self.caches.len())?),
            page_count: U32::new(fits("slab pages", self.pages.len())?),
            word_count: U32::new(fits("slab bitmap words", words)?),
            reserved: U32::new(0),
        };
        let (h, rest) = dst.split_at_mut(SLAB_HEADER_SIZE);
        h.copy_from_slice(header.as_bytes());
        let (cdst, rest) = rest.split_at_mut(self.caches.len() * SLAB_CACHE_SIZE);
        for (chunk, c) in cdst.chunks_exact_mut(SLAB_CACHE_SIZE).zip(&self.caches) {
            let bytes = c.name.as_bytes();
            if bytes.len() > CACHE_NAME_LEN || bytes.contains(&0) {
                return Err(BuildError::CacheName {
                    id: c.id,
                    expected: CACHE_NAME_LEN,
                    found: bytes.len(),
                });
            }
            let mut name = [0u8; CACHE_NAME_LEN];
            name[..bytes.len()].copy_from_slice(bytes);
            let raw = RawSlabCache {
                id: U32::new(c.id),
                object_size: U32::new(c.object_size),
                align: U32::new(c.align),
                objects_per_slab: U32::new(c.objects_per_slab),
                order: c.order.get(),
                reserved: [0; 7],
                name,
            };
            chunk.copy_from_slice(raw.as_bytes());
        }
        let (pdst, wdst) = rest.split_at_mut(self.pages.len() * SLAB_PAGE_SIZE);
        let mut index = 0usize;
        let mut wchunks = wdst.chunks_exact_mut(8);
        for (chunk, p) in pdst.chunks_exact_mut(SLAB_PAGE_SIZE).zip(&self.pages) {
            let expected = p.object_count.div_ceil(64) as usize;
            if p.bitmap.len() != expected {
                return Err(BuildError::BitmapLength {
                    pfn: p.pfn.0,
                    expected,
                    found: p.bitmap.len(),
                });
            }
            let raw = RawSlabPage {
                pfn: U64::new(p.pfn.0),
                cache_id: U32::new(p.cache_id),
                order: p.order.get(),
                reserved: [0; 3],
                object_size: U32::new(p.object_size),
                object_count: U32::new(p.object_count),
                first_offset: U32::new(p.first_offset),
                bitmap_words: U32::new(expected as u32),
                bitmap_index: U32::new(fits("slab bitmap words", index)?),
                reserved2: U32::new(0),
            };
            chunk.copy_from_slice(raw.as_bytes());
            for (w, c) in p.bitmap.iter().zip(wchunks.by_ref()) {
                c.copy_from_slice(&w.to_le_bytes());
            }
            index += expected;
        }
        Ok(())
    }
}
