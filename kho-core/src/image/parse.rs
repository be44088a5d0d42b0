//! The validating, zero-copy reader.

use core::fmt;

use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, IntoBytes};

use super::layout::{
    RawBlock, RawExtent, RawHeader, RawRange, RawSection, RawSlabCache, RawSlabHeader, RawSlabPage,
    BLOCK_SIZE, ENTRY_SIZE, HEADER_CRC_OFFSET, HEADER_SIZE, MAGIC, SECTION_ALIGN, SECTION_REQUIRED,
    SLAB_CACHE_SIZE, SLAB_HEADER_SIZE, SLAB_PAGE_SIZE, VERSION_MAJOR,
};
use super::{Extent, ParseError, ParseResult, SectionKind};
use crate::addr::{
    Order, Pfn, PhysAddr, PhysRange, MAX_MAP_ORDER, NR_ORDERS, PAGE_SHIFT, PAGE_SIZE,
};
use crate::memmap::{BlockBits, BLOCK_BITS, BLOCK_WORDS};

use super::slab::{name_len, SlabCacheIter, SlabCacheView, SlabPageIter, SlabPageView};
use super::walk::{Coalesced, ImageFolios, ImageRanges, OrderRuns};
use crate::tree::{Tree, TreeLimits};

/// The header fields of a validated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Header size in bytes (72 for v1.0, more for a newer writer).
    pub header_size: u32,
    /// Major version, always 1.
    pub version_major: u16,
    /// Minor version.
    pub version_minor: u16,
    /// log2 of the page size, always 12.
    pub page_shift: u32,
    /// Header flags, always 0 in v1.
    pub flags: u32,
    /// Arena size in bytes.
    pub arena_size: u64,
    /// Image length in bytes.
    pub image_len: u64,
    /// Handover generation recorded by the writer.
    pub generation: u64,
    /// Offset of the section table.
    pub table_offset: u64,
    /// Number of section table entries.
    pub section_count: u32,
    /// Size of one section table entry.
    pub entry_size: u32,
    /// CRC32 of the section table.
    pub table_crc32: u32,
    /// CRC32 of the header.
    pub header_crc32: u32,
}

/// One section table entry of a validated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionInfo {
    /// What the section holds.
    pub kind: SectionKind,
    /// Flags; bit 0 is [`SECTION_REQUIRED`].
    pub flags: u32,
    /// Offset from the image start.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// CRC32 of the section bytes.
    pub crc32: u32,
}

impl SectionInfo {
    /// Whether a reader that does not know the kind must reject the image.
    pub fn is_required(&self) -> bool {
        self.flags & SECTION_REQUIRED != 0
    }
}

#[derive(Clone, Copy, Default)]
struct SlabSection<'a> {
    offset: u64,
    caches: &'a [RawSlabCache],
    pages: &'a [RawSlabPage],
    words: &'a [U64],
}

/// A validated handover image, borrowing the bytes it was parsed from.
///
/// Construct it with [`Image::parse`]; every query reads the input slice in
/// place.
pub struct Image<'a> {
    bytes: &'a [u8],
    header: ImageHeader,
    memmap_offset: u64,
    blocks: &'a [RawBlock],
    /// Per order, the index range of its blocks in `blocks`.
    spans: [(usize, usize); NR_ORDERS],
    scratch: (u64, &'a [RawRange]),
    kfence: (u64, &'a [RawRange]),
    slab: SlabSection<'a>,
    extents: (u64, &'a [RawExtent]),
    tree_offset: u64,
    tree_bytes: &'a [u8],
    tree: Option<Tree>,
}

impl fmt::Debug for Image<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image")
            .field("header", &self.header)
            .field("blocks", &self.blocks.len())
            .field("scratch", &self.scratch.1.len())
            .field("kfence", &self.kfence.1.len())
            .field("slab_pages", &self.slab.pages.len())
            .field("extents", &self.extents.1.len())
            .field("tree_bytes", &self.tree_bytes.len())
            .finish()
    }
}

/// `bytes[off..off + len]`, or a truncation error at the end of `bytes`.
///
/// Every caller has checked the range against the header or table first,
/// so the error is a guard, never the first check a range meets.
fn sub(bytes: &[u8], off: u64, len: u64) -> ParseResult<&[u8]> {
    let end = off.checked_add(len);
    let usable = |v: u64| usize::try_from(v).ok();
    let range = match (usable(off), end.and_then(usable)) {
        (Some(s), Some(e)) => bytes.get(s..e),
        _ => None,
    };
    range.ok_or(ParseError::Truncated {
        offset: bytes.len() as u64,
        expected: end.unwrap_or(u64::MAX),
        found: bytes.len() as u64,
    })
}

/// The first non-zero byte of `bytes`, as `(offset, value)` with `base` the
/// offset of `bytes[0]`.
fn first_nonzero(bytes: &[u8], base: u64) -> Option<(u64, u8)> {
    bytes
        .iter()
        .position(|&b| b != 0)
        .map(|i| (base + i as u64, bytes[i]))
}

fn zero_padding(bytes: &[u8], from: u64, to: u64, gap: &'static str) -> ParseResult<()> {
    if to <= from {
        return Ok(());
    }
    match first_nonzero(sub(bytes, from, to - from)?, from) {
        Some((offset, found)) => Err(ParseError::Padding {
            offset,
            gap,
            expected: 0,
            found,
        }),
        None => Ok(()),
    }
}

fn reserved_bytes(bytes: &[u8], offset: u64, field: &'static str) -> ParseResult<()> {
    match first_nonzero(bytes, offset) {
        Some((offset, found)) => Err(reserved(offset, field, u64::from(found))),
        None => Ok(()),
    }
}

fn reserved(offset: u64, field: &'static str, found: u64) -> ParseError {
    ParseError::Reserved {
        offset,
        field,
        expected: 0,
        found,
    }
}

fn records<T: FromBytes + zerocopy::KnownLayout + zerocopy::Immutable>(
    bytes: &[u8],
    offset: u64,
    kind: SectionKind,
) -> ParseResult<&[T]> {
    let size = core::mem::size_of::<T>() as u64;
    <[T]>::ref_from_bytes(bytes).map_err(|_| ParseError::SectionLength {
        offset,
        kind,
        expected: size,
        found: bytes.len() as u64,
    })
}

/// Pages spanned by one block of `order`.
#[inline]
fn span(order: u8) -> u64 {
    BLOCK_BITS << order
}

/// The blocks of one order above the block being checked, with a merge
/// cursor and the start of the next folio of that order at or after the
/// scan position (see [`Image::overlaps_of`]).
#[derive(Clone, Copy, Default)]
struct Higher<'a> {
    order: u8,
    blocks: &'a [RawBlock],
    cursor: usize,
    next: u64,
}

/// The state of the MEMMAP block checks, one block at a time in index
/// order (see [`Image::memmap_pass`]).
struct BlockScan<'a> {
    blocks: &'a [RawBlock],
    arena_pages: u64,
    /// Where each order's blocks are, by their order field (the block
    /// checks make this exact, or fail).
    by_order: [(usize, usize); NR_ORDERS],
    /// The order and base of the block checked last.
    prev: Option<(u8, u64)>,
    /// The run the last block began or continued: its order field, span
    /// and the highest base whose span stays inside the arena.
    run: Option<(u64, u64, u64)>,
    /// The first block rule broken, after which nothing more is checked.
    error: Option<ParseError>,
    /// The first overlap of two orders, after which overlaps are not
    /// checked.
    overlap: Option<ParseError>,
    /// The orders above the current block's, with their blocks and a merge
    /// cursor each; rebuilt when the order changes.
    higher: [Higher<'a>; NR_ORDERS],
    n_higher: usize,
    cursor_order: Option<u8>,
    /// No higher folio starts below this that the cursors have not already
    /// cleared, so a block ending here needs no overlap check.
    clear_to: u64,
}

impl<'a> BlockScan<'a> {
    fn new(blocks: &'a [RawBlock], arena_pages: u64) -> Self {
        let mut by_order = [(0, 0); NR_ORDERS];
        let mut from = 0;
        for (o, slot) in by_order.iter_mut().enumerate() {
            let to = run_end(blocks, from, o as u64);
            *slot = (from, to);
            from = to;
        }
        BlockScan {
            blocks,
            arena_pages,
            by_order,
            prev: None,
            run: None,
            error: None,
            overlap: None,
            higher: [Higher::default(); NR_ORDERS],
            n_higher: 0,
            cursor_order: None,
            clear_to: 0,
        }
    }

    /// The fast path: how many leading blocks of `blocks` continue the
    /// current run (same order, after the one before, aligned, not empty,
    /// inside the arena) and need no overlap check. Those are done; the
    /// first block after them takes [`Self::block`].
    ///
    /// The block key holds the base above the order field, so "same order
    /// and aligned" is `key & (span - 1) == order` and, among keys of one
    /// order, "after" is `key > previous key`.
    #[inline]
    fn fast(&mut self, blocks: &[RawBlock]) -> usize {
        let (Some((order, span, last)), Some((_, pb))) = (self.run, self.prev) else {
            return 0;
        };
        let settled = self.overlap.is_some();
        if !settled && self.cursor_order != Some(order as u8) {
            return 0;
        }
        // The highest base that is inside the arena and needs no overlap
        // check.
        let limit = if settled {
            last
        } else {
            last.min(self.clear_to.saturating_sub(span))
        };
        let mut key = pb | order;
        let mut n = 0;
        for b in blocks {
            let k = b.key.get();
            let ok = (k & (span - 1) == order) & (k > key) & (k & !RawBlock::ORDER_MASK <= limit)
                && b.has_bits();
            if !ok {
                break;
            }
            key = k;
            n += 1;
        }
        if n > 0 {
            self.prev = Some((order as u8, key & !RawBlock::ORDER_MASK));
        }
        n
    }

    /// Block `i` on its own: the block rules, then its overlaps.
    fn block(&mut self, img: &Image<'a>, i: usize, b: &RawBlock) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = img.check_block(i, b, &mut self.prev) {
            self.error = Some(e);
            return;
        }
        let order = b.order_field();
        let span = span(order as u8);
        self.run = self
            .arena_pages
            .checked_sub(span)
            .map(|last| (order, span, last));
        if self.overlap.is_some() {
            return;
        }
        let o = order as u8;
        if self.cursor_order != Some(o) {
            self.cursor_order = Some(o);
            self.n_higher = 0;
            self.clear_to = 0;
            for (h, &(lo, hi)) in self.by_order.iter().enumerate().skip(usize::from(o) + 1) {
                if lo < hi {
                    self.higher[self.n_higher] = Higher {
                        order: h as u8,
                        blocks: &self.blocks[lo..hi],
                        cursor: 0,
                        next: 0,
                    };
                    self.n_higher += 1;
                }
            }
        }
        // Checked by `check_block`: the block lies inside the arena.
        if b.base_pfn() + span <= self.clear_to {
            return;
        }
        let higher = &mut self.higher[..self.n_higher];
        if let Err(e) = img.overlaps_of(i, b, o, higher) {
            self.overlap = Some(e);
        }
        self.clear_to = higher.iter().map(|h| h.next).min().unwrap_or(u64::MAX);
    }
}

/// The end of the run of blocks from `from` whose order field is at most
/// `order`, if the blocks are sorted (otherwise some index in
/// `from..=blocks.len()`, which the block checks then refuse). A gallop
/// from `from`, so an absent order costs one read of a block that is
/// already in cache, not a binary search over the whole section.
fn run_end(blocks: &[RawBlock], from: usize, order: u64) -> usize {
    let inside = |i: usize| blocks.get(i).is_some_and(|b| b.order_field() <= order);
    if !inside(from) {
        return from;
    }
    // `lo` is inside the run; find a `hi` past it, doubling the step.
    let (mut lo, mut step) = (from, 1usize);
    let hi = loop {
        let i = lo.saturating_add(step).min(blocks.len());
        if !inside(i) {
            break i;
        }
        lo = i;
        step = step.saturating_mul(2);
    };
    lo + 1 + blocks[lo + 1..hi].partition_point(|b| b.order_field() <= order)
}

impl Higher<'_> {
    /// The start of the first folio at or after `q` (a multiple of the
    /// folio size), or `u64::MAX`; leaves the cursor on its block. The
    /// blocks may not be checked yet, so nothing here may overflow.
    fn next_folio(&mut self, q: u64) -> u64 {
        let h = self.order;
        while let Some(hb) = self.blocks.get(self.cursor) {
            let hbase = hb.base_pfn();
            if hbase.saturating_add(span(h)) > q {
                let from = q.saturating_sub(hbase) >> h;
                if let Some(idx) = first_set_in(&hb.bits, from, BLOCK_BITS) {
                    return hbase.saturating_add(idx << h);
                }
            }
            self.cursor += 1;
        }
        u64::MAX
    }
}

/// Bits `[lo, hi)` of a block's words: the first one set. Bits past the
/// block read as clear.
fn first_set_in(words: &[U64; BLOCK_WORDS], lo: u64, hi: u64) -> Option<u64> {
    let hi = hi.min(BLOCK_BITS);
    if lo >= hi {
        return None;
    }
    let last = ((hi - 1) / 64) as usize;
    let mut w = (lo / 64) as usize;
    // The first word without the bits below `lo`, then whole words.
    let mut word = words[w].get() & (!0u64 << (lo % 64));
    loop {
        if w == last {
            let keep = hi - last as u64 * 64;
            if keep < 64 {
                word &= (1u64 << keep) - 1;
            }
            return (word != 0).then(|| w as u64 * 64 + u64::from(word.trailing_zeros()));
        }
        if word != 0 {
            return Some(w as u64 * 64 + u64::from(word.trailing_zeros()));
        }
        w += 1;
        word = words[w].get();
    }
}

impl<'a> Image<'a> {
    /// Validate `bytes` completely and view them as an image.
    ///
    /// Checks run in the order of FORMAT.md §6 and the first failure is
    /// returned. The slice need not be aligned and may extend past the
    /// image (as a page-rounded mapping does); bytes after `image_len` are
    /// ignored. The metadata tree is decoded with [`TreeLimits::DEFAULT`].
    ///
    /// # Robustness
    ///
    /// For any input (FORMAT.md §8): no panic, only a [`ParseError`]
    /// naming an offset no greater than the input's length; memory bounded
    /// by a small multiple of the input length (only the decoded tree is
    /// allocated, see [`Tree::decode`]); time linear in the input length:
    /// every check is one pass over its records or a merge of sorted
    /// records, some once per order present (at most 19, FORMAT.md §6).
    /// The `image_parse` fuzz target checks these, walking and restoring
    /// every image that parses.
    pub fn parse(bytes: &'a [u8]) -> ParseResult<Image<'a>> {
        Self::parse_with(bytes, &TreeLimits::DEFAULT)
    }

    /// [`Image::parse`] with explicit caps for the metadata tree.
    pub fn parse_with(bytes: &'a [u8], limits: &TreeLimits) -> ParseResult<Image<'a>> {
        let input_len = bytes.len() as u64;
        // 1. Length.
        let Ok((raw, _)) = RawHeader::ref_from_prefix(bytes) else {
            return Err(ParseError::HeaderTruncated {
                offset: input_len,
                expected: HEADER_SIZE as u64,
                found: input_len,
            });
        };
        // 2. Magic.
        if raw.magic != MAGIC {
            return Err(ParseError::BadMagic {
                offset: 0,
                expected: MAGIC,
                found: raw.magic,
            });
        }
        // 3. Header size.
        let hs = u64::from(raw.header_size.get());
        if hs < HEADER_SIZE as u64 || hs % 8 != 0 || hs > input_len {
            return Err(ParseError::HeaderSize {
                offset: 8,
                expected_min: HEADER_SIZE as u64,
                expected_max: input_len,
                found: hs,
            });
        }
        // 4. Version.
        if raw.version_major.get() != VERSION_MAJOR {
            return Err(ParseError::UnsupportedMajor {
                offset: 12,
                expected: VERSION_MAJOR,
                found: raw.version_major.get(),
            });
        }
        // 5. Header CRC.
        let head = sub(bytes, 0, hs)?;
        let stored = raw.header_crc32.get();
        let computed = header_crc(head);
        if stored != computed {
            return Err(ParseError::HeaderCrc {
                offset: HEADER_CRC_OFFSET as u64,
                expected: stored,
                found: computed,
            });
        }
        let header = Self::check_header(raw, head, input_len)?;
        let image = sub(bytes, 0, header.image_len)?;

        // 6. Section table bounds, entries, overlaps and padding.
        let located = locate_sections(image, &header)?;

        let section = |k: SectionKind| -> ParseResult<(u64, &'a [u8])> {
            match k.index().and_then(|i| located[i]) {
                Some(l) => Ok((l.offset, sub(image, l.offset, l.len)?)),
                None => Ok((0, &[])),
            }
        };
        // A MEMMAP section that is not a whole number of blocks is a
        // content error, reported at step 8.
        let (memmap_offset, memmap) = section(SectionKind::Memmap)?;
        let blocks = records::<RawBlock>(memmap, memmap_offset, SectionKind::Memmap);
        let mut img = Image {
            bytes: image,
            header,
            memmap_offset,
            blocks: blocks.as_ref().map_or(&[], |b| *b),
            spans: [(0, 0); NR_ORDERS],
            scratch: (0, &[]),
            kfence: (0, &[]),
            slab: SlabSection::default(),
            extents: (0, &[]),
            tree_offset: 0,
            tree_bytes: &[],
            tree: None,
        };

        // 7. Section CRCs, in table order. The MEMMAP blocks are checked
        // in the same pass as their CRC, while they are in cache; that
        // verdict belongs to step 8 and waits until every CRC matched.
        let mut memmap_verdict = Ok(());
        for i in 0..u64::from(header.section_count) {
            let eo = header.table_offset + i * u64::from(header.entry_size);
            let e = entry(image, eo)?;
            let (off, len) = (e.offset.get(), e.len.get());
            let kind = SectionKind::from_raw(e.kind.get());
            let found = if kind == SectionKind::Memmap && blocks.is_ok() {
                let (crc, verdict) = img.memmap_pass();
                memmap_verdict = verdict;
                crc
            } else {
                crc32fast::hash(sub(image, off, len)?)
            };
            if found != e.crc32.get() {
                return Err(ParseError::SectionCrc {
                    offset: off,
                    kind,
                    expected: e.crc32.get(),
                    found,
                });
            }
        }

        // 8. Section contents.
        blocks?;
        memmap_verdict?;

        let (off, s) = section(SectionKind::Scratch)?;
        img.scratch = (off, img.check_ranges(s, off, SectionKind::Scratch)?);
        let (off, s) = section(SectionKind::Kfence)?;
        img.kfence = (off, img.check_ranges(s, off, SectionKind::Kfence)?);
        img.check_scratch_vs_kfence()?;
        img.check_unpreserved(SectionKind::Scratch)?;
        img.check_unpreserved(SectionKind::Kfence)?;

        let (off, s) = section(SectionKind::Slab)?;
        if located[SectionKind::Slab.index().unwrap_or(0)].is_some() {
            img.slab = img.check_slab(s, off)?;
        }
        let (off, s) = section(SectionKind::Extents)?;
        img.extents = (off, img.check_extents(s, off)?);

        // 9. Metadata tree.
        let (off, s) = section(SectionKind::Tree)?;
        img.tree_offset = off;
        img.tree_bytes = s;
        if !s.is_empty() {
            let tree = Tree::decode(s, limits).map_err(|source| ParseError::Tree {
                offset: off,
                source,
            })?;
            img.tree = Some(tree);
        }
        Ok(img)
    }

    /// Header fields after the header CRC matched.
    fn check_header(raw: &RawHeader, head: &[u8], input_len: u64) -> ParseResult<ImageHeader> {
        if let Some((offset, found)) =
            first_nonzero(head.get(HEADER_SIZE..).unwrap_or(&[]), HEADER_SIZE as u64)
        {
            return Err(ParseError::HeaderTail {
                offset,
                expected: 0,
                found,
            });
        }
        if raw.page_shift.get() != PAGE_SHIFT {
            return Err(ParseError::PageShift {
                offset: 16,
                expected: PAGE_SHIFT,
                found: raw.page_shift.get(),
            });
        }
        if raw.flags.get() != 0 {
            return Err(ParseError::HeaderFlags {
                offset: 20,
                expected: 0,
                found: raw.flags.get(),
            });
        }
        let arena_size = raw.arena_size.get();
        if arena_size % PAGE_SIZE != 0 {
            return Err(ParseError::ArenaSize {
                offset: 24,
                expected: PAGE_SIZE,
                found: arena_size,
            });
        }
        let hs = head.len() as u64;
        let image_len = raw.image_len.get();
        if image_len > input_len {
            return Err(ParseError::Truncated {
                offset: input_len,
                expected: image_len,
                found: input_len,
            });
        }
        if image_len < hs || image_len % 8 != 0 {
            return Err(ParseError::ImageLength {
                offset: 32,
                expected_min: hs,
                expected_max: input_len,
                found: image_len,
            });
        }
        let entry_size = raw.entry_size.get();
        if (entry_size as usize) < ENTRY_SIZE || entry_size % 8 != 0 {
            return Err(ParseError::EntrySize {
                offset: 60,
                expected: ENTRY_SIZE as u32,
                found: entry_size,
            });
        }
        Ok(ImageHeader {
            header_size: raw.header_size.get(),
            version_major: raw.version_major.get(),
            version_minor: raw.version_minor.get(),
            page_shift: raw.page_shift.get(),
            flags: raw.flags.get(),
            arena_size,
            image_len,
            generation: raw.generation.get(),
            table_offset: raw.table_offset.get(),
            section_count: raw.section_count.get(),
            entry_size,
            table_crc32: raw.table_crc32.get(),
            header_crc32: raw.header_crc32.get(),
        })
    }

    /// The MEMMAP section's CRC and its block checks in one pass.
    ///
    /// The section is hashed a chunk at a time and the chunk's blocks are
    /// checked while they are still in cache, so validation costs little
    /// more than the CRC itself. Returns the CRC and the verdict of the
    /// block checks (step 8 of FORMAT.md §6, reported only once every
    /// section CRC has matched): the first block that breaks a block rule,
    /// else the first overlap of two orders, else success with `spans`
    /// filled. The overlap check of a block reads blocks of higher orders
    /// further on, located by their order field before they are checked;
    /// when one of them breaks a rule, that error wins, exactly as if the
    /// blocks had all been checked first.
    ///
    /// Most blocks continue a run of their order with nothing of a higher
    /// order nearby; [`BlockScan::fast`] takes those a few instructions
    /// each, and every other block goes through the full rules
    /// ([`BlockScan::block`]), which decide the error if there is one.
    fn memmap_pass(&mut self) -> (u32, ParseResult<()>) {
        // Blocks hashed per call: 66 KiB, still in cache when its blocks are
        // checked right after.
        const CHUNK: usize = 128;
        let blocks = self.blocks;
        let mut scan = BlockScan::new(blocks, self.header.arena_size >> PAGE_SHIFT);
        let mut hasher = crc32fast::Hasher::new();
        for (c, chunk) in blocks.chunks(CHUNK).enumerate() {
            hasher.update(chunk.as_bytes());
            let mut i = c * CHUNK;
            let mut rest = chunk;
            while scan.error.is_none() {
                let n = scan.fast(rest);
                i += n;
                let Some((b, tail)) = rest.get(n..).and_then(<[RawBlock]>::split_first) else {
                    break;
                };
                scan.block(self, i, b);
                i += 1;
                rest = tail;
            }
        }
        let crc = hasher.finalize();
        let verdict = match (scan.error, scan.overlap) {
            (Some(e), _) | (None, Some(e)) => Err(e),
            (None, None) => {
                self.spans = scan.by_order;
                Ok(())
            }
        };
        (crc, verdict)
    }

    /// One MEMMAP block: order, alignment, strict order after `prev`,
    /// non-empty, inside the arena.
    fn check_block(&self, i: usize, b: &RawBlock, prev: &mut Option<(u8, u64)>) -> ParseResult<()> {
        let arena_pages = self.header.arena_size >> PAGE_SHIFT;
        let offset = self.block_offset(i);
        let order_field = b.order_field();
        if order_field > u64::from(MAX_MAP_ORDER) {
            return Err(ParseError::BlockOrder {
                offset,
                expected: MAX_MAP_ORDER,
                found: order_field,
            });
        }
        let order = order_field as u8;
        let base = b.base_pfn();
        let span = span(order);
        // `span` is a power of two: mask, do not divide.
        if base & (span - 1) != 0 {
            return Err(ParseError::BlockMisaligned {
                offset,
                expected: span,
                found: base,
            });
        }
        if let Some((po, pb)) = *prev {
            if (order, base) <= (po, pb) {
                return Err(ParseError::BlockUnsorted {
                    offset,
                    prev_order: po,
                    prev_base: pb,
                    order,
                    base,
                });
            }
        }
        *prev = Some((order, base));
        if !b.has_bits() {
            return Err(ParseError::EmptyBlock {
                offset,
                order,
                base,
                expected: 1,
                found: 0,
            });
        }
        if base.checked_add(span).is_none_or(|end| end > arena_pages) {
            // Only the highest set bit can reach past the arena.
            let (wi, w) = b
                .bits
                .iter()
                .enumerate()
                .rev()
                .find(|(_, w)| w.get() != 0)
                .map_or((0, 0), |(i, w)| (i, w.get()));
            let idx = wi as u64 * 64 + u64::from(63 - w.leading_zeros());
            let pfn = base.saturating_add(idx << order);
            if pfn
                .checked_add(1u64 << order)
                .is_none_or(|end| end > arena_pages)
            {
                return Err(ParseError::FolioOutOfArena {
                    offset,
                    pfn,
                    order,
                    expected: arena_pages,
                });
            }
        }
        Ok(())
    }

    /// No page of block `b` (index `i`, order `o`, already checked) is
    /// also preserved under a higher order.
    ///
    /// Folios are naturally aligned, so two that intersect are nested: the
    /// smaller lies inside the larger. The blocks of one order are visited
    /// in base order; for every higher order present, `higher` keeps a
    /// cursor on that order's blocks and the start of its next folio at or
    /// after the scan position. A block with no higher folio starting
    /// before its end (counting the one that contains its first page) costs
    /// one comparison per higher order; otherwise its bits are compared
    /// with that higher block's. The cursors only move forward and every
    /// word of a higher block is scanned at most once per lower order, so
    /// time is linear in the number of blocks times the number of orders
    /// present (at most 19); nothing is allocated.
    fn overlaps_of(
        &self,
        i: usize,
        b: &RawBlock,
        o: u8,
        higher: &mut [Higher<'a>],
    ) -> ParseResult<()> {
        let base = b.base_pfn();
        // Checked by `check_block`: the block lies inside the arena.
        let end = base + span(o);
        for hi in higher.iter_mut() {
            let h = hi.order;
            // The position of the folio of order `h` that holds `base`.
            let q = base & !((1u64 << h) - 1);
            if hi.next < q {
                hi.next = hi.next_folio(q);
            }
            if hi.next >= end {
                continue;
            }
            // A folio of `h` starts in [q, end): it meets the block. Its
            // block (under the cursor) must be the one whose span holds
            // this block; anything else is a block the block checks reject.
            let Some(hb) = hi.blocks.get(hi.cursor) else {
                continue;
            };
            if hb.base_pfn() != base & !(span(h) - 1) {
                continue;
            }
            self.overlap_in(i, b, o, hb, h)?;
        }
        Ok(())
    }

    /// The slow path of [`Self::overlaps_of`]: the folios of the higher
    /// block `hb` that cover the lower block `b` are known to exist; report
    /// the first lower folio inside one of them.
    fn overlap_in(
        &self,
        index: usize,
        b: &RawBlock,
        o: u8,
        hb: &RawBlock,
        h: u8,
    ) -> ParseResult<()> {
        let base = b.base_pfn();
        let end = base + span(o);
        let hbase = hb.base_pfn();
        let h_lo = (base - hbase) >> h;
        let h_hi = (end - hbase + (1u64 << h) - 1) >> h;
        let mut j = h_lo;
        while let Some(hidx) = first_set_in(&hb.bits, j, h_hi) {
            let hpfn = hbase + (hidx << h);
            let from = hpfn.max(base);
            let to = (hpfn + (1u64 << h)).min(end);
            if let Some(lidx) = first_set_in(&b.bits, (from - base) >> o, (to - base) >> o) {
                return Err(ParseError::FolioOverlap {
                    offset: self.block_offset(index),
                    pfn: base + (lidx << o),
                    order: o,
                    other_pfn: hpfn,
                    other_order: h,
                });
            }
            j = hidx + 1;
        }
        Ok(())
    }

    fn block_offset(&self, index: usize) -> u64 {
        self.memmap_offset + (index * BLOCK_SIZE) as u64
    }

    fn check_ranges(
        &self,
        bytes: &'a [u8],
        offset: u64,
        kind: SectionKind,
    ) -> ParseResult<&'a [RawRange]> {
        let ranges: &[RawRange] = records(bytes, offset, kind)?;
        let mut prev_end = 0u64;
        for (i, r) in ranges.iter().enumerate() {
            let off = offset + (i * core::mem::size_of::<RawRange>()) as u64;
            let (start, len) = (r.start.get(), r.len.get());
            let range = PhysRange::new(PhysAddr(start), len);
            if len == 0 {
                return Err(ParseError::RangeEmpty {
                    offset: off + 8,
                    kind,
                    expected: PAGE_SIZE,
                    found: 0,
                });
            }
            for (field, at, value) in [("start", 0, start), ("len", 8, len)] {
                if value % PAGE_SIZE != 0 {
                    return Err(ParseError::RangeUnaligned {
                        offset: off + at,
                        kind,
                        field,
                        expected: PAGE_SIZE,
                        found: value,
                    });
                }
            }
            if i > 0 && start < prev_end {
                return Err(ParseError::RangeUnsorted {
                    offset: off,
                    kind,
                    expected: prev_end,
                    found: start,
                });
            }
            match range.end() {
                Some(end) if end.0 <= self.header.arena_size => prev_end = end.0,
                _ => {
                    return Err(ParseError::RangeOutOfArena {
                        offset: off,
                        kind,
                        start,
                        len,
                        expected: self.header.arena_size,
                    })
                }
            }
        }
        Ok(ranges)
    }

    /// The KFENCE pool must never come from scratch memory.
    fn check_scratch_vs_kfence(&self) -> ParseResult<()> {
        let (mut si, mut ki) = (0usize, 0usize);
        let (s, k) = (self.scratch.1, self.kfence.1);
        while let (Some(a), Some(b)) = (s.get(si), k.get(ki)) {
            let ra = PhysRange::new(PhysAddr(a.start.get()), a.len.get());
            let rb = PhysRange::new(PhysAddr(b.start.get()), b.len.get());
            if ra.overlaps(rb) {
                return Err(ParseError::KfenceInScratch {
                    offset: self.kfence.0 + (ki * 16) as u64,
                    start: rb.start,
                    len: rb.len,
                    scratch_start: ra.start,
                    scratch_len: ra.len,
                });
            }
            // Ranges are validated in-arena, so the ends do not overflow.
            if ra.start + ra.len <= rb.start {
                si += 1;
            } else {
                ki += 1;
            }
        }
        Ok(())
    }

    fn check_unpreserved(&self, kind: SectionKind) -> ParseResult<()> {
        let (offset, ranges) = match kind {
            SectionKind::Kfence => self.kfence,
            _ => self.scratch,
        };
        // The ranges are sorted and disjoint, so per order a cursor over the
        // blocks only moves forward: the check is one merge of the ranges
        // with each order's blocks, not a search per range.
        let mut cursors = [0usize; NR_ORDERS];
        for (i, r) in ranges.iter().enumerate() {
            let (start, len) = (r.start.get(), r.len.get());
            let first = start >> PAGE_SHIFT;
            let end = first + (len >> PAGE_SHIFT);
            if let Some((pfn, order)) = self.first_preserved_in(first, end, &mut cursors) {
                return Err(ParseError::PreservedInRange {
                    offset: offset + (i * 16) as u64,
                    kind,
                    start,
                    len,
                    pfn,
                    order,
                });
            }
        }
        Ok(())
    }

    /// The lowest-addressed preserved folio intersecting pages
    /// `[first, end)`, as `(head, order)`. `cursors[o]` is the first block
    /// of order `o` that may meet this range or a later one; the blocks
    /// before it end at or below `first`, and it moves past the blocks that
    /// end at or below this range's start.
    fn first_preserved_in(
        &self,
        first: u64,
        end: u64,
        cursors: &mut [usize; NR_ORDERS],
    ) -> Option<(u64, u8)> {
        let mut best: Option<(u64, u8)> = None;
        if first >= end {
            return None;
        }
        for (order, &(lo, hi)) in self.spans.iter().enumerate() {
            let blocks = &self.blocks[lo..hi];
            let cursor = &mut cursors[order];
            let order = order as u8;
            if blocks.is_empty() {
                continue;
            }
            let span = span(order);
            while blocks
                .get(*cursor)
                .is_some_and(|b| b.base_pfn().saturating_add(span) <= first)
            {
                *cursor += 1;
            }
            // The blocks from the cursor on start below `end` until one
            // does not: each meets the range. They stay for the next range,
            // which a block may meet too.
            for b in blocks.get(*cursor..).unwrap_or(&[]) {
                let base = b.base_pfn();
                if base >= end {
                    break;
                }
                // Folio indices in this block whose folio meets [first, end).
                let lo_pfn = first.max(base) & !((1u64 << order) - 1);
                let lo_idx = (lo_pfn - base) >> order;
                let hi_pfn = end.min(base + span);
                let hi_idx = (hi_pfn - base).div_ceil(1u64 << order);
                if let Some(idx) = first_set_in(&b.bits, lo_idx, hi_idx) {
                    let pfn = base + (idx << order);
                    if best.is_none_or(|(p, _)| pfn < p) {
                        best = Some((pfn, order));
                    }
                    break;
                }
            }
        }
        best
    }

    /// Whether `pfn` is the head of a preserved folio of exactly `order`.
    /// `cursor` indexes the blocks of `order` and only moves forward, so
    /// the PFNs asked for one order must not decrease. The blocks are
    /// checked free of cross-order overlaps, so a bit of `order` at `pfn`
    /// is the only folio holding it.
    fn heads_folio(&self, pfn: u64, order: Order, cursor: &mut usize) -> bool {
        let (lo, hi) = self.spans[order.index()];
        let blocks = &self.blocks[lo..hi];
        let span = span(order.get());
        while blocks
            .get(*cursor)
            .is_some_and(|b| b.base_pfn().saturating_add(span) <= pfn)
        {
            *cursor += 1;
        }
        let Some(b) = blocks.get(*cursor) else {
            return false;
        };
        let base = b.base_pfn();
        if pfn < base || pfn & (order.pages() - 1) != 0 {
            return false;
        }
        let idx = (pfn - base) >> order.get();
        b.bits
            .get((idx / 64) as usize)
            .is_some_and(|w| w.get() >> (idx % 64) & 1 != 0)
    }

    fn check_slab(&self, bytes: &'a [u8], offset: u64) -> ParseResult<SlabSection<'a>> {
        let kind = SectionKind::Slab;
        let Ok((h, rest)) = RawSlabHeader::ref_from_prefix(bytes) else {
            return Err(ParseError::SlabTooShort {
                offset,
                expected: SLAB_HEADER_SIZE as u64,
                found: bytes.len() as u64,
            });
        };
        let (cc, pc, wc) = (
            u64::from(h.cache_count.get()),
            u64::from(h.page_count.get()),
            u64::from(h.word_count.get()),
        );
        let expected = SLAB_HEADER_SIZE as u64
            + cc * SLAB_CACHE_SIZE as u64
            + pc * SLAB_PAGE_SIZE as u64
            + wc * 8;
        if expected != bytes.len() as u64 {
            return Err(ParseError::SlabLength {
                offset,
                expected,
                found: bytes.len() as u64,
            });
        }
        if h.reserved.get() != 0 {
            return Err(reserved(
                offset + 12,
                "slab header reserved",
                u64::from(h.reserved.get()),
            ));
        }
        let caches_off = offset + SLAB_HEADER_SIZE as u64;
        let pages_off = caches_off + cc * SLAB_CACHE_SIZE as u64;
        let words_off = pages_off + pc * SLAB_PAGE_SIZE as u64;
        let split = |b: &'a [u8], n: u64| b.split_at_checked(n as usize).unwrap_or((b, &[]));
        let (cb, rest) = split(rest, cc * SLAB_CACHE_SIZE as u64);
        let (pb, wb) = split(rest, pc * SLAB_PAGE_SIZE as u64);
        let caches: &[RawSlabCache] = records(cb, caches_off, kind)?;
        let pages: &[RawSlabPage] = records(pb, pages_off, kind)?;
        let words: &[U64] = records(wb, words_off, kind)?;

        let mut prev_id = None;
        for (i, c) in caches.iter().enumerate() {
            let off = caches_off + (i * SLAB_CACHE_SIZE) as u64;
            check_cache(c, off, prev_id)?;
            prev_id = Some(c.id.get());
        }

        let mut prev_pfn = None;
        let mut next_word = 0u64;
        // Pages are sorted by PFN: per order, a cursor over the blocks only
        // moves forward.
        let mut cursors = [0usize; NR_ORDERS];
        for (i, p) in pages.iter().enumerate() {
            let off = pages_off + (i * SLAB_PAGE_SIZE) as u64;
            let pfn = p.pfn.get();
            if let Some(prev) = prev_pfn {
                if pfn <= prev {
                    return Err(ParseError::SlabPageUnsorted {
                        offset: off,
                        expected: prev,
                        found: pfn,
                    });
                }
            }
            prev_pfn = Some(pfn);
            reserved_bytes(&p.reserved, off + 13, "page reserved")?;
            if p.reserved2.get() != 0 {
                return Err(reserved(
                    off + 36,
                    "page reserved2",
                    u64::from(p.reserved2.get()),
                ));
            }
            let id = p.cache_id.get();
            let Ok(ci) = caches.binary_search_by_key(&id, |c| c.id.get()) else {
                return Err(ParseError::SlabUnknownCache {
                    offset: off + 8,
                    expected: "the id of a cache record",
                    found: id,
                });
            };
            let cache = &caches[ci];
            // The cache record is validated, so its order is.
            if p.order != cache.order {
                return Err(ParseError::SlabPageOrder {
                    offset: off + 12,
                    expected: cache.order,
                    found: p.order,
                });
            }
            let order = Order::new(p.order).unwrap_or(Order::MAX);
            if !self.heads_folio(pfn, order, &mut cursors[order.index()]) {
                return Err(ParseError::SlabPageNotPreserved {
                    offset: off,
                    pfn,
                    order: p.order,
                    found: self.is_preserved(Pfn(pfn)).map(|(h, o)| (h.0, o.get())),
                });
            }
            let size = p.object_size.get();
            if size != cache.object_size.get() {
                return Err(ParseError::SlabPageObjectSize {
                    offset: off + 16,
                    expected: cache.object_size.get(),
                    found: size,
                });
            }
            let count = p.object_count.get();
            if count != cache.objects_per_slab.get() {
                return Err(ParseError::SlabPageObjectCount {
                    offset: off + 20,
                    expected: cache.objects_per_slab.get(),
                    found: count,
                });
            }
            let first = p.first_offset.get();
            let align = cache.align.get();
            if first % align != 0 {
                return Err(ParseError::SlabPageFirstOffset {
                    offset: off + 24,
                    expected: align,
                    found: first,
                });
            }
            let objects_end = u64::from(first) + u64::from(size) * u64::from(count);
            if objects_end > order.bytes() {
                return Err(ParseError::SlabPageOverflow {
                    offset: off + 24,
                    expected: order.bytes(),
                    found: objects_end,
                });
            }
            // `count >= 1`: the cache record allows no empty slab.
            let nwords = count.div_ceil(64);
            if p.bitmap_words.get() != nwords {
                return Err(ParseError::SlabPageBitmapWords {
                    offset: off + 28,
                    expected: nwords,
                    found: p.bitmap_words.get(),
                });
            }
            if u64::from(p.bitmap_index.get()) != next_word {
                return Err(ParseError::SlabPageBitmapIndex {
                    offset: off + 32,
                    expected: next_word,
                    found: p.bitmap_index.get(),
                });
            }
            next_word += u64::from(nwords);
            let last = next_word.checked_sub(1).and_then(|i| words.get(i as usize));
            let Some(w) = last else {
                return Err(ParseError::SlabBitmapOverrun {
                    offset: off + 28,
                    expected: wc,
                    found: next_word,
                });
            };
            let tail_bits = count % 64;
            if tail_bits != 0 && w.get() >> tail_bits != 0 {
                let bit = u64::from(tail_bits + (w.get() >> tail_bits).trailing_zeros());
                return Err(ParseError::SlabBitmapTail {
                    offset: words_off + (next_word - 1) * 8,
                    expected: count,
                    found: (u64::from(nwords) - 1) * 64 + bit,
                });
            }
        }
        if next_word != wc {
            return Err(ParseError::SlabWordCount {
                offset: offset + 8,
                expected: next_word,
                found: wc,
            });
        }
        Ok(SlabSection {
            offset,
            caches,
            pages,
            words,
        })
    }

    fn check_extents(&self, bytes: &'a [u8], offset: u64) -> ParseResult<&'a [RawExtent]> {
        let extents: &[RawExtent] = records(bytes, offset, SectionKind::Extents)?;
        let mut prev_end = 0u64;
        for (i, e) in extents.iter().enumerate() {
            let off = offset + (i * 24) as u64;
            let (start, len) = (e.start.get(), e.len.get());
            if len == 0 {
                return Err(ParseError::ExtentEmpty {
                    offset: off + 8,
                    expected: 1,
                    found: 0,
                });
            }
            let Some(end) = start.checked_add(len) else {
                return Err(ParseError::ExtentOverflow {
                    offset: off + 8,
                    start,
                    expected: u64::MAX - start,
                    found: len,
                });
            };
            if i > 0 && start < prev_end {
                return Err(ParseError::ExtentUnsorted {
                    offset: off,
                    expected: prev_end,
                    found: start,
                });
            }
            if e.reserved.get() != 0 {
                return Err(reserved(
                    off + 20,
                    "extent reserved",
                    u64::from(e.reserved.get()),
                ));
            }
            prev_end = end;
        }
        if extents.is_empty() {
            return Ok(extents);
        }
        // A linear merge against the coalesced preserved runs.
        let mut runs = self.coalesced();
        let mut cur = runs.next();
        for (i, e) in extents.iter().enumerate() {
            let (start, len) = (e.start.get(), e.len.get());
            let first = start >> PAGE_SHIFT;
            let last = (start + (len - 1)) >> PAGE_SHIFT;
            while let Some((_, end)) = cur {
                if end > first {
                    break;
                }
                cur = runs.next();
            }
            let found = match cur {
                Some((s, _)) if s > first => Some(start),
                Some((_, end)) if end <= last => Some(end << PAGE_SHIFT),
                Some(_) => None,
                None => Some(start),
            };
            if let Some(found) = found {
                return Err(ParseError::ExtentNotPreserved {
                    offset: offset + (i * 24) as u64,
                    start,
                    len,
                    found,
                });
            }
        }
        Ok(extents)
    }

    fn coalesced(&self) -> Coalesced<'a> {
        Coalesced::new(self.blocks, &self.spans)
    }

    /// The validated header.
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// The image bytes (`image_len` bytes of the input).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Arena size in bytes.
    pub fn arena_size(&self) -> u64 {
        self.header.arena_size
    }

    /// First PFN past the arena.
    pub fn arena_limit(&self) -> Pfn {
        Pfn(self.header.arena_size >> PAGE_SHIFT)
    }

    /// The section table, in table order, unknown optional kinds included.
    pub fn sections(&self) -> SectionIter<'a> {
        SectionIter {
            bytes: self.bytes,
            next: self.header.table_offset,
            stride: u64::from(self.header.entry_size),
            left: self.header.section_count,
        }
    }

    /// The table entry of a known kind, if present.
    pub fn section(&self, kind: SectionKind) -> Option<SectionInfo> {
        self.sections().find(|s| s.kind == kind)
    }

    /// The preserved folio containing `pfn`, as `(head, order)`: a binary
    /// search per order on the mapped MEMMAP blocks.
    pub fn is_preserved(&self, pfn: Pfn) -> Option<(Pfn, Order)> {
        self.locate(pfn).map(|(head, order, _, _)| (head, order))
    }

    /// `(head, order, block index, bit)` of the preserved folio holding `pfn`.
    pub(crate) fn locate(&self, pfn: Pfn) -> Option<(Pfn, Order, usize, u64)> {
        for order in Order::all() {
            let (lo, hi) = self.spans[order.index()];
            if lo == hi {
                continue;
            }
            let span = span(order.get());
            let base = pfn.0 & !(span - 1);
            let blocks = &self.blocks[lo..hi];
            if let Ok(bi) = blocks.binary_search_by_key(&base, |b| b.base_pfn()) {
                let idx = (pfn.0 - base) >> order.get();
                let word = blocks[bi].bits[(idx / 64) as usize].get();
                if word >> (idx % 64) & 1 != 0 {
                    return Some((pfn.align_down(order), order, lo + bi, idx));
                }
            }
        }
        None
    }

    /// Number of MEMMAP blocks.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// The MEMMAP blocks of one order, by base.
    pub fn blocks_of(&self, order: Order) -> ImageBlocks<'a> {
        let (lo, hi) = self.spans[order.index()];
        ImageBlocks {
            order,
            iter: self.blocks[lo..hi].iter(),
        }
    }

    /// Every MEMMAP block in image order, `(order, base)`.
    pub fn blocks(&self) -> impl Iterator<Item = BlockBits> + 'a {
        let spans = self.spans;
        let blocks = self.blocks;
        Order::all().flat_map(move |o| {
            let (lo, hi) = spans[o.index()];
            ImageBlocks {
                order: o,
                iter: blocks[lo..hi].iter(),
            }
        })
    }

    /// Every preserved folio in address order.
    ///
    /// Read in place from the mapped blocks. Internal iteration (`for_each`,
    /// `fold`, `count`, `sum` and the adapters built on them) runs each
    /// order's stretch as one tight loop and is the fastest way through a
    /// large image; `next()` works too, a little slower per folio.
    ///
    /// ```
    /// use kho_core::{Image, ImageBuilder, Order, Pfn, PreservedMap};
    ///
    /// let mut map = PreservedMap::new(Pfn(1 << 16));
    /// map.preserve_folios(Pfn(0), Order::ZERO, 100)?;
    /// map.preserve(Pfn(512), Order::new(9).unwrap())?;
    /// let bytes = ImageBuilder::new(1 << 28).memmap(&map).build()?;
    /// let img = Image::parse(&bytes)?;
    /// let pages: u64 = img.folios().map(|f| f.order.pages()).sum();
    /// assert_eq!(pages, 100 + 512);
    /// assert_eq!(img.folios().last().map(|f| f.pfn), Some(Pfn(512)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn folios(&self) -> ImageFolios<'a> {
        ImageFolios::new(self.blocks, &self.spans)
    }

    pub(crate) fn folio_merge(&self) -> super::walk::FolioMerge<'a> {
        super::walk::FolioMerge::new(self.blocks, &self.spans)
    }

    /// Preserved memory as maximal runs of pages, in address order.
    pub fn ranges(&self) -> ImageRanges<'a> {
        ImageRanges::new(self.blocks, &self.spans)
    }

    /// Number of preserved folios of `order` (a popcount of its blocks).
    pub fn folios_of(&self, order: Order) -> u64 {
        let (lo, hi) = self.spans[order.index()];
        self.blocks[lo..hi]
            .iter()
            .flat_map(|b| b.bits.iter())
            .map(|w| u64::from(w.get().count_ones()))
            .sum()
    }

    /// Number of preserved folios.
    pub fn folio_count(&self) -> u64 {
        Order::all().map(|o| self.folios_of(o)).sum()
    }

    /// Preserved bytes per order, indexed by order.
    pub fn bytes_per_order(&self) -> [u64; NR_ORDERS] {
        let mut out = [0u64; NR_ORDERS];
        for o in Order::all() {
            out[o.index()] = self.folios_of(o) * o.bytes();
        }
        out
    }

    /// Preserved bytes in total.
    pub fn preserved_bytes(&self) -> u64 {
        self.bytes_per_order().iter().sum()
    }

    /// The preserved map rebuilt in memory.
    pub fn to_map(&self) -> crate::PreservedMap {
        let mut map = crate::PreservedMap::new(self.arena_limit());
        for order in Order::all() {
            let (lo, hi) = self.spans[order.index()];
            let mut runs = OrderRuns::new(&self.blocks[lo..hi], order.get());
            while let Some(p) = runs.next_piece() {
                let count = (p.end - p.start) >> order.get();
                let done = map.preserve_folios(Pfn(p.start), order, count);
                // Parsing proved the folios disjoint and inside the arena.
                debug_assert!(done.is_ok(), "{done:?}");
            }
        }
        map
    }

    /// Scratch ranges, by address.
    pub fn scratch(&self) -> RangeIter<'a> {
        RangeIter {
            iter: self.scratch.1.iter(),
        }
    }

    /// KFENCE pool ranges, by address.
    pub fn kfence(&self) -> RangeIter<'a> {
        RangeIter {
            iter: self.kfence.1.iter(),
        }
    }

    /// Slab cache records, by id.
    pub fn slab_caches(&self) -> SlabCacheIter<'a> {
        SlabCacheIter {
            iter: self.slab.caches.iter(),
        }
    }

    /// The cache record with `id`.
    pub fn slab_cache(&self, id: u32) -> Option<SlabCacheView<'a>> {
        let caches = self.slab.caches;
        let i = caches.binary_search_by_key(&id, |c| c.id.get()).ok()?;
        caches.get(i).map(|raw| SlabCacheView { raw })
    }

    /// Preserved slab pages, by PFN.
    pub fn slab_pages(&self) -> SlabPageIter<'a> {
        SlabPageIter {
            iter: self.slab.pages.iter(),
            words: self.slab.words,
        }
    }

    /// The slab page record headed at `pfn`.
    pub fn slab_page(&self, pfn: Pfn) -> Option<SlabPageView<'a>> {
        let pages = self.slab.pages;
        let i = pages.binary_search_by_key(&pfn.0, |p| p.pfn.get()).ok()?;
        pages
            .get(i)
            .map(|raw| SlabPageView::new(raw, self.slab.words))
    }

    /// Offset of the SLAB section (0 when absent).
    pub fn slab_offset(&self) -> u64 {
        self.slab.offset
    }

    /// Valid-byte extents, by address.
    pub fn extents(&self) -> ExtentIter<'a> {
        ExtentIter {
            iter: self.extents.1.iter(),
        }
    }

    /// The metadata tree, or `None` when the TREE section is absent or
    /// empty.
    pub fn tree(&self) -> Option<&Tree> {
        self.tree.as_ref()
    }

    /// The raw TREE section bytes (empty when absent).
    pub fn tree_bytes(&self) -> &'a [u8] {
        self.tree_bytes
    }

    /// Offset of the TREE section (0 when absent).
    pub fn tree_offset(&self) -> u64 {
        self.tree_offset
    }
}

/// CRC32 of a header with its `header_crc32` field read as zero.
pub(crate) fn header_crc(head: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head.get(..HEADER_CRC_OFFSET).unwrap_or(head));
    h.update(&[0; 4]);
    h.update(head.get(HEADER_CRC_OFFSET + 4..).unwrap_or(&[]));
    h.finalize()
}

/// One SLAB cache record at `off`, after the one with id `prev_id`.
fn check_cache(c: &RawSlabCache, off: u64, prev_id: Option<u32>) -> ParseResult<()> {
    let id = c.id.get();
    if let Some(p) = prev_id {
        if id <= p {
            return Err(ParseError::SlabCacheUnsorted {
                offset: off,
                expected: p,
                found: id,
            });
        }
    }
    reserved_bytes(&c.reserved, off + 17, "cache reserved")?;
    let align = c.align.get();
    if !align.is_power_of_two() {
        return Err(ParseError::SlabCacheAlign {
            offset: off + 8,
            expected: "a power of two",
            found: align,
        });
    }
    let size = c.object_size.get();
    if size == 0 || size % align != 0 {
        return Err(ParseError::SlabCacheObjectSize {
            offset: off + 4,
            expected: align,
            found: size,
        });
    }
    let Some(order) = Order::new(c.order) else {
        return Err(ParseError::SlabCacheOrder {
            offset: off + 16,
            expected: MAX_MAP_ORDER,
            found: c.order,
        });
    };
    let per = c.objects_per_slab.get();
    let fit = order.bytes() / u64::from(size);
    if per == 0 || u64::from(per) > fit {
        return Err(ParseError::SlabCacheObjects {
            offset: off + 12,
            expected_min: 1,
            expected_max: fit,
            found: per,
        });
    }
    let name_off = off + 24;
    let n = name_len(&c.name);
    let (text, pad) = c.name.split_at(n);
    if let Err(e) = core::str::from_utf8(text) {
        let at = e.valid_up_to();
        return Err(ParseError::SlabCacheNameUtf8 {
            offset: name_off + at as u64,
            expected: "UTF-8",
            found: text.get(at).copied().unwrap_or(0),
        });
    }
    if let Some((offset, found)) = first_nonzero(pad, name_off + n as u64) {
        return Err(ParseError::SlabCacheNamePadding {
            offset,
            expected: 0,
            found,
        });
    }
    Ok(())
}

fn entry(image: &[u8], eo: u64) -> ParseResult<&RawSection> {
    RawSection::ref_from_prefix(sub(image, eo, ENTRY_SIZE as u64)?)
        .map(|(e, _)| e)
        .map_err(|_| ParseError::Truncated {
            offset: eo,
            expected: ENTRY_SIZE as u64,
            found: image.len() as u64,
        })
}

/// Where a known section lies: its offset and length, and the offset of its
/// table entry.
#[derive(Clone, Copy)]
struct Located {
    offset: u64,
    len: u64,
    entry: u64,
}

/// Table bounds and CRC, then each entry; returns where each known kind
/// lies.
fn locate_sections(image: &[u8], h: &ImageHeader) -> ParseResult<[Option<Located>; 6]> {
    let hs = u64::from(h.header_size);
    let stride = u64::from(h.entry_size);
    let tlen = u64::from(h.section_count) * stride;
    let tend = h.table_offset.checked_add(tlen);
    if h.table_offset % SECTION_ALIGN != 0
        || h.table_offset < hs
        || tend.is_none_or(|e| e > h.image_len)
    {
        return Err(ParseError::TableBounds {
            offset: 48,
            expected_min: hs,
            expected_max: h.image_len,
            found: h.table_offset,
            len: tlen,
        });
    }
    let tend = h.table_offset + tlen;
    let table = sub(image, h.table_offset, tlen)?;
    let found = crc32fast::hash(table);
    if found != h.table_crc32 {
        return Err(ParseError::TableCrc {
            offset: h.table_offset,
            expected: h.table_crc32,
            found,
        });
    }
    zero_padding(image, hs, h.table_offset, "before the section table")?;

    let mut located: [Option<Located>; 6] = [None; 6];
    let mut prev_end = tend;
    for i in 0..u64::from(h.section_count) {
        let eo = h.table_offset + i * stride;
        let e = entry(image, eo)?;
        reserved_bytes(
            sub(image, eo + ENTRY_SIZE as u64, stride - ENTRY_SIZE as u64)?,
            eo + ENTRY_SIZE as u64,
            "entry tail",
        )?;
        if e.reserved.get() != 0 {
            return Err(reserved(
                eo + 28,
                "entry reserved",
                u64::from(e.reserved.get()),
            ));
        }
        let flags = e.flags.get();
        if flags & !SECTION_REQUIRED != 0 {
            return Err(ParseError::SectionFlags {
                offset: eo + 4,
                expected: SECTION_REQUIRED,
                found: flags,
            });
        }
        let kind = SectionKind::from_raw(e.kind.get());
        let (start, len) = (e.offset.get(), e.len.get());
        match kind.index().and_then(|k| located[k]) {
            Some(first) => {
                return Err(ParseError::DuplicateSection {
                    offset: eo,
                    kind,
                    first: first.entry,
                })
            }
            None if kind.index().is_none() && flags & SECTION_REQUIRED != 0 => {
                return Err(ParseError::UnknownRequiredSection {
                    offset: eo,
                    found: e.kind.get(),
                })
            }
            _ => {}
        }
        let end = start.checked_add(len);
        if start % SECTION_ALIGN != 0 || end.is_none_or(|e| e > h.image_len) {
            return Err(ParseError::SectionBounds {
                offset: eo,
                kind,
                start,
                len,
                image_len: h.image_len,
            });
        }
        if start < prev_end {
            return Err(ParseError::SectionOverlap {
                offset: eo,
                kind,
                expected: prev_end,
                found: start,
            });
        }
        zero_padding(image, prev_end, start, "before a section")?;
        prev_end = start + len;
        if let Some(k) = kind.index() {
            located[k] = Some(Located {
                offset: start,
                len,
                entry: eo,
            });
        }
    }
    zero_padding(image, prev_end, h.image_len, "after the last section")?;
    if located[0].is_none() {
        return Err(ParseError::MissingSection {
            offset: h.table_offset,
            kind: SectionKind::Memmap,
        });
    }
    Ok(located)
}

/// Iterator over the section table; see [`Image::sections`].
#[derive(Debug, Clone)]
pub struct SectionIter<'a> {
    bytes: &'a [u8],
    next: u64,
    stride: u64,
    left: u32,
}

impl Iterator for SectionIter<'_> {
    type Item = SectionInfo;

    fn next(&mut self) -> Option<SectionInfo> {
        if self.left == 0 {
            return None;
        }
        let e = entry(self.bytes, self.next).ok()?;
        self.left -= 1;
        self.next += self.stride;
        Some(SectionInfo {
            kind: SectionKind::from_raw(e.kind.get()),
            flags: e.flags.get(),
            offset: e.offset.get(),
            len: e.len.get(),
            crc32: e.crc32.get(),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left as usize, Some(self.left as usize))
    }
}

/// One order's MEMMAP blocks as [`BlockBits`], read from the image.
#[derive(Debug, Clone)]
pub struct ImageBlocks<'a> {
    order: Order,
    iter: core::slice::Iter<'a, RawBlock>,
}

impl Iterator for ImageBlocks<'_> {
    type Item = BlockBits;

    #[inline]
    fn next(&mut self) -> Option<BlockBits> {
        let b = self.iter.next()?;
        Some(BlockBits {
            order: self.order,
            base: Pfn(b.base_pfn()),
            words: core::array::from_fn(|i| b.bits[i].get()),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.iter.size_hint()
    }
}

/// SCRATCH or KFENCE ranges; see [`Image::scratch`].
#[derive(Debug, Clone)]
pub struct RangeIter<'a> {
    iter: core::slice::Iter<'a, RawRange>,
}

impl Iterator for RangeIter<'_> {
    type Item = PhysRange;

    fn next(&mut self) -> Option<PhysRange> {
        let r = self.iter.next()?;
        Some(PhysRange::new(PhysAddr(r.start.get()), r.len.get()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.iter.size_hint()
    }
}

impl ExactSizeIterator for RangeIter<'_> {}

/// EXTENTS records; see [`Image::extents`].
#[derive(Debug, Clone)]
pub struct ExtentIter<'a> {
    iter: core::slice::Iter<'a, RawExtent>,
}

impl Iterator for ExtentIter<'_> {
    type Item = Extent;

    fn next(&mut self) -> Option<Extent> {
        let e = self.iter.next()?;
        Some(Extent {
            range: PhysRange::new(PhysAddr(e.start.get()), e.len.get()),
            tag: e.tag.get(),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.iter.size_hint()
    }
}

impl ExactSizeIterator for ExtentIter<'_> {}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use zerocopy::little_endian::U64;

    use super::{first_set_in, run_end};
    use crate::image::layout::RawBlock;
    use crate::memmap::{BLOCK_BITS, BLOCK_WORDS};

    fn brute(words: &[u64; BLOCK_WORDS], lo: u64, hi: u64) -> Option<u64> {
        (lo..hi.min(BLOCK_BITS)).find(|&i| words[(i / 64) as usize] >> (i % 64) & 1 == 1)
    }

    proptest! {
        #[test]
        fn first_set_in_matches_a_bit_by_bit_scan(
            bits in prop::collection::vec(0..BLOCK_BITS, 0..12),
            lo in 0..BLOCK_BITS + 70,
            len in 0u64..5000,
        ) {
            let mut words = [0u64; BLOCK_WORDS];
            for b in bits {
                words[(b / 64) as usize] |= 1 << (b % 64);
            }
            let raw: [U64; BLOCK_WORDS] = words.map(U64::new);
            let hi = lo + len;
            prop_assert_eq!(first_set_in(&raw, lo, hi), brute(&words, lo, hi));
        }

        #[test]
        fn run_end_finds_each_orders_blocks(
            mut orders in prop::collection::vec(0u8..19, 0..300),
            sorted in any::<bool>(),
        ) {
            if sorted {
                orders.sort_unstable();
            }
            let blocks: Vec<RawBlock> = orders
                .iter()
                .map(|&o| RawBlock::new(0, o, [U64::new(1); BLOCK_WORDS]))
                .collect();
            let mut from = 0;
            for o in 0..19u64 {
                let end = run_end(&blocks, from, o);
                prop_assert!(from <= end && end <= blocks.len());
                if sorted {
                    let want = from + blocks[from..].partition_point(|b| b.order_field() <= o);
                    prop_assert_eq!(end, want);
                }
                from = end;
            }
            if sorted {
                prop_assert_eq!(from, blocks.len());
            }
        }
    }
}
