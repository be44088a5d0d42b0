//! Errors of the image writer, reader and restorer.

use super::SectionKind;

/// Why untrusted bytes are not a valid handover image.
///
/// Every variant names the byte `offset` (from the image start) of the field
/// or record at fault, and where it makes sense what was expected and what
/// was found. Variants are listed in validation order (FORMAT.md §6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The input ends before a structure it must contain.
    #[error("truncated at {offset:#x}: need {expected:#x} bytes, have {found:#x}")]
    Truncated {
        /// Where the missing structure starts.
        offset: u64,
        /// Bytes needed.
        expected: u64,
        /// Bytes available.
        found: u64,
    },
    /// The first eight bytes are not the image magic.
    #[error("bad magic at {offset:#x}: expected {expected:02x?}, found {found:02x?}")]
    BadMagic {
        /// Always 0.
        offset: u64,
        /// The magic of format v1.
        expected: [u8; 8],
        /// The bytes found.
        found: [u8; 8],
    },
    /// `header_size` is below the known header, not a multiple of 8, or past
    /// the input.
    #[error("bad header size at {offset:#x}: expected a multiple of 8 in [{expected_min:#x}, {expected_max:#x}], found {found:#x}")]
    HeaderSize {
        /// Offset of the field.
        offset: u64,
        /// Smallest acceptable size.
        expected_min: u64,
        /// Largest acceptable size (the input length).
        expected_max: u64,
        /// The size found.
        found: u64,
    },
    /// A major version this reader does not know.
    #[error("unsupported major version at {offset:#x}: expected {expected}, found {found}")]
    UnsupportedMajor {
        /// Offset of the field.
        offset: u64,
        /// The supported major version.
        expected: u16,
        /// The major version found.
        found: u16,
    },
    /// The header checksum does not match.
    #[error("header crc mismatch at {offset:#x}: stored {expected:#010x}, computed {found:#010x}")]
    HeaderCrc {
        /// Offset of the CRC field.
        offset: u64,
        /// CRC stored in the header.
        expected: u32,
        /// CRC computed over the header.
        found: u32,
    },
    /// A header tail beyond the known fields holds a non-zero byte.
    #[error("unknown non-zero header byte at {offset:#x}: expected 0, found {found:#04x}")]
    HeaderTail {
        /// Offset of the first non-zero byte.
        offset: u64,
        /// Its value.
        found: u8,
    },
    /// The page shift is not 12.
    #[error("bad page shift at {offset:#x}: expected {expected}, found {found}")]
    PageShift {
        /// Offset of the field.
        offset: u64,
        /// The page shift of format v1.
        expected: u32,
        /// The value found.
        found: u32,
    },
    /// Header flag bits this reader does not know.
    #[error("unknown header flags at {offset:#x}: expected 0, found {found:#x}")]
    HeaderFlags {
        /// Offset of the field.
        offset: u64,
        /// The flags found.
        found: u32,
    },
    /// The arena size is not a multiple of the page size.
    #[error("arena size at {offset:#x} is not page aligned: found {found:#x}")]
    ArenaSize {
        /// Offset of the field.
        offset: u64,
        /// The size found.
        found: u64,
    },
    /// `image_len` is smaller than the header, not a multiple of 8, or
    /// larger than the input.
    #[error("bad image length at {offset:#x}: expected a multiple of 8 in [{expected_min:#x}, {expected_max:#x}], found {found:#x}")]
    ImageLength {
        /// Offset of the field.
        offset: u64,
        /// Smallest acceptable length (the header size).
        expected_min: u64,
        /// Largest acceptable length (the input length).
        expected_max: u64,
        /// The length found.
        found: u64,
    },
    /// A reserved field or byte is not zero.
    #[error("reserved field at {offset:#x} is not zero: found {found:#x}")]
    Reserved {
        /// Offset of the field.
        offset: u64,
        /// The value found.
        found: u64,
    },
    /// The section table entry size is too small or not a multiple of 8.
    #[error("bad section entry size at {offset:#x}: expected a multiple of 8 >= {expected:#x}, found {found:#x}")]
    EntrySize {
        /// Offset of the field.
        offset: u64,
        /// Smallest acceptable size.
        expected: u32,
        /// The size found.
        found: u32,
    },
    /// The section table is misaligned, overlaps the header, or does not fit
    /// in the image.
    #[error("section table {found:#x}+{len:#x} out of bounds: expected 8-aligned inside [{expected_min:#x}, {expected_max:#x})")]
    TableBounds {
        /// Offset of the `table_offset` field.
        offset: u64,
        /// First byte the table may use.
        expected_min: u64,
        /// One past the last byte the table may use.
        expected_max: u64,
        /// The table offset found.
        found: u64,
        /// The table length (entries times entry size), saturated.
        len: u64,
    },
    /// The section table checksum does not match.
    #[error("section table crc mismatch at {offset:#x}: stored {expected:#010x}, computed {found:#010x}")]
    TableCrc {
        /// Offset of the table.
        offset: u64,
        /// CRC stored in the header.
        expected: u32,
        /// CRC computed over the table.
        found: u32,
    },
    /// Section flag bits this reader does not know.
    #[error("unknown flags in section entry at {offset:#x}: expected at most {expected:#x}, found {found:#x}")]
    SectionFlags {
        /// Offset of the entry.
        offset: u64,
        /// The known flag bits.
        expected: u32,
        /// The flags found.
        found: u32,
    },
    /// A section that is misaligned or runs past the image.
    #[error("section {kind} at entry {offset:#x} out of bounds: {start:#x}+{len:#x}, expected 8-aligned inside {image_len:#x} bytes")]
    SectionBounds {
        /// Offset of the entry.
        offset: u64,
        /// The section's kind.
        kind: SectionKind,
        /// Section start found.
        start: u64,
        /// Section length found.
        len: u64,
        /// Image length.
        image_len: u64,
    },
    /// A section that starts before the end of the previous one (sections
    /// are listed by increasing offset), or inside the header or the table.
    #[error("section {kind} at entry {offset:#x} overlaps: expected a start >= {expected:#x}, found {found:#x}")]
    SectionOverlap {
        /// Offset of the entry.
        offset: u64,
        /// The section's kind.
        kind: SectionKind,
        /// First free byte after the previous section, table or header.
        expected: u64,
        /// Section start found.
        found: u64,
    },
    /// Two sections of the same known kind.
    #[error("duplicate section {kind} at entry {offset:#x}")]
    DuplicateSection {
        /// Offset of the second entry.
        offset: u64,
        /// The repeated kind.
        kind: SectionKind,
    },
    /// A section kind this reader does not know, flagged as required.
    #[error("unknown required section kind {found:#x} at entry {offset:#x}")]
    UnknownRequiredSection {
        /// Offset of the entry.
        offset: u64,
        /// The kind found.
        found: u32,
    },
    /// A section every image must have is absent.
    #[error("missing required section {kind} (table at {offset:#x})")]
    MissingSection {
        /// Offset of the section table.
        offset: u64,
        /// The missing kind.
        kind: SectionKind,
    },
    /// A byte outside the header, table and sections is not zero.
    #[error("padding byte at {offset:#x} is not zero: found {found:#04x}")]
    Padding {
        /// Offset of the byte.
        offset: u64,
        /// Its value.
        found: u8,
    },
    /// A section checksum does not match.
    #[error("section {kind} crc mismatch at {offset:#x}: stored {expected:#010x}, computed {found:#010x}")]
    SectionCrc {
        /// Offset of the section.
        offset: u64,
        /// The section's kind.
        kind: SectionKind,
        /// CRC stored in the table.
        expected: u32,
        /// CRC computed over the bytes.
        found: u32,
    },
    /// A section whose length does not fit its records.
    #[error(
        "section {kind} at {offset:#x} has bad length: expected {expected:#x}, found {found:#x}"
    )]
    SectionLength {
        /// Offset of the section.
        offset: u64,
        /// The section's kind.
        kind: SectionKind,
        /// The length its records imply (or the record size it must be a
        /// multiple of).
        expected: u64,
        /// The length found.
        found: u64,
    },
    /// A MEMMAP block with an order above the maximum.
    #[error("block at {offset:#x}: order expected <= {expected}, found {found}")]
    BlockOrder {
        /// Offset of the block.
        offset: u64,
        /// The largest order.
        expected: u8,
        /// The order field found (the low 12 bits of the block key).
        found: u64,
    },
    /// A MEMMAP block whose base is not a multiple of its span.
    #[error("block at {offset:#x}: base pfn {found:#x} is not a multiple of {expected:#x}")]
    BlockMisaligned {
        /// Offset of the block.
        offset: u64,
        /// The required alignment in pages.
        expected: u64,
        /// The base found.
        found: u64,
    },
    /// MEMMAP blocks not strictly sorted by `(order, base)`.
    #[error("block at {offset:#x}: expected a key above (order {prev_order}, base {prev_base:#x}), found (order {order}, base {base:#x})")]
    BlockUnsorted {
        /// Offset of the block.
        offset: u64,
        /// Order of the previous block.
        prev_order: u8,
        /// Base of the previous block.
        prev_base: u64,
        /// Order found.
        order: u8,
        /// Base found.
        base: u64,
    },
    /// A MEMMAP block with no bit set.
    #[error("block at {offset:#x} (order {order}, base {base:#x}) has no bit set")]
    EmptyBlock {
        /// Offset of the block.
        offset: u64,
        /// Its order.
        order: u8,
        /// Its base.
        base: u64,
    },
    /// A preserved folio that ends past the arena.
    #[error("block at {offset:#x}: folio {pfn:#x} of order {order} ends past the arena limit pfn {expected:#x}")]
    FolioOutOfArena {
        /// Offset of the block.
        offset: u64,
        /// Head of the folio.
        pfn: u64,
        /// Its order.
        order: u8,
        /// First PFN past the arena.
        expected: u64,
    },
    /// Two preserved folios (of any orders) that share a page.
    #[error("block at {offset:#x}: folio {pfn:#x} of order {order} overlaps folio {other_pfn:#x} of order {other_order}")]
    FolioOverlap {
        /// Offset of the block holding the later folio.
        offset: u64,
        /// Head of the later folio.
        pfn: u64,
        /// Its order.
        order: u8,
        /// Head of the folio it overlaps.
        other_pfn: u64,
        /// Order of the folio it overlaps.
        other_order: u8,
    },
    /// A SCRATCH or KFENCE range that is empty or not page aligned.
    #[error("{kind} range at {offset:#x} ({start:#x}+{len:#x}) is empty or not page aligned")]
    RangeInvalid {
        /// Offset of the record.
        offset: u64,
        /// The section.
        kind: SectionKind,
        /// Start found.
        start: u64,
        /// Length found.
        len: u64,
    },
    /// A range that overlaps or precedes its predecessor.
    #[error("{kind} record at {offset:#x}: expected a start >= {expected:#x}, found {found:#x}")]
    RangeUnsorted {
        /// Offset of the record.
        offset: u64,
        /// The section.
        kind: SectionKind,
        /// End of the previous range.
        expected: u64,
        /// Start found.
        found: u64,
    },
    /// A range that runs past the arena.
    #[error(
        "{kind} range at {offset:#x} ({start:#x}+{len:#x}) ends past the arena size {expected:#x}"
    )]
    RangeOutOfArena {
        /// Offset of the record.
        offset: u64,
        /// The section.
        kind: SectionKind,
        /// Start found.
        start: u64,
        /// Length found.
        len: u64,
        /// The arena size.
        expected: u64,
    },
    /// A SCRATCH range and a KFENCE range that share a byte.
    #[error("KFENCE range at {offset:#x} ({start:#x}+{len:#x}) overlaps scratch range {scratch_start:#x}+{scratch_len:#x}")]
    KfenceInScratch {
        /// Offset of the KFENCE record.
        offset: u64,
        /// KFENCE range start.
        start: u64,
        /// KFENCE range length.
        len: u64,
        /// Scratch range start.
        scratch_start: u64,
        /// Scratch range length.
        scratch_len: u64,
    },
    /// A preserved folio inside a SCRATCH or KFENCE range.
    #[error("{kind} range at {offset:#x} ({start:#x}+{len:#x}) holds preserved folio {pfn:#x} of order {order}")]
    PreservedInRange {
        /// Offset of the range record.
        offset: u64,
        /// The section.
        kind: SectionKind,
        /// Range start.
        start: u64,
        /// Range length.
        len: u64,
        /// Head of the preserved folio.
        pfn: u64,
        /// Its order.
        order: u8,
    },
    /// SLAB cache records not strictly sorted by id (so ids repeat).
    #[error("slab cache at {offset:#x}: expected an id > {expected:#x}, found {found:#x}")]
    SlabCacheUnsorted {
        /// Offset of the record.
        offset: u64,
        /// The previous id.
        expected: u32,
        /// The id found.
        found: u32,
    },
    /// A SLAB cache record with an impossible field.
    #[error("slab cache at {offset:#x}: bad {field}: found {found:#x}")]
    SlabCacheField {
        /// Offset of the record.
        offset: u64,
        /// Which field.
        field: &'static str,
        /// The value found.
        found: u64,
    },
    /// A SLAB page record naming a cache id with no record.
    #[error("slab page at {offset:#x}: unknown cache id {found:#x}")]
    SlabUnknownCache {
        /// Offset of the record.
        offset: u64,
        /// The id found.
        found: u32,
    },
    /// SLAB page records not strictly sorted by PFN.
    #[error("slab page at {offset:#x}: expected a pfn > {expected:#x}, found {found:#x}")]
    SlabPageUnsorted {
        /// Offset of the record.
        offset: u64,
        /// The previous PFN.
        expected: u64,
        /// The PFN found.
        found: u64,
    },
    /// A SLAB page that is not the head of a preserved folio of its order.
    #[error("slab page at {offset:#x}: pfn {pfn:#x} expected preserved head of order {order}, found {found:?}")]
    SlabPageNotPreserved {
        /// Offset of the record.
        offset: u64,
        /// The PFN.
        pfn: u64,
        /// The order the record claims.
        order: u8,
        /// The preserved folio containing the PFN, as `(head, order)`, if any.
        found: Option<(u64, u8)>,
    },
    /// A SLAB page record with an impossible field.
    #[error("slab page at {offset:#x}: bad {field}: expected {expected:#x}, found {found:#x}")]
    SlabPageField {
        /// Offset of the record.
        offset: u64,
        /// Which field.
        field: &'static str,
        /// The value expected (or the limit).
        expected: u64,
        /// The value found.
        found: u64,
    },
    /// An allocation bit set beyond a slab page's object count.
    #[error("slab page at {offset:#x}: allocation bit {found} set beyond object count {expected}")]
    SlabBitmapTail {
        /// Offset of the bitmap word.
        offset: u64,
        /// The object count.
        expected: u32,
        /// The first bit set beyond it.
        found: u64,
    },
    /// An EXTENTS record that is empty or overflows.
    #[error("extent at {offset:#x} ({start:#x}+{len:#x}) is empty or overflows")]
    ExtentInvalid {
        /// Offset of the record.
        offset: u64,
        /// Start found.
        start: u64,
        /// Length found.
        len: u64,
    },
    /// An extent that overlaps or precedes its predecessor.
    #[error("extent at {offset:#x}: expected a start >= {expected:#x}, found {found:#x}")]
    ExtentUnsorted {
        /// Offset of the record.
        offset: u64,
        /// End of the previous extent.
        expected: u64,
        /// Start found.
        found: u64,
    },
    /// An extent that is not entirely inside preserved memory.
    #[error("extent at {offset:#x} ({start:#x}+{len:#x}): byte {found:#x} is not preserved")]
    ExtentNotPreserved {
        /// Offset of the record.
        offset: u64,
        /// Start of the extent.
        start: u64,
        /// Its length.
        len: u64,
        /// The first byte of it outside preserved memory.
        found: u64,
    },
    /// The TREE section does not decode within its caps.
    #[error("metadata tree at {offset:#x} does not decode: {source}")]
    Tree {
        /// Offset of the section.
        offset: u64,
        /// What the tree decoder reported.
        source: crate::tree::TreeError,
    },
}

impl ParseError {
    /// Byte offset in the image where the fault lies.
    pub fn offset(&self) -> Option<u64> {
        use ParseError::*;
        Some(match self {
            Truncated { offset, .. }
            | BadMagic { offset, .. }
            | HeaderSize { offset, .. }
            | UnsupportedMajor { offset, .. }
            | HeaderCrc { offset, .. }
            | HeaderTail { offset, .. }
            | PageShift { offset, .. }
            | HeaderFlags { offset, .. }
            | ArenaSize { offset, .. }
            | ImageLength { offset, .. }
            | Reserved { offset, .. }
            | EntrySize { offset, .. }
            | TableBounds { offset, .. }
            | TableCrc { offset, .. }
            | SectionFlags { offset, .. }
            | SectionBounds { offset, .. }
            | SectionOverlap { offset, .. }
            | DuplicateSection { offset, .. }
            | UnknownRequiredSection { offset, .. }
            | MissingSection { offset, .. }
            | Padding { offset, .. }
            | SectionCrc { offset, .. }
            | SectionLength { offset, .. }
            | BlockOrder { offset, .. }
            | BlockMisaligned { offset, .. }
            | BlockUnsorted { offset, .. }
            | EmptyBlock { offset, .. }
            | FolioOutOfArena { offset, .. }
            | FolioOverlap { offset, .. }
            | RangeInvalid { offset, .. }
            | RangeUnsorted { offset, .. }
            | RangeOutOfArena { offset, .. }
            | KfenceInScratch { offset, .. }
            | PreservedInRange { offset, .. }
            | SlabCacheUnsorted { offset, .. }
            | SlabCacheField { offset, .. }
            | SlabUnknownCache { offset, .. }
            | SlabPageUnsorted { offset, .. }
            | SlabPageNotPreserved { offset, .. }
            | SlabPageField { offset, .. }
            | SlabBitmapTail { offset, .. }
            | ExtentInvalid { offset, .. }
            | ExtentUnsorted { offset, .. }
            | ExtentNotPreserved { offset, .. }
            | Tree { offset, .. } => *offset,
        })
    }

    /// A stable, kebab-case name of the variant, for tools and fixtures.
    pub fn kind(&self) -> &'static str {
        use ParseError::*;
        match self {
            Truncated { .. } => "truncated",
            BadMagic { .. } => "bad-magic",
            HeaderSize { .. } => "header-size",
            UnsupportedMajor { .. } => "unsupported-major",
            HeaderCrc { .. } => "header-crc",
            HeaderTail { .. } => "header-tail",
            PageShift { .. } => "page-shift",
            HeaderFlags { .. } => "header-flags",
            ArenaSize { .. } => "arena-size",
            ImageLength { .. } => "image-length",
            Reserved { .. } => "reserved",
            EntrySize { .. } => "entry-size",
            TableBounds { .. } => "table-bounds",
            TableCrc { .. } => "table-crc",
            SectionFlags { .. } => "section-flags",
            SectionBounds { .. } => "section-bounds",
            SectionOverlap { .. } => "section-overlap",
            DuplicateSection { .. } => "duplicate-section",
            UnknownRequiredSection { .. } => "unknown-required-section",
            MissingSection { .. } => "missing-section",
            Padding { .. } => "padding",
            SectionCrc { .. } => "section-crc",
            SectionLength { .. } => "section-length",
            BlockOrder { .. } => "block-order",
            BlockMisaligned { .. } => "block-misaligned",
            BlockUnsorted { .. } => "block-unsorted",
            EmptyBlock { .. } => "empty-block",
            FolioOutOfArena { .. } => "folio-out-of-arena",
            FolioOverlap { .. } => "folio-overlap",
            RangeInvalid { .. } => "range-invalid",
            RangeUnsorted { .. } => "range-unsorted",
            RangeOutOfArena { .. } => "range-out-of-arena",
            KfenceInScratch { .. } => "kfence-in-scratch",
            PreservedInRange { .. } => "preserved-in-range",
            SlabCacheUnsorted { .. } => "slab-cache-unsorted",
            SlabCacheField { .. } => "slab-cache-field",
            SlabUnknownCache { .. } => "slab-unknown-cache",
            SlabPageUnsorted { .. } => "slab-page-unsorted",
            SlabPageNotPreserved { .. } => "slab-page-not-preserved",
            SlabPageField { .. } => "slab-page-field",
            SlabBitmapTail { .. } => "slab-bitmap-tail",
            ExtentInvalid { .. } => "extent-invalid",
            ExtentUnsorted { .. } => "extent-unsorted",
            ExtentNotPreserved { .. } => "extent-not-preserved",
            Tree { .. } => "tree",
        }
    }
}

/// Why an [`ImageBuilder`](super::ImageBuilder) refused to write an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A slab cache name longer than the on-image field or containing NUL.
    #[error("slab cache {id:#x}: name of {found} bytes, expected at most {expected} and no NUL")]
    CacheName {
        /// The cache id.
        id: u32,
        /// The field size.
        expected: usize,
        /// The name length found.
        found: usize,
    },
    /// A slab page whose bitmap does not have `ceil(object_count / 64)`
    /// words.
    #[error("slab page {pfn:#x}: bitmap of {found} words, expected {expected}")]
    BitmapLength {
        /// The slab page.
        pfn: u64,
        /// Words expected.
        expected: usize,
        /// Words given.
        found: usize,
    },
    /// A count that does not fit its on-image field.
    #[error("{what}: {found:#x} does not fit in {expected} bits")]
    TooMany {
        /// What was counted.
        what: &'static str,
        /// Field width in bits.
        expected: u32,
        /// The count.
        found: u64,
    },
    /// The metadata tree does not encode within the default caps.
    #[error("metadata tree does not encode: {0}")]
    Tree(crate::tree::TreeError),
    /// The output buffer is smaller than the image.
    #[error("output buffer of {found:#x} bytes, expected at least {expected:#x}")]
    BufferTooSmall {
        /// The image length.
        expected: u64,
        /// The buffer length.
        found: u64,
    },
    /// The assembled image fails validation; the builder never emits an
    /// image its own reader rejects.
    #[error("image would be invalid: {0}")]
    Invalid(#[from] ParseError),
}

/// Why a folio could not be restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// No preserved folio contains the PFN.
    #[error("pfn {pfn:#x} is not preserved")]
    NotPreserved {
        /// The PFN asked for.
        pfn: u64,
    },
    /// The PFN is inside a preserved folio but is not its head.
    #[error("pfn {pfn:#x} is not a folio head: it lies in folio {head:#x} of order {order}")]
    NotHead {
        /// The PFN asked for.
        pfn: u64,
        /// Head of the containing folio.
        head: u64,
        /// Order of the containing folio.
        order: u8,
    },
    /// The folio was restored before.
    #[error("folio {pfn:#x} of order {order} is already restored")]
    AlreadyRestored {
        /// The head PFN.
        pfn: u64,
        /// Its order.
        order: u8,
    },
}
