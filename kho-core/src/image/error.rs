//! Errors of the image writer, reader and restorer.

use super::SectionKind;

/// Why untrusted bytes are not a valid handover image.
///
/// Every variant names the byte `offset` (from the image start) of the field
/// or record at fault, what was expected (a value, a bound or, where no
/// number fits, a short description) and what was found. Each validation
/// rule of FORMAT.md has its own variant; a rule that applies in several
/// places ([`Reserved`](Self::Reserved), [`Padding`](Self::Padding),
/// [`SectionLength`](Self::SectionLength), ...) names the field, gap or
/// section it found at fault. Variants are listed in validation order
/// (FORMAT.md §6); [`ParseError::KINDS`] lists their [`kind`](Self::kind)
/// names in the same order.
///
/// Offsets never exceed the input's length: a fault lies inside the input,
/// except that a truncated input is reported at its end, where the missing
/// bytes would start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The input is shorter than the fixed header.
    #[error("truncated header at {offset:#x}: need {expected:#x} bytes, have {found:#x}")]
    HeaderTruncated {
        /// The input's end, where the missing bytes would start.
        offset: u64,
        /// Bytes of the v1.0 header.
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
    #[error(
        "unknown non-zero header byte at {offset:#x}: expected {expected:#04x}, found {found:#04x}"
    )]
    HeaderTail {
        /// Offset of the first non-zero byte.
        offset: u64,
        /// Always 0: a v1.0 reader accepts a longer header only while its
        /// tail is zero.
        expected: u8,
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
    #[error("unknown header flags at {offset:#x}: expected {expected:#x}, found {found:#x}")]
    HeaderFlags {
        /// Offset of the field.
        offset: u64,
        /// Always 0: format v1 defines no header flag.
        expected: u32,
        /// The flags found.
        found: u32,
    },
    /// The arena size is not a multiple of the page size.
    #[error("arena size at {offset:#x}: expected a multiple of {expected:#x}, found {found:#x}")]
    ArenaSize {
        /// Offset of the field.
        offset: u64,
        /// The page size it must be a multiple of.
        expected: u64,
        /// The size found.
        found: u64,
    },
    /// `image_len` is larger than the input: the image was cut short. (It
    /// also guards every later read of a range the header or table
    /// located, which the checks before it already keep inside the input.)
    #[error("truncated at {offset:#x}: need {expected:#x} bytes, have {found:#x}")]
    Truncated {
        /// The input's end, where the missing bytes would start.
        offset: u64,
        /// Bytes needed (`image_len`).
        expected: u64,
        /// Bytes available.
        found: u64,
    },
    /// `image_len` is smaller than the header or not a multiple of 8.
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
    #[error("section table {found:#x}+{len:#x} (table_offset at {offset:#x}) out of bounds: expected 8-aligned inside [{expected_min:#x}, {expected_max:#x})")]
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
    /// A byte outside the header, table and sections is not zero.
    #[error("padding byte {gap} at {offset:#x} is not zero: expected {expected:#04x}, found {found:#04x}")]
    Padding {
        /// Offset of the byte.
        offset: u64,
        /// Which gap: `"before the section table"`, `"before a section"`
        /// or `"after the last section"`.
        gap: &'static str,
        /// Always 0.
        expected: u8,
        /// Its value.
        found: u8,
    },
    /// A reserved field or byte is not zero.
    #[error(
        "reserved {field} at {offset:#x} is not zero: expected {expected:#x}, found {found:#x}"
    )]
    Reserved {
        /// Offset of the first non-zero byte.
        offset: u64,
        /// Which reserved field, as FORMAT.md names it: `"entry tail"`,
        /// `"entry reserved"`, `"slab header reserved"`, `"cache
        /// reserved"`, `"page reserved"`, `"page reserved2"` or `"extent
        /// reserved"`.
        field: &'static str,
        /// Always 0.
        expected: u64,
        /// The value found (the first non-zero byte for byte arrays).
        found: u64,
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
    /// Two sections of the same known kind.
    #[error("duplicate section {kind} at entry {offset:#x}: expected one, the first at entry {first:#x}")]
    DuplicateSection {
        /// Offset of the second entry.
        offset: u64,
        /// The repeated kind.
        kind: SectionKind,
        /// Offset of the first entry of that kind.
        first: u64,
    },
    /// A section kind this reader does not know, flagged as required.
    #[error("unknown required section kind {found:#x} at entry {offset:#x}")]
    UnknownRequiredSection {
        /// Offset of the entry.
        offset: u64,
        /// The kind found.
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
        /// Image length, the bound the section must end within.
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
    /// A section every image must have is absent.
    #[error("missing required section {kind} (table at {offset:#x})")]
    MissingSection {
        /// Offset of the section table.
        offset: u64,
        /// The missing kind.
        kind: SectionKind,
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
    /// A MEMMAP, SCRATCH, KFENCE or EXTENTS section whose length is not a
    /// whole number of records.
    #[error("section {kind} at {offset:#x} has bad length: expected a multiple of {expected:#x}, found {found:#x}")]
    SectionLength {
        /// Offset of the section.
        offset: u64,
        /// The section's kind.
        kind: SectionKind,
        /// The record size the length must be a multiple of.
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
    #[error("block at {offset:#x} (order {order}, base {base:#x}): expected at least {expected} bit set, found {found}")]
    EmptyBlock {
        /// Offset of the block.
        offset: u64,
        /// Its order.
        order: u8,
        /// Its base.
        base: u64,
        /// Always 1: the fewest bits a block may have set.
        expected: u32,
        /// Always 0: the bits set.
        found: u32,
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
    /// A SCRATCH or KFENCE range of length 0.
    #[error("{kind} range at {offset:#x} is empty: expected a length >= {expected:#x}, found {found:#x}")]
    RangeEmpty {
        /// Offset of the record's `len` field.
        offset: u64,
        /// The section.
        kind: SectionKind,
        /// The shortest range, one page.
        expected: u64,
        /// Always 0: the length found.
        found: u64,
    },
    /// A SCRATCH or KFENCE range whose start or length is not a page
    /// multiple.
    #[error("{kind} range {field} at {offset:#x}: expected a multiple of {expected:#x}, found {found:#x}")]
    RangeUnaligned {
        /// Offset of the field.
        offset: u64,
        /// The section.
        kind: SectionKind,
        /// `"start"` or `"len"`.
        field: &'static str,
        /// The page size.
        expected: u64,
        /// The value found.
        found: u64,
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
    /// A SLAB section shorter than its 16-byte header.
    #[error("SLAB section at {offset:#x} is too short: expected at least {expected:#x} bytes, found {found:#x}")]
    SlabTooShort {
        /// Offset of the section.
        offset: u64,
        /// The header size.
        expected: u64,
        /// The section length found.
        found: u64,
    },
    /// A SLAB section whose length differs from what its header's counts
    /// imply.
    #[error("SLAB section at {offset:#x}: its counts imply {expected:#x} bytes, found {found:#x}")]
    SlabLength {
        /// Offset of the section.
        offset: u64,
        /// `16 + 56 * caches + 40 * pages + 8 * words`.
        expected: u64,
        /// The section length found.
        found: u64,
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
    /// A slab cache alignment that is not a power of two.
    #[error("slab cache align at {offset:#x}: expected {expected}, found {found:#x}")]
    SlabCacheAlign {
        /// Offset of the `align` field.
        offset: u64,
        /// `"a power of two"`.
        expected: &'static str,
        /// The alignment found.
        found: u32,
    },
    /// A slab cache object size that is zero or not a multiple of the
    /// cache's alignment.
    #[error("slab cache object_size at {offset:#x}: expected a non-zero multiple of {expected:#x}, found {found:#x}")]
    SlabCacheObjectSize {
        /// Offset of the `object_size` field.
        offset: u64,
        /// The cache's alignment.
        expected: u32,
        /// The object size found.
        found: u32,
    },
    /// A slab cache order above the maximum.
    #[error("slab cache order at {offset:#x}: expected <= {expected}, found {found}")]
    SlabCacheOrder {
        /// Offset of the `order` field.
        offset: u64,
        /// The largest order.
        expected: u8,
        /// The order found.
        found: u8,
    },
    /// A slab cache whose slabs hold no object, or more objects than fit in
    /// a folio of its order.
    #[error("slab cache objects_per_slab at {offset:#x}: expected {expected_min} to {expected_max}, found {found}")]
    SlabCacheObjects {
        /// Offset of the `objects_per_slab` field.
        offset: u64,
        /// Always 1.
        expected_min: u64,
        /// Objects of `object_size` that fit in a folio of the cache's order.
        expected_max: u64,
        /// The count found.
        found: u32,
    },
    /// A slab cache name whose text is not UTF-8.
    #[error("slab cache name at {offset:#x}: expected {expected}, found byte {found:#04x}")]
    SlabCacheNameUtf8 {
        /// Offset of the first byte that is not valid UTF-8.
        offset: u64,
        /// `"UTF-8"`.
        expected: &'static str,
        /// That byte.
        found: u8,
    },
    /// A slab cache name with a non-zero byte after its first NUL.
    #[error(
        "slab cache name padding at {offset:#x}: expected {expected:#04x}, found {found:#04x}"
    )]
    SlabCacheNamePadding {
        /// Offset of the non-zero byte.
        offset: u64,
        /// Always 0.
        expected: u8,
        /// Its value.
        found: u8,
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
    /// A SLAB page record naming a cache id with no record.
    #[error("slab page cache_id at {offset:#x}: expected {expected}, found {found:#x}")]
    SlabUnknownCache {
        /// Offset of the `cache_id` field.
        offset: u64,
        /// `"the id of a cache record"`.
        expected: &'static str,
        /// The id found.
        found: u32,
    },
    /// A slab page whose order differs from its cache's.
    #[error(
        "slab page order at {offset:#x}: expected the cache's order {expected}, found {found}"
    )]
    SlabPageOrder {
        /// Offset of the `order` field.
        offset: u64,
        /// The cache's order.
        expected: u8,
        /// The order found.
        found: u8,
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
    /// A slab page whose object size differs from its cache's.
    #[error("slab page object_size at {offset:#x}: expected the cache's {expected:#x}, found {found:#x}")]
    SlabPageObjectSize {
        /// Offset of the `object_size` field.
        offset: u64,
        /// The cache's object size.
        expected: u32,
        /// The size found.
        found: u32,
    },
    /// A slab page whose object count differs from its cache's
    /// `objects_per_slab`.
    #[error(
        "slab page object_count at {offset:#x}: expected the cache's {expected}, found {found}"
    )]
    SlabPageObjectCount {
        /// Offset of the `object_count` field.
        offset: u64,
        /// The cache's `objects_per_slab`.
        expected: u32,
        /// The count found.
        found: u32,
    },
    /// A slab page whose first object is not aligned as its cache demands.
    #[error("slab page first_offset at {offset:#x}: expected a multiple of {expected:#x}, found {found:#x}")]
    SlabPageFirstOffset {
        /// Offset of the `first_offset` field.
        offset: u64,
        /// The cache's alignment.
        expected: u32,
        /// The offset found.
        found: u32,
    },
    /// A slab page whose objects run past the end of its folio.
    #[error("slab page at {offset:#x}: objects end at {found:#x}, expected <= the folio size {expected:#x}")]
    SlabPageOverflow {
        /// Offset of the `first_offset` field.
        offset: u64,
        /// Bytes in the folio.
        expected: u64,
        /// `first_offset + object_size * object_count`.
        found: u64,
    },
    /// A slab page whose `bitmap_words` is not `ceil(object_count / 64)`.
    #[error("slab page bitmap_words at {offset:#x}: expected {expected}, found {found}")]
    SlabPageBitmapWords {
        /// Offset of the `bitmap_words` field.
        offset: u64,
        /// `ceil(object_count / 64)`.
        expected: u32,
        /// The count found.
        found: u32,
    },
    /// A slab page whose bitmap does not follow the previous page's.
    #[error("slab page bitmap_index at {offset:#x}: expected {expected}, found {found}")]
    SlabPageBitmapIndex {
        /// Offset of the `bitmap_index` field.
        offset: u64,
        /// The end of the previous page's bitmap.
        expected: u64,
        /// The index found.
        found: u32,
    },
    /// A slab page whose bitmap runs past the section's bitmap words.
    #[error(
        "slab page bitmap at {offset:#x}: ends at word {found}, expected <= word_count {expected}"
    )]
    SlabBitmapOverrun {
        /// Offset of the page's `bitmap_words` field.
        offset: u64,
        /// The header's `word_count`.
        expected: u64,
        /// One past the page's last bitmap word.
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
    /// A SLAB header whose `word_count` is not the sum of the pages'
    /// bitmap words (spare words at the end).
    #[error(
        "SLAB word_count at {offset:#x}: expected {expected} (the pages' bitmaps), found {found}"
    )]
    SlabWordCount {
        /// Offset of the header's `word_count` field.
        offset: u64,
        /// Bitmap words the page records use.
        expected: u64,
        /// The count found.
        found: u64,
    },
    /// An EXTENTS record of length 0.
    #[error("extent len at {offset:#x}: expected >= {expected}, found {found}")]
    ExtentEmpty {
        /// Offset of the record's `len` field.
        offset: u64,
        /// Always 1.
        expected: u64,
        /// Always 0.
        found: u64,
    },
    /// An EXTENTS record whose end overflows 64 bits.
    #[error(
        "extent len at {offset:#x} (start {start:#x}): expected <= {expected:#x}, found {found:#x}"
    )]
    ExtentOverflow {
        /// Offset of the record's `len` field.
        offset: u64,
        /// The extent's start.
        start: u64,
        /// The longest length that does not overflow, `u64::MAX - start`.
        expected: u64,
        /// The length found.
        found: u64,
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

/// `kind()`, `offset()` and [`ParseError::KINDS`] from one list, so the list
/// cannot fall out of step with the enum: the matches are exhaustive inside
/// this crate, and a variant missing here fails to compile.
macro_rules! parse_error_kinds {
    ($($variant:ident => $name:literal,)*) => {
        impl ParseError {
            /// Every name [`kind`](Self::kind) returns, one per variant, in
            /// validation order.
            pub const KINDS: &'static [&'static str] = &[$($name),*];

            /// A stable, kebab-case name of the variant, for tools and
            /// fixtures.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(ParseError::$variant { .. } => $name,)*
                }
            }

            /// Byte offset in the image where the fault lies (at most the
            /// input's length). Every variant has one.
            pub fn offset(&self) -> Option<u64> {
                match self {
                    $(ParseError::$variant { offset, .. } => Some(*offset),)*
                }
            }
        }
    };
}

parse_error_kinds! {
    HeaderTruncated => "header-truncated",
    BadMagic => "bad-magic",
    HeaderSize => "header-size",
    UnsupportedMajor => "unsupported-major",
    HeaderCrc => "header-crc",
    HeaderTail => "header-tail",
    PageShift => "page-shift",
    HeaderFlags => "header-flags",
    ArenaSize => "arena-size",
    Truncated => "truncated",
    ImageLength => "image-length",
    EntrySize => "entry-size",
    TableBounds => "table-bounds",
    TableCrc => "table-crc",
    Padding => "padding",
    Reserved => "reserved",
    SectionFlags => "section-flags",
    DuplicateSection => "duplicate-section",
    UnknownRequiredSection => "unknown-required-section",
    SectionBounds => "section-bounds",
    SectionOverlap => "section-overlap",
    MissingSection => "missing-section",
    SectionCrc => "section-crc",
    SectionLength => "section-length",
    BlockOrder => "block-order",
    BlockMisaligned => "block-misaligned",
    BlockUnsorted => "block-unsorted",
    EmptyBlock => "empty-block",
    FolioOutOfArena => "folio-out-of-arena",
    FolioOverlap => "folio-overlap",
    RangeEmpty => "range-empty",
    RangeUnaligned => "range-unaligned",
    RangeUnsorted => "range-unsorted",
    RangeOutOfArena => "range-out-of-arena",
    KfenceInScratch => "kfence-in-scratch",
    PreservedInRange => "preserved-in-range",
    SlabTooShort => "slab-too-short",
    SlabLength => "slab-length",
    SlabCacheUnsorted => "slab-cache-unsorted",
    SlabCacheAlign => "slab-cache-align",
    SlabCacheObjectSize => "slab-cache-object-size",
    SlabCacheOrder => "slab-cache-order",
    SlabCacheObjects => "slab-cache-objects",
    SlabCacheNameUtf8 => "slab-cache-name-utf8",
    SlabCacheNamePadding => "slab-cache-name-padding",
    SlabPageUnsorted => "slab-page-unsorted",
    SlabUnknownCache => "slab-unknown-cache",
    SlabPageOrder => "slab-page-order",
    SlabPageNotPreserved => "slab-page-not-preserved",
    SlabPageObjectSize => "slab-page-object-size",
    SlabPageObjectCount => "slab-page-object-count",
    SlabPageFirstOffset => "slab-page-first-offset",
    SlabPageOverflow => "slab-page-overflow",
    SlabPageBitmapWords => "slab-page-bitmap-words",
    SlabPageBitmapIndex => "slab-page-bitmap-index",
    SlabBitmapOverrun => "slab-bitmap-overrun",
    SlabBitmapTail => "slab-bitmap-tail",
    SlabWordCount => "slab-word-count",
    ExtentEmpty => "extent-empty",
    ExtentOverflow => "extent-overflow",
    ExtentUnsorted => "extent-unsorted",
    ExtentNotPreserved => "extent-not-preserved",
    Tree => "tree",
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
