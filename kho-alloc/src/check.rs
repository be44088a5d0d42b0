//! The checker behind `kho check`: verifies a handover before a successor
//! trusts it.
//!
//! Pure logic over bytes: the caller maps an arena file (or reads a bare
//! image) and passes the slice; nothing here maps, allocates in proportion
//! to a count the input claims, or panics. Parsing is
//! [`Image::parse`]'s job and anything it rejects is a [`CheckError`]; what
//! parses but is still wrong is a [`Finding`] with a stable code from
//! [`CODES`].
//!
//! Checks, in the order they run:
//!
//! 1. superblock slots (`KHO-B…`): a bad slot, slots that disagree, an
//!    image whose bytes no longer match the slot's CRC;
//! 2. image placement (`KHO-I…`): the image must lie in one folio its
//!    own MEMMAP preserves, headed at the image's first page, in general
//!    memory, and describe this arena;
//! 3. layout (`KHO-P…`, `KHO-K…`): preserved memory against the arena's
//!    own scratch and KFENCE regions; the image's SCRATCH section must
//!    equal the arena's scratch region and its KFENCE ranges must lie
//!    inside the arena's KFENCE region (the sampler's pool may use only
//!    part of it), so an image that lies about them is caught;
//! 4. stale data (`KHO-S…`): free slots and unused tails of preserved
//!    slab pages, bytes of preserved folios outside the declared extents,
//!    and the bytes of the image's own folio outside the image, must be
//!    zero;
//! 5. the metadata tree (`KHO-T…`): every `PhysRange` property must point
//!    into preserved memory inside the arena.
//!
//! Stale-data scope: slab pages and the image's own folio are always
//! checked. Other preserved folios are checked only when the image has an
//! EXTENTS section: a subsystem that declares no extents makes no claim
//! about which bytes are valid. Once any extent is declared, every byte of
//! such a folio outside every extent must be zero.
//!
//! A bare image (no arena, no memory contents) gets the checks that need
//! only the image; the others are listed in [`CheckReport::skipped`].
//!
//! ```
//! use kho_alloc::check::{check_image, CheckOptions};
//! use kho_core::ImageBuilder;
//!
//! let image = ImageBuilder::new(1 << 20).build()?;
//! let report = check_image(&image, &CheckOptions::default(), &mut |_, _| {})?;
//! assert!(report.findings.is_empty());
//! assert!(!report.skipped.is_empty()); // no memory contents to scan
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use core::fmt;

use kho_core::image::layout::{HEADER_SIZE, MAGIC};
use kho_core::{Folio, Image, ParseError, PfnRange, PhysAddr, PhysRange, PAGE_SHIFT, PAGE_SIZE};

use crate::error::SlotError;
use crate::layout::{Layout, Region, SUPERBLOCK_PAGES};
use crate::superblock::{select, ImageLocation, RawSuperblock, Superblock, ARENA_MAGIC};
use zerocopy::FromBytes as _;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Suspicious but a successor can still restore safely.
    Warning,
    /// A successor would lose data, expose stale data, or follow a bad
    /// pointer.
    Error,
}

impl Severity {
    /// Lower-case name: `"warning"` or `"error"`.
    pub const fn name(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One entry of the stable table of finding codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// The code, e.g. `"KHO-S001"`.
    pub code: &'static str,
    /// Its severity.
    pub severity: Severity,
    /// A short title.
    pub title: &'static str,
}

const fn code(code: &'static str, severity: Severity, title: &'static str) -> Code {
    Code {
        code,
        severity,
        title,
    }
}

/// Every finding code, stable across releases (codes are never reused).
pub const CODES: &[Code] = &[
    code(
        "KHO-S001",
        Severity::Error,
        "stale bytes in free slots of preserved slab pages",
    ),
    code(
        "KHO-S002",
        Severity::Error,
        "stale bytes in the unused tail of preserved slab pages",
    ),
    code(
        "KHO-S003",
        Severity::Error,
        "stale bytes in preserved folios outside declared extents",
    ),
    code(
        "KHO-S004",
        Severity::Error,
        "stale bytes in the image's preserved folio outside the image",
    ),
    code(
        "KHO-P001",
        Severity::Error,
        "preserved memory overlaps the arena's scratch region",
    ),
    code(
        "KHO-P002",
        Severity::Warning,
        "image SCRATCH ranges differ from the arena's scratch region",
    ),
    code("KHO-K001", Severity::Error, "KFENCE pool overlaps scratch"),
    code(
        "KHO-K002",
        Severity::Error,
        "KFENCE pool overlaps preserved memory",
    ),
    code(
        "KHO-K003",
        Severity::Error,
        "preserved slab objects inside the KFENCE pool",
    ),
    code(
        "KHO-K004",
        Severity::Warning,
        "image KFENCE ranges outside the arena's KFENCE region",
    ),
    code(
        "KHO-T001",
        Severity::Error,
        "metadata PhysRange points at memory that is not preserved",
    ),
    code(
        "KHO-T002",
        Severity::Error,
        "metadata PhysRange points outside the arena",
    ),
    code(
        "KHO-I001",
        Severity::Error,
        "image not inside preserved memory",
    ),
    code(
        "KHO-I002",
        Severity::Error,
        "image lies outside general memory",
    ),
    code(
        "KHO-I003",
        Severity::Error,
        "image describes a different arena",
    ),
    code("KHO-B001", Severity::Warning, "one superblock slot is bad"),
    code(
        "KHO-B002",
        Severity::Error,
        "both superblock slots carry the same generation",
    ),
    code(
        "KHO-B003",
        Severity::Error,
        "image bytes do not match the superblock CRC",
    ),
];

/// The table entry of `code`.
pub fn code_info(code: &str) -> Option<&'static Code> {
    CODES.iter().find(|c| c.code == code)
}

fn severity_of(code: &str) -> Severity {
    code_info(code).map_or(Severity::Error, |c| c.severity)
}

/// Options of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckOptions {
    /// Attach a bounded sample of the stale bytes to stale-data findings
    /// (off by default: it is somebody's data).
    pub show_bytes: bool,
    /// How many first offsets a finding lists. Default 8.
    pub max_offsets: usize,
    /// Most bytes in a sample. Default 64.
    pub sample_len: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            show_bytes: false,
            max_offsets: 8,
            sample_len: 64,
        }
    }
}

/// Stale bytes shown with `show_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Arena address of `bytes[0]`: the 16-byte aligned address at or
    /// below the first stale byte, or the start of the scanned range when
    /// that is later (a sample never shows bytes outside the range).
    pub at: u64,
    /// At most [`CheckOptions::sample_len`] bytes.
    pub bytes: Vec<u8>,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Stable code from [`CODES`].
    pub code: &'static str,
    /// Its severity.
    pub severity: Severity,
    /// Arena bytes of the first occurrence.
    pub location: PhysRange,
    /// One-line explanation.
    pub message: String,
    /// Occurrences (slots, tails, folios, properties, ...).
    pub count: u64,
    /// Bytes involved: non-zero bytes for stale data, overlapping bytes
    /// for overlaps, the range length otherwise.
    pub bytes: u64,
    /// Arena addresses of the first occurrences (for stale data, of the
    /// first non-zero byte of each), at most
    /// [`CheckOptions::max_offsets`].
    pub offsets: Vec<u64>,
    /// A hexdump source, only with [`CheckOptions::show_bytes`].
    pub sample: Option<Sample>,
}

/// What was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// An arena file: superblocks, image and memory contents.
    Arena,
    /// A bare image: no memory contents.
    Image,
}

impl InputKind {
    /// `"arena"` or `"image"`.
    pub const fn name(self) -> &'static str {
        match self {
            InputKind::Arena => "arena",
            InputKind::Image => "image",
        }
    }
}

/// Counters of a check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Arena size in bytes (from the image header for a bare image).
    pub arena_size: u64,
    /// Preserved bytes.
    pub preserved_bytes: u64,
    /// Preserved folios.
    pub folios: u64,
    /// Preserved slab pages.
    pub slab_pages: u64,
    /// Extents declared.
    pub extents: u64,
    /// `PhysRange` properties in the metadata tree.
    pub tree_ranges: u64,
    /// Bytes of memory read by the stale-data checks.
    pub scanned_bytes: u64,
}

/// The result of a check that could read its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// What the input was.
    pub kind: InputKind,
    /// Current superblock slot and its generation (arenas only).
    pub slot: Option<(usize, u64)>,
    /// Where the image lies in the arena (arenas only).
    pub image: Option<ImageLocation>,
    /// Findings, in check order.
    pub findings: Vec<Finding>,
    /// Checks that could not run, and why.
    pub skipped: Vec<&'static str>,
    /// Counters.
    pub stats: CheckStats,
}

impl CheckReport {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Why the input could not be checked at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CheckError {
    /// The input has no bytes at all.
    #[error("empty file at offset 0x0: expected a kho image (magic {:02x?}) or arena (magic {:#018x}), found 0 bytes", MAGIC, ARENA_MAGIC)]
    Empty,
    /// Neither an image nor an arena.
    #[error("not a kho image or arena at offset {offset:#x}: expected image magic {expected_image:02x?} or arena magic {expected_arena:#018x}, found {:02x?}", &found[..usize::from(*found_len).min(8)])]
    Unrecognized {
        /// Always 0.
        offset: u64,
        /// The image magic.
        expected_image: [u8; 8],
        /// The arena magic.
        expected_arena: u64,
        /// The first bytes found (zero padded past `found_len`).
        found: [u8; 8],
        /// How many bytes of `found` the input holds (at most 8).
        found_len: u8,
    },
    /// An arena shorter than its two superblock pages, or than the arena
    /// size a valid superblock slot records.
    #[error("arena truncated at {offset:#x}: expected {expected:#x} bytes, found {found:#x}")]
    Truncated {
        /// Where the missing bytes start (the input length).
        offset: u64,
        /// Bytes needed.
        expected: u64,
        /// Bytes available.
        found: u64,
    },
    /// Both superblock slots are invalid.
    #[error("both superblock slots are bad: slot 0: {slot0}; slot 1: {slot1}")]
    NoSuperblock {
        /// Why slot 0 was rejected.
        slot0: SlotError,
        /// Why slot 1 was rejected.
        slot1: SlotError,
    },
    /// Both slots are valid but describe different arenas, so one of them
    /// lies; a successor refuses to open the arena.
    #[error("superblock slots disagree: {what}: expected {expected:#x}, found {found:#x}")]
    SlotsDisagree {
        /// Which quantity.
        what: &'static str,
        /// The older slot's value.
        expected: u64,
        /// The newer slot's value.
        found: u64,
    },
    /// Any other reason the slots cannot be used.
    #[error("superblock: {message}")]
    Superblock {
        /// What the arena code reported.
        message: String,
    },
    /// The current slot records no image.
    #[error("no handover image: superblock slot {slot} at {offset:#x} (generation {generation}) records none")]
    NoImage {
        /// Arena offset of the slot.
        offset: u64,
        /// The slot.
        slot: usize,
        /// Its generation.
        generation: u64,
    },
    /// The image does not parse.
    #[error("image at file offset {base:#x}: {source}")]
    Image {
        /// Arena offset of the image (0 for a bare image).
        base: u64,
        /// The parser's error; its offset is relative to `base`.
        source: ParseError,
    },
}

/// The two superblock slots of an arena, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slots {
    /// Slot 0 and slot 1.
    pub slots: [Result<Superblock, SlotError>; 2],
    /// Index of the current slot.
    pub current: usize,
    /// The current slot.
    pub superblock: Superblock,
}

/// Decode both superblock slots of the arena `bytes` and select the valid
/// one with the higher generation (slot 0 on a tie), as
/// [`Arena::open`](crate::Arena::open) does.
pub fn read_slots(bytes: &[u8]) -> Result<Slots, CheckError> {
    let len = bytes.len() as u64;
    let need = SUPERBLOCK_PAGES * PAGE_SIZE;
    if len < need {
        return Err(short_input(bytes, need));
    }
    let page = |i: u64| &bytes[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize];
    let s0 = Superblock::decode(page(0), 0, len);
    let s1 = Superblock::decode(page(1), PAGE_SIZE, len);
    let (current, superblock) = select(page(0), page(1), len).map_err(|e| match e {
        crate::Error::Foreign { .. } => unrecognized(bytes),
        crate::Error::BothSuperblocksBad { slot0, slot1 } => {
            // A slot that is valid for a larger arena means the file lost
            // its tail, which says more than two size mismatches.
            let recorded = [0, 1]
                .into_iter()
                .filter_map(|i| recorded_size(page(i), i * PAGE_SIZE))
                .filter(|&size| size > len)
                .max();
            match recorded {
                Some(size) => CheckError::Truncated {
                    offset: len,
                    expected: size,
                    found: len,
                },
                None => CheckError::NoSuperblock { slot0, slot1 },
            }
        }
        crate::Error::GeometryMismatch {
            what,
            expected,
            found,
        } => CheckError::SlotsDisagree {
            // The message already says the slots disagree.
            what: what
                .strip_prefix("superblock slots disagree on ")
                .unwrap_or(what),
            expected,
            found,
        },
        other => CheckError::Superblock {
            message: other.to_string(),
        },
    })?;
    Ok(Slots {
        slots: [s0, s1],
        current,
        superblock,
    })
}

/// The arena size a slot records, if the slot is valid for an arena of
/// that size.
fn recorded_size(page: &[u8], base: u64) -> Option<u64> {
    let (raw, _) = RawSuperblock::read_from_prefix(page).ok()?;
    let size = raw.arena_size.get();
    Superblock::decode(page, base, size).ok().map(|_| size)
}

/// Why an input shorter than the superblock pages is not an arena: empty,
/// a truncated arena or image (it starts like one), or neither.
fn short_input(bytes: &[u8], need: u64) -> CheckError {
    let len = bytes.len() as u64;
    let head = &bytes[..bytes.len().min(8)];
    if head.is_empty() {
        CheckError::Empty
    } else if ARENA_MAGIC.to_le_bytes().starts_with(head) {
        CheckError::Truncated {
            offset: len,
            expected: need,
            found: len,
        }
    } else if MAGIC.starts_with(head) {
        // Shorter than the image magic; with all of it the input is
        // checked as an image.
        CheckError::Image {
            base: 0,
            source: ParseError::Truncated {
                offset: 0,
                expected: HEADER_SIZE as u64,
                found: len,
            },
        }
    } else {
        unrecognized(bytes)
    }
}

fn unrecognized(bytes: &[u8]) -> CheckError {
    let mut found = [0u8; 8];
    let n = bytes.len().min(8);
    found[..n].copy_from_slice(&bytes[..n]);
    CheckError::Unrecognized {
        offset: 0,
        expected_image: MAGIC,
        expected_arena: ARENA_MAGIC,
        found,
        found_len: n as u8,
    }
}

/// An arena's current image, located through its superblocks.
#[derive(Debug)]
pub struct ArenaImage<'a> {
    /// The slots.
    pub slots: Slots,
    /// Where the image lies.
    pub location: ImageLocation,
    /// The image bytes.
    pub bytes: &'a [u8],
    /// The parsed image.
    pub image: Image<'a>,
}

/// Find and parse the current image of the arena `bytes`.
pub fn arena_image(bytes: &[u8]) -> Result<ArenaImage<'_>, CheckError> {
    let slots = read_slots(bytes)?;
    let sb = slots.superblock;
    let location = sb.image.ok_or(CheckError::NoImage {
        offset: slots.current as u64 * PAGE_SIZE,
        slot: slots.current,
        generation: sb.generation,
    })?;
    // `Superblock::decode` bounded the image by the arena size, which it
    // checked equals `bytes.len()`.
    let image_bytes = usize::try_from(location.offset)
        .ok()
        .zip(usize::try_from(location.offset.saturating_add(location.len)).ok())
        .and_then(|(s, e)| bytes.get(s..e))
        .ok_or(CheckError::Truncated {
            offset: location.offset,
            expected: location.offset.saturating_add(location.len),
            found: bytes.len() as u64,
        })?;
    let image = Image::parse(image_bytes).map_err(|source| CheckError::Image {
        base: location.offset,
        source,
    })?;
    Ok(ArenaImage {
        slots,
        location,
        bytes: image_bytes,
        image,
    })
}

/// Whether `bytes` start like a bare image (as opposed to an arena).
pub fn is_image(bytes: &[u8]) -> bool {
    bytes.get(..MAGIC.len()) == Some(&MAGIC[..])
}

/// Check `bytes` as a bare image if they start with the image magic, as
/// an arena otherwise.
pub fn check(
    bytes: &[u8],
    opts: &CheckOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport, CheckError> {
    if is_image(bytes) {
        check_image(bytes, opts, progress)
    } else {
        check_arena(bytes, opts, progress)
    }
}

/// Check a bare image: the image-only checks run, the others are listed as
/// skipped.
pub fn check_image(
    bytes: &[u8],
    opts: &CheckOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport, CheckError> {
    let image = Image::parse(bytes).map_err(|source| CheckError::Image { base: 0, source })?;
    let mut run = Run::new(&image, None, opts);
    run.folio_pass(progress);
    run.tree();
    let mut report = run.finish(InputKind::Image, None, None);
    report.skipped = vec![
        "superblock checks (KHO-B*): a bare image has no superblocks",
        "image placement checks (KHO-I*): a bare image has no arena",
        "arena layout checks (KHO-P*, KHO-K*) against the arena's regions: only the image's own ranges are compared",
        "stale-data checks (KHO-S*): a bare image has no memory contents",
    ];
    Ok(report)
}

/// Check an arena: superblocks, image placement, layout, stale data and
/// the metadata tree.
pub fn check_arena(
    bytes: &[u8],
    opts: &CheckOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport, CheckError> {
    let found = arena_image(bytes)?;
    let sb = found.slots.superblock;
    let mut findings = Vec::new();
    superblock_findings(&found, &mut findings);
    let arena = ArenaCtx {
        bytes,
        layout: sb.layout,
        image: found.location,
    };
    let mut run = Run::new(&found.image, Some(arena), opts);
    run.findings = findings;
    run.placement();
    run.layout_sections();
    run.folio_pass(progress);
    run.tree();
    Ok(run.finish(
        InputKind::Arena,
        Some((found.slots.current, sb.generation)),
        Some(found.location),
    ))
}

fn slot_range(slot: usize) -> PhysRange {
    PhysRange::new(PhysAddr(slot as u64 * PAGE_SIZE), PAGE_SIZE)
}

fn single(code: &'static str, location: PhysRange, message: String) -> Finding {
    Finding {
        code,
        severity: severity_of(code),
        location,
        message,
        count: 1,
        bytes: location.len,
        offsets: vec![location.start],
        sample: None,
    }
}

fn superblock_findings(found: &ArenaImage<'_>, out: &mut Vec<Finding>) {
    let slots = &found.slots;
    let cur = slots.current;
    let other = 1 - cur;
    match &slots.slots[other] {
        Err(e) => out.push(single(
            "KHO-B001",
            slot_range(other),
            format!(
                "superblock slot {other} is bad ({e}); slot {cur} (generation {}) is current",
                slots.superblock.generation
            ),
        )),
        Ok(o) => {
            let c = &slots.superblock;
            if o.generation == c.generation {
                out.push(single(
                    "KHO-B002",
                    slot_range(other),
                    format!(
                        "both superblock slots carry generation {}: which one is current is ambiguous",
                        c.generation
                    ),
                ));
            }
        }
    }
    let crc = crc32fast::hash(found.bytes);
    if crc != found.location.crc {
        out.push(single(
            "KHO-B003",
            PhysRange::new(PhysAddr(found.location.offset), found.location.len),
            format!(
                "image bytes have crc32 {crc:#010x}, superblock slot {cur} records {:#010x}",
                found.location.crc
            ),
        ));
    }
}

#[derive(Debug, Clone, Copy)]
struct ArenaCtx<'a> {
    bytes: &'a [u8],
    layout: Layout,
    image: ImageLocation,
}

/// Occurrences of one code, aggregated.
#[derive(Debug, Default)]
struct Agg {
    count: u64,
    bytes: u64,
    first: Option<PhysRange>,
    offsets: Vec<u64>,
    sample: Option<Sample>,
    units: u64,
}

impl Agg {
    fn hit(&mut self, range: PhysRange, bytes: u64, at: u64, max_offsets: usize) {
        self.count += 1;
        self.bytes += bytes;
        self.first.get_or_insert(range);
        if self.offsets.len() < max_offsets {
            self.offsets.push(at);
        }
    }
}

fn folio_range(f: Folio) -> PhysRange {
    PhysRange::new(f.addr(), f.bytes())
}

/// The bytes shared by two ranges, if any.
fn intersect(a: PhysRange, b: PhysRange) -> Option<PhysRange> {
    let start = a.start.max(b.start);
    let end = a
        .start
        .saturating_add(a.len)
        .min(b.start.saturating_add(b.len));
    (start < end).then(|| PhysRange::new(PhysAddr(start), end - start))
}

/// Index of the first non-zero byte. OR-folds 256-byte blocks (which the
/// compiler vectorises) and looks inside a block only when it is dirty.
#[inline]
pub fn first_nonzero(bytes: &[u8]) -> Option<usize> {
    const BLOCK: usize = 256;
    let mut blocks = bytes.chunks_exact(BLOCK);
    let mut base = 0;
    for b in &mut blocks {
        if b.iter().fold(0u8, |acc, &x| acc | x) != 0 {
            return b.iter().position(|&x| x != 0).map(|i| base + i);
        }
        base += BLOCK;
    }
    blocks
        .remainder()
        .iter()
        .position(|&x| x != 0)
        .map(|i| base + i)
}

struct Run<'i, 'a> {
    image: &'i Image<'a>,
    arena: Option<ArenaCtx<'a>>,
    opts: CheckOptions,
    findings: Vec<Finding>,
    stats: CheckStats,
    /// Coalesced preserved runs, in address order.
    runs: Vec<PfnRange>,
}

impl<'i, 'a> Run<'i, 'a> {
    fn new(image: &'i Image<'a>, arena: Option<ArenaCtx<'a>>, opts: &CheckOptions) -> Self {
        let stats = CheckStats {
            arena_size: arena.map_or(image.arena_size(), |a| a.layout.size()),
            preserved_bytes: image.preserved_bytes(),
            folios: image.folio_count(),
            slab_pages: image.slab_pages().len() as u64,
            extents: image.extents().len() as u64,
            ..CheckStats::default()
        };
        Run {
            image,
            arena,
            opts: *opts,
            findings: Vec::new(),
            stats,
            runs: image.ranges().collect(),
        }
    }

    fn finish(
        self,
        kind: InputKind,
        slot: Option<(usize, u64)>,
        image: Option<ImageLocation>,
    ) -> CheckReport {
        CheckReport {
            kind,
            slot,
            image,
            findings: self.findings,
            skipped: Vec::new(),
            stats: self.stats,
        }
    }

    /// The first byte of `range` that is not preserved, if any.
    fn first_unpreserved(&self, range: PhysRange) -> Option<u64> {
        let (first, end) = range.pfns()?;
        let i = self.runs.partition_point(|r| r.end <= first);
        match self.runs.get(i) {
            Some(r) if r.start <= first => (r.end < end).then_some(r.end.0 << PAGE_SHIFT),
            _ => Some(range.start),
        }
    }

    /// KHO-I001..I003.
    ///
    /// The image must lie inside preserved memory: in one folio of its own
    /// MEMMAP, headed at the image's first page and covering all of it (the
    /// folio a successor claims before anything else, and the only shape
    /// restore accepts). That folio must lie in general memory: scratch is
    /// where the successor allocates before it restores, the KFENCE pool is
    /// reused by the sampler, and the preservable pool and superblock pages
    /// are not image pages.
    fn placement(&mut self) {
        let Some(a) = self.arena else { return };
        let img = PhysRange::new(PhysAddr(a.image.offset), a.image.len);
        if let Some(at) = self.first_unpreserved(img) {
            self.findings.push(single(
                "KHO-I001",
                img,
                format!(
                    "image {img} is not inside preserved memory: the page at {at:#x} is in no folio of the image's MEMMAP, so a successor may reuse it before reading the image"
                ),
            ));
        } else if let Some(first) = PhysAddr(a.image.offset).aligned_pfn() {
            match self.image.is_preserved(first) {
                Some((head, order)) if head == first && order.bytes() >= img.len => {}
                Some((head, order)) => self.findings.push(single(
                    "KHO-I001",
                    img,
                    format!(
                        "image {img} is preserved, but not by one folio headed at its first page (the folio there is order {} at {:#x}); restore claims the image as one such folio",
                        order,
                        head.0 << PAGE_SHIFT
                    ),
                )),
                // Unreachable after first_unpreserved found every page
                // preserved; reported rather than assumed.
                None => self.findings.push(single(
                    "KHO-I001",
                    img,
                    format!("image {img} is not inside preserved memory: its first page is in no folio of the image's MEMMAP"),
                )),
            }
        } else {
            self.findings.push(single(
                "KHO-I001",
                img,
                format!(
                    "image {img} does not start on a page boundary, so no preserved folio is headed at it"
                ),
            ));
        }
        if let Some((first, end)) = img.pfns() {
            let general = a.layout.general;
            if first < general.start || end > general.end {
                let pfn = if first < general.start {
                    first
                } else {
                    general.end
                };
                let region = a
                    .layout
                    .region_of(pfn)
                    .map_or("outside the arena", Region::name);
                self.findings.push(single(
                    "KHO-I002",
                    img,
                    format!(
                        "image {img} lies partly in {region} memory (page {:#x}); only general memory may hold the image",
                        pfn.0
                    ),
                ));
            }
        }
        let size = self.image.arena_size();
        if size != a.layout.size() {
            self.findings.push(single(
                "KHO-I003",
                PhysRange::new(
                    PhysAddr(a.image.offset),
                    u64::from(self.image.header().header_size),
                ),
                format!(
                    "image header says the arena is {size:#x} bytes, the arena is {:#x}",
                    a.layout.size()
                ),
            ));
        }
    }

    /// KHO-P002, K001 and K004: the image's SCRATCH and KFENCE sections
    /// against the arena's regions. SCRATCH must be the arena's scratch
    /// region exactly; KFENCE ranges must lie inside the KFENCE region.
    fn layout_sections(&mut self) {
        let Some(a) = self.arena else { return };
        let scratch = a.layout.bytes_of(Region::Scratch);
        let kfence = a.layout.bytes_of(Region::Kfence);
        let img_scratch: Vec<PhysRange> = self.image.scratch().collect();
        let img_kfence: Vec<PhysRange> = self.image.kfence().collect();
        let expect = |r: PhysRange| if r.is_empty() { Vec::new() } else { vec![r] };
        let list = |v: &[PhysRange]| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        };
        if img_scratch != expect(scratch) {
            self.findings.push(single(
                "KHO-P002",
                scratch,
                format!(
                    "image SCRATCH section lists {}, the arena's scratch region is {scratch}",
                    list(&img_scratch)
                ),
            ));
        }
        // The sampler's pool may use only part of the region (2N+1 pages
        // of it), so the section must lie inside the region, not equal it.
        // The parser already made its ranges sorted and disjoint.
        let outside: Vec<PhysRange> = img_kfence
            .iter()
            .copied()
            .filter(|r| intersect(*r, kfence) != Some(*r))
            .collect();
        if let Some(first) = outside.first() {
            self.findings.push(Finding {
                count: outside.len() as u64,
                bytes: outside.iter().map(|r| r.len).sum(),
                offsets: outside
                    .iter()
                    .take(self.opts.max_offsets)
                    .map(|r| r.start)
                    .collect(),
                ..single(
                    "KHO-K004",
                    *first,
                    format!(
                        "image KFENCE section lists {} outside the arena's KFENCE region {kfence}",
                        list(&outside)
                    ),
                )
            });
        }
        let mut agg = Agg::default();
        for k in &img_kfence {
            if let Some(x) = intersect(*k, scratch) {
                agg.hit(x, x.len, x.start, self.opts.max_offsets);
            }
        }
        for s in &img_scratch {
            if let Some(x) = intersect(*s, kfence) {
                agg.hit(x, x.len, x.start, self.opts.max_offsets);
            }
        }
        self.push_agg("KHO-K001", agg, |n, b| {
            format!("{n} KFENCE pool range(s) overlap scratch ({b} bytes): sampled objects there are overwritten by the successor's bootstrap allocations")
        });
    }

    fn push_agg(&mut self, code: &'static str, agg: Agg, message: impl Fn(u64, u64) -> String) {
        let Some(first) = agg.first else { return };
        self.findings.push(Finding {
            code,
            severity: severity_of(code),
            location: first,
            message: message(agg.count, agg.bytes),
            count: agg.count,
            bytes: agg.bytes,
            offsets: agg.offsets,
            sample: agg.sample,
        });
    }

    /// One pass over the preserved folios in address order: P001, K002,
    /// K003 and the stale-data checks.
    fn folio_pass(&mut self, progress: &mut dyn FnMut(u64, u64)) {
        let mut scratch: Vec<PhysRange> = self.image.scratch().collect();
        let mut kfence: Vec<PhysRange> = self.image.kfence().collect();
        if let Some(a) = self.arena {
            scratch.push(a.layout.bytes_of(Region::Scratch));
            kfence.push(a.layout.bytes_of(Region::Kfence));
        }
        let extents: Vec<PhysRange> = self.image.extents().map(|e| e.range).collect();
        let check_extents = self.image.section(kho_core::SectionKind::Extents).is_some();
        let image_range = self
            .arena
            .map(|a| PhysRange::new(PhysAddr(a.image.offset), a.image.len));
        let max = self.opts.max_offsets;
        let (mut p001, mut k002, mut k003) = (Agg::default(), Agg::default(), Agg::default());
        let (mut s001, mut s002, mut s003) = (Agg::default(), Agg::default(), Agg::default());
        let mut s004 = Agg::default();
        let total = self.stats.preserved_bytes;
        let mut done = 0u64;
        let mut reported = 0u64;
        const STEP: u64 = 64 << 20;
        progress(0, total);
        let mut ei = 0usize;
        for f in self.image.folios() {
            let fr = folio_range(f);
            done += fr.len;
            if done - reported >= STEP {
                reported = done;
                progress(done, total);
            }
            let slab = self.image.slab_page(f.pfn);
            for s in &scratch {
                if let Some(x) = intersect(fr, *s) {
                    p001.hit(fr, x.len, x.start, max);
                    break;
                }
            }
            for k in &kfence {
                if let Some(x) = intersect(fr, *k) {
                    match &slab {
                        Some(p) if p.allocated_count() > 0 => k003.hit(fr, x.len, x.start, max),
                        _ => k002.hit(fr, x.len, x.start, max),
                    }
                    break;
                }
            }
            let Some(a) = self.arena else { continue };
            if let Some(img) = image_range.filter(|i| i.overlaps(fr)) {
                // The image's own folio: the bytes after (or before) the
                // image are preserved with it and must hold nothing.
                let img_end = img.start.saturating_add(img.len);
                let fr_end = fr.start + fr.len;
                for (lo, hi) in [(fr.start, img.start), (img_end, fr_end)] {
                    if lo < hi {
                        let part = PhysRange::new(PhysAddr(lo), hi - lo);
                        self.scan(a.bytes, part, &mut s004);
                    }
                }
                continue;
            }
            if let Some(p) = slab {
                self.scan_slab(a.bytes, fr, &p, &mut s001, &mut s002);
            } else if check_extents {
                while extents
                    .get(ei)
                    .is_some_and(|e| e.start.saturating_add(e.len) <= fr.start)
                {
                    ei += 1;
                }
                let mut at = fr.start;
                let end = fr.start + fr.len;
                let mut j = ei;
                while at < end {
                    let next = extents.get(j).filter(|e| e.start < end);
                    let gap_end = next.map_or(end, |e| e.start.max(at));
                    if gap_end > at {
                        let gap = PhysRange::new(PhysAddr(at), gap_end - at);
                        self.scan(a.bytes, gap, &mut s003);
                    }
                    match next {
                        Some(e) => {
                            at = e.start.saturating_add(e.len).max(at);
                            j += 1;
                        }
                        None => at = end,
                    }
                }
            }
        }
        progress(total, total);
        self.push_agg("KHO-P001", p001, |n, b| {
            format!("{n} preserved folio(s) overlap scratch ({b} bytes): the successor allocates there before it restores them")
        });
        self.push_agg("KHO-K002", k002, |n, b| {
            format!("{n} preserved folio(s) overlap the KFENCE pool ({b} bytes): the sampler reuses and guards those pages")
        });
        self.push_agg("KHO-K003", k003, |n, b| {
            format!("{n} preserved slab page(s) with live objects lie in the KFENCE pool ({b} bytes): preservable objects must never be sampled")
        });
        let units = s001.units;
        self.push_agg("KHO-S001", s001, |n, b| {
            format!("{b} non-zero byte(s) in {n} free slot(s) of {units} preserved slab page(s): stale data exposed to the successor")
        });
        self.push_agg("KHO-S002", s002, |n, b| {
            format!("{b} non-zero byte(s) in the unused tail of {n} preserved slab page(s)")
        });
        self.push_agg("KHO-S003", s003, |n, b| {
            format!("{b} non-zero byte(s) in {n} range(s) of preserved folios outside every declared extent")
        });
        self.push_agg("KHO-S004", s004, |n, b| {
            format!("{b} non-zero byte(s) in {n} range(s) of the image's preserved folio outside the image: stale data handed to the successor with it")
        });
    }

    /// Read `range` of the arena: `None` when all zero (or outside the
    /// arena), else the address of its first non-zero byte, the number of
    /// non-zero bytes, and a sample when asked for.
    fn probe(&mut self, arena: &[u8], range: PhysRange) -> Option<(u64, u64, Option<Sample>)> {
        let bytes = slice(arena, range)?;
        self.stats.scanned_bytes += range.len;
        let i = first_nonzero(bytes)?;
        let nonzero = bytes[i..].iter().filter(|&&b| b != 0).count() as u64;
        let sample = self.opts.show_bytes.then(|| {
            // From the 16-byte line of the arena that holds the first stale
            // byte, but never before the range: its neighbours are not
            // stale, and may be live data.
            let at = ((range.start + i as u64) & !15).max(range.start);
            let from = (at - range.start) as usize;
            let to = from.saturating_add(self.opts.sample_len).min(bytes.len());
            Sample {
                at,
                bytes: bytes[from..to].to_vec(),
            }
        });
        Some((range.start + i as u64, nonzero, sample))
    }

    /// Scan `range`; a dirty range is one occurrence. Returns whether it
    /// was dirty.
    fn scan(&mut self, arena: &[u8], range: PhysRange, agg: &mut Agg) -> bool {
        match self.probe(arena, range) {
            Some((at, nonzero, sample)) => {
                agg.hit(range, nonzero, at, self.opts.max_offsets);
                if agg.sample.is_none() {
                    agg.sample = sample;
                }
                true
            }
            None => false,
        }
    }

    fn scan_slab(
        &mut self,
        arena: &[u8],
        folio: PhysRange,
        page: &kho_core::SlabPageView<'_>,
        s001: &mut Agg,
        s002: &mut Agg,
    ) {
        let size = u64::from(page.object_size());
        let count = page.object_count();
        let first = u64::from(page.first_offset()).min(folio.len);
        let objects_end = first
            .saturating_add(size.saturating_mul(u64::from(count)))
            .min(folio.len);
        // Free slots: scan maximal runs of free objects at once; only a
        // dirty run is split to count its dirty slots.
        let mut page_dirty = false;
        let mut i = 0u32;
        while i < count {
            if page.is_allocated(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < count && !page.is_allocated(i) {
                i += 1;
            }
            let lo = first.saturating_add(u64::from(start).saturating_mul(size));
            let hi = first
                .saturating_add(u64::from(i).saturating_mul(size))
                .min(objects_end);
            if hi <= lo {
                continue;
            }
            let run = PhysRange::new(PhysAddr(folio.start + lo), hi - lo);
            let Some(bytes) = slice(arena, run) else {
                continue;
            };
            if first_nonzero(bytes).is_none() {
                self.stats.scanned_bytes += run.len;
                continue;
            }
            for slot in start..i {
                let lo = first + u64::from(slot) * size;
                let hi = (lo + size).min(objects_end);
                if hi > lo {
                    let r = PhysRange::new(PhysAddr(folio.start + lo), hi - lo);
                    page_dirty |= self.scan(arena, r, s001);
                }
            }
        }
        if page_dirty {
            s001.units += 1;
        }
        // The bytes before object 0 and after the last object: one
        // occurrence per page, whichever part is dirty.
        let head = PhysRange::new(PhysAddr(folio.start), first);
        let tail = PhysRange::new(PhysAddr(folio.start + objects_end), folio.len - objects_end);
        let mut hit: Option<(PhysRange, u64, u64, Option<Sample>)> = None;
        for part in [head, tail] {
            if part.is_empty() {
                continue;
            }
            if let Some((at, nonzero, sample)) = self.probe(arena, part) {
                match &mut hit {
                    Some(h) => h.2 += nonzero,
                    None => hit = Some((part, at, nonzero, sample)),
                }
            }
        }
        if let Some((part, at, nonzero, sample)) = hit {
            s002.hit(part, nonzero, at, self.opts.max_offsets);
            if s002.sample.is_none() {
                s002.sample = sample;
            }
        }
    }

    /// KHO-T001 and T002.
    fn tree(&mut self) {
        let Some(tree) = self.image.tree() else {
            return;
        };
        let limit = self.stats.arena_size.min(self.image.arena_size());
        let mut out = Vec::new();
        for (path, name, r) in tree.ranges() {
            self.stats.tree_ranges += 1;
            if r.is_empty() {
                continue;
            }
            let end = r.start.checked_add(r.len);
            if end.is_none_or(|e| e > limit) {
                out.push(single(
                    "KHO-T002",
                    r,
                    format!(
                        "{path} property {name:?} = {r} ends past the arena ({limit:#x} bytes)"
                    ),
                ));
            } else if let Some(at) = self.first_unpreserved(r) {
                out.push(single(
                    "KHO-T001",
                    r,
                    format!("{path} property {name:?} = {r}: byte {at:#x} is not preserved; the successor would follow a dangling reference"),
                ));
            }
        }
        self.findings.append(&mut out);
    }
}

/// `arena[range]`, or `None` when it is not inside.
fn slice(arena: &[u8], range: PhysRange) -> Option<&[u8]> {
    let s = usize::try_from(range.start).ok()?;
    let e = usize::try_from(range.start.checked_add(range.len)?).ok()?;
    arena.get(s..e)
}

/// CRC32 (IEEE) of `bytes`, as the superblock records for the image.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ArenaConfig;
    use kho_core::image::testing::RawImage;
    use kho_core::{
        Extent, ImageBuilder, Node, Order, Pfn, PreservedMap, SectionKind, SlabCacheInfo,
        SlabPageInfo, Tree, Value,
    };
    use zerocopy::IntoBytes;

    const SIZE: u64 = 1 << 20;

    /// An arena under construction, as plain bytes.
    struct T {
        layout: Layout,
        map: PreservedMap,
        slabs: Vec<SlabPageInfo>,
        extents: Vec<Extent>,
        tree: Option<Tree>,
        scratch: Option<Vec<PhysRange>>,
        kfence: Option<Vec<PhysRange>>,
        writes: Vec<(u64, Vec<u8>)>,
        image_at: u64,
        image_size: u64,
        /// Preserve the image's own folio (at `image_at`, of the least
        /// order covering the image) in the MEMMAP, as freeze does.
        image_folio: bool,
    }

    fn pa(pfn: Pfn) -> u64 {
        pfn.0 * PAGE_SIZE
    }

    impl T {
        /// One slab page (64-byte objects, 63 per page so there is a
        /// 64-byte tail, objects 0 and 2 live) in the preservable pool, and
        /// an order-1 general folio with a 100-byte extent.
        fn new() -> T {
            let layout = ArenaConfig::with_size(SIZE).layout().unwrap();
            let mut t = T {
                layout,
                map: PreservedMap::new(Pfn(layout.pages)),
                slabs: Vec::new(),
                extents: Vec::new(),
                tree: None,
                scratch: None,
                kfence: None,
                writes: Vec::new(),
                image_at: pa(layout.general.start) + 32 * PAGE_SIZE,
                image_size: SIZE,
                image_folio: true,
            };
            t.slab(layout.preservable.start, &[0, 2]);
            let g = layout.general.start;
            t.map.preserve(g, Order::new(1).unwrap()).unwrap();
            t.writes.push((pa(g), vec![0x11; 100]));
            t.extents.push(Extent {
                range: PhysRange::new(PhysAddr(pa(g)), 100),
                tag: 9,
            });
            t.tree = Some(Tree::new(
                Node::root("t-v1").with_range("obj", PhysRange::new(PhysAddr(pa(g)), 100)),
            ));
            t
        }

        fn slab(&mut self, pfn: Pfn, live: &[u32]) {
            self.map.preserve(pfn, Order::ZERO).unwrap();
            let mut bitmap = vec![0u64; 1];
            for &i in live {
                bitmap[0] |= 1 << i;
                self.writes
                    .push((pa(pfn) + u64::from(i) * 64, vec![0xee; 64]));
            }
            self.slabs.push(SlabPageInfo {
                pfn,
                cache_id: 0,
                order: Order::ZERO,
                object_size: 64,
                object_count: 63,
                first_offset: 0,
                bitmap,
            });
            self.slabs.sort_by_key(|p| p.pfn);
        }

        /// The image, with its own folio preserved when `image_folio`
        /// (grown until the folio covers the image it is listed in).
        fn image(&self) -> Vec<u8> {
            let mut image = self.image_with(&self.map);
            if !self.image_folio {
                return image;
            }
            let pfn = Pfn(self.image_at / PAGE_SIZE);
            loop {
                let order = Order::covering(image.len() as u64).unwrap();
                let mut map = self.map.clone();
                map.preserve(pfn, order).unwrap();
                image = self.image_with(&map);
                if image.len() as u64 <= order.bytes() {
                    return image;
                }
            }
        }

        fn image_with(&self, map: &PreservedMap) -> Vec<u8> {
            let mut b = ImageBuilder::new(self.image_size)
                .generation(2)
                .memmap(map)
                .scratch(
                    self.scratch
                        .clone()
                        .unwrap_or_else(|| vec![self.layout.bytes_of(Region::Scratch)]),
                )
                .kfence(
                    self.kfence
                        .clone()
                        .unwrap_or_else(|| vec![self.layout.bytes_of(Region::Kfence)]),
                )
                .slab(
                    vec![SlabCacheInfo {
                        id: 0,
                        name: "c".into(),
                        object_size: 64,
                        align: 8,
                        objects_per_slab: 63,
                        order: Order::ZERO,
                    }],
                    self.slabs.clone(),
                )
                .extents(self.extents.clone());
            if let Some(t) = &self.tree {
                b = b.tree(t);
            }
            b.build().unwrap()
        }

        fn bytes_with(&self, image: &[u8], crc: Option<u32>) -> Vec<u8> {
            let mut b = vec![0u8; SIZE as usize];
            for (at, w) in &self.writes {
                b[*at as usize..*at as usize + w.len()].copy_from_slice(w);
            }
            b[self.image_at as usize..self.image_at as usize + image.len()].copy_from_slice(image);
            let old = Superblock {
                layout: self.layout,
                generation: 1,
                image: None,
                flags: 0,
            };
            let cur = Superblock {
                generation: 2,
                image: Some(ImageLocation {
                    offset: self.image_at,
                    len: image.len() as u64,
                    crc: crc.unwrap_or_else(|| crc32(image)),
                }),
                ..old
            };
            b[..RAW].copy_from_slice(old.encode().as_bytes());
            b[4096..4096 + RAW].copy_from_slice(cur.encode().as_bytes());
            b
        }

        fn bytes(&self) -> Vec<u8> {
            self.bytes_with(&self.image(), None)
        }
    }

    const RAW: usize = crate::superblock::RAW_SIZE;

    fn run(bytes: &[u8]) -> CheckReport {
        check(bytes, &CheckOptions::default(), &mut |_, _| {}).unwrap()
    }

    fn codes(r: &CheckReport) -> Vec<&'static str> {
        r.findings.iter().map(|f| f.code).collect()
    }

    fn find<'r>(r: &'r CheckReport, code: &str) -> &'r Finding {
        r.findings.iter().find(|f| f.code == code).unwrap()
    }

    #[test]
    fn clean_arena_has_no_findings_and_scans_what_it_must() {
        let t = T::new();
        let mut calls = Vec::new();
        let r = check_arena(&t.bytes(), &CheckOptions::default(), &mut |d, n| {
            calls.push((d, n))
        })
        .unwrap();
        assert!(r.is_clean(), "{:?}", r.findings);
        assert!(r.skipped.is_empty());
        assert_eq!(r.kind, InputKind::Arena);
        assert_eq!(r.slot, Some((1, 2)));
        // 61 free slots + 64-byte tail of the slab page, the order-1
        // folio minus its 100-byte extent, and the image's own order-0
        // folio after the image.
        let image_len = t.image().len() as u64;
        assert_eq!(
            r.stats.scanned_bytes,
            61 * 64 + 64 + (8192 - 100) + (4096 - image_len)
        );
        assert_eq!(r.stats.folios, 3);
        assert_eq!(calls.last(), Some(&(4 * 4096, 4 * 4096)));
    }

    #[test]
    fn stale_free_slot_tail_and_extent() {
        let mut t = T::new();
        let slab = pa(t.layout.preservable.start);
        t.writes.push((slab + 64 + 10, vec![1, 2, 3])); // slot 1
        t.writes.push((slab + 5 * 64, vec![4])); // slot 5
        t.writes.push((slab + 63 * 64 + 7, vec![5])); // tail
        let g = pa(t.layout.general.start);
        t.writes.push((g + 4096 + 1, vec![6, 6])); // outside the extent
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-S001", "KHO-S002", "KHO-S003"]);
        let s1 = find(&r, "KHO-S001");
        assert_eq!((s1.count, s1.bytes), (2, 4));
        assert_eq!(s1.offsets, [slab + 64 + 10, slab + 5 * 64]);
        assert_eq!(s1.location, PhysRange::new(PhysAddr(slab + 64), 64));
        assert!(s1.sample.is_none(), "no bytes without show_bytes");
        let s2 = find(&r, "KHO-S002");
        assert_eq!(
            (s2.count, s2.bytes, s2.offsets.clone()),
            (1, 1, vec![slab + 63 * 64 + 7])
        );
        let s3 = find(&r, "KHO-S003");
        assert_eq!(
            (s3.count, s3.bytes, s3.offsets.clone()),
            (1, 2, vec![g + 4096 + 1])
        );
        assert_eq!(s3.location, PhysRange::new(PhysAddr(g + 100), 8192 - 100));

        let opts = CheckOptions {
            show_bytes: true,
            sample_len: 32,
            ..CheckOptions::default()
        };
        let r = check(&t.bytes(), &opts, &mut |_, _| {}).unwrap();
        let s = find(&r, "KHO-S001").sample.clone().unwrap();
        assert_eq!(s.at, slab + 64);
        assert_eq!(s.bytes.len(), 32);
        assert_eq!(&s.bytes[10..13], &[1, 2, 3]);
    }

    #[test]
    fn extents_absent_means_no_claim() {
        let mut t = T::new();
        t.extents.clear();
        t.writes
            .push((pa(t.layout.general.start) + 4096, vec![7; 10]));
        let r = run(&t.bytes());
        assert!(r.is_clean(), "{:?}", r.findings);
    }

    #[test]
    fn preserved_in_scratch_behind_a_lying_image() {
        let mut t = T::new();
        let s = t.layout.scratch;
        t.map.preserve(Pfn(s.end.0 - 1), Order::ZERO).unwrap();
        t.scratch = Some(vec![PhysRange::new(
            PhysAddr(pa(s.start)),
            (s.pages() - 1) * PAGE_SIZE,
        )]);
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-P002", "KHO-P001"]);
        assert_eq!(find(&r, "KHO-P001").offsets, [pa(Pfn(s.end.0 - 1))]);
    }

    #[test]
    fn kfence_findings() {
        // K001 + K004 (+ P002): the image's pool on the arena's scratch.
        let mut t = T::new();
        t.kfence = Some(vec![t.layout.bytes_of(Region::Scratch)]);
        t.scratch = Some(Vec::new());
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-P002", "KHO-K004", "KHO-K001"]);
        // K002: a plain folio in the arena's pool, which the image's
        // KFENCE section (the pool's pages, inside the region) leaves out.
        let mut t = T::new();
        let k = t.layout.kfence;
        t.map.preserve(k.start, Order::ZERO).unwrap();
        t.kfence = Some(vec![PhysRange::new(
            PhysAddr(pa(k.start) + PAGE_SIZE),
            (k.pages() - 1) * PAGE_SIZE,
        )]);
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-K002"]);
        assert_eq!(find(&r, "KHO-K002").offsets, [pa(k.start)]);
        // K003: a slab page with live objects there.
        let mut t = T::new();
        t.slab(k.start, &[1]);
        t.kfence = Some(vec![PhysRange::new(
            PhysAddr(pa(k.start) + PAGE_SIZE),
            (k.pages() - 1) * PAGE_SIZE,
        )]);
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-K003"]);
    }

    #[test]
    fn kfence_section_must_lie_inside_the_region() {
        let t0 = T::new();
        let k = t0.layout.bytes_of(Region::Kfence);
        let page = |i: u64| PhysRange::new(PhysAddr(k.start + i * PAGE_SIZE), PAGE_SIZE);
        // A pool of part of the region (as the sampler's 2N+1 pages are),
        // in pieces, or none at all: clean.
        for pool in [
            vec![PhysRange::new(PhysAddr(k.start), k.len - PAGE_SIZE)],
            vec![page(0), page(2)],
            Vec::new(),
        ] {
            let mut t = T::new();
            t.kfence = Some(pool.clone());
            let r = run(&t.bytes());
            assert!(r.is_clean(), "{pool:?}: {:?}", r.findings);
        }
        // A range reaching one page past the region, and one in general
        // memory: K004 for both, located at the first.
        let g = pa(t0.layout.general.start) + 8 * PAGE_SIZE;
        let mut t = T::new();
        // Without the slab page, so that the first preservable page (past
        // the region) is not preserved and the parser lets it be listed.
        t.slabs.clear();
        t.map = PreservedMap::new(Pfn(t.layout.pages));
        t.map
            .preserve(t.layout.general.start, Order::new(1).unwrap())
            .unwrap();
        let past = PhysRange::new(PhysAddr(k.start + PAGE_SIZE), k.len);
        let far = PhysRange::new(PhysAddr(g), PAGE_SIZE);
        t.kfence = Some(vec![past, far]);
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-K004"]);
        let f = find(&r, "KHO-K004");
        assert_eq!(f.location, past);
        assert_eq!((f.count, f.bytes), (2, k.len + PAGE_SIZE));
        assert_eq!(f.offsets, [past.start, g]);
        assert!(f.message.contains(&far.to_string()), "{}", f.message);
    }

    #[test]
    fn image_folio_outside_the_image_must_be_zero() {
        let mut t = T::new();
        let len = t.image().len() as u64;
        let at = t.image_at + len + 13;
        t.writes.push((at, vec![0x42; 3]));
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-S004"]);
        let f = find(&r, "KHO-S004");
        assert_eq!((f.count, f.bytes, f.offsets.clone()), (1, 3, vec![at]));
        assert_eq!(
            f.location,
            PhysRange::new(PhysAddr(t.image_at + len), PAGE_SIZE - len)
        );
        // The image bytes themselves are not stale data.
        let r = run(&T::new().bytes());
        assert!(r.is_clean(), "{:?}", r.findings);
        // An image starting one page into its (order-1) folio: the page
        // before it is checked too.
        let mut t = T::new();
        t.image_folio = false;
        let head = Pfn(t.image_at / PAGE_SIZE);
        t.map.preserve(head, Order::new(1).unwrap()).unwrap();
        t.image_at += PAGE_SIZE;
        t.writes.push((pa(head) + 5, vec![1]));
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-I001", "KHO-S004"]);
        assert_eq!(find(&r, "KHO-S004").offsets, [pa(head) + 5]);
    }

    #[test]
    fn samples_start_on_an_arena_line_inside_the_range() {
        let opts = CheckOptions {
            show_bytes: true,
            sample_len: 32,
            ..CheckOptions::default()
        };
        let g = pa(T::new().layout.general.start);
        // The gap after the 100-byte extent starts at g + 0x64, off a
        // 16-byte line. A stale byte at g + 0x1005: its line g + 0x1000.
        let mut t = T::new();
        t.writes.push((g + 0x1005, vec![9]));
        let r = check(&t.bytes(), &opts, &mut |_, _| {}).unwrap();
        let s = find(&r, "KHO-S003").sample.clone().unwrap();
        assert_eq!(s.at, g + 0x1000);
        assert_eq!(s.bytes.len(), 32);
        assert_eq!(s.bytes[5], 9);
        // A stale byte at g + 0x65: its line g + 0x60 starts inside the
        // extent, so the sample starts at the gap, g + 0x64.
        let mut t = T::new();
        t.writes.push((g + 0x65, vec![9]));
        let r = check(&t.bytes(), &opts, &mut |_, _| {}).unwrap();
        let s = find(&r, "KHO-S003").sample.clone().unwrap();
        assert_eq!(s.at, g + 0x64);
        assert_eq!(&s.bytes[..2], &[0, 9]);
    }

    #[test]
    fn wrong_arena_is_located_at_the_whole_header() {
        let mut t = T::new();
        t.image_size = 2 * SIZE;
        let mut raw = RawImage::from_image(&Image::parse(&t.image()).unwrap());
        raw.header_tail = vec![0; 16];
        let image = raw.to_bytes();
        let r = run(&t.bytes_with(&image, None));
        assert_eq!(codes(&r), ["KHO-I003"]);
        assert_eq!(
            find(&r, "KHO-I003").location,
            PhysRange::new(PhysAddr(t.image_at), 88)
        );
    }

    #[test]
    fn empty_short_and_truncated_inputs() {
        let opts = CheckOptions::default();
        let err = |b: &[u8]| check(b, &opts, &mut |_, _| {}).unwrap_err();
        assert_eq!(err(b""), CheckError::Empty);
        assert!(err(b"").to_string().starts_with("empty file"));
        // The start of an arena: its magic, then nothing.
        let good = T::new().bytes();
        let e = err(&good[..20]);
        assert_eq!(
            e,
            CheckError::Truncated {
                offset: 20,
                expected: 2 * PAGE_SIZE,
                found: 20
            }
        );
        assert_eq!(
            err(&good[..3]),
            CheckError::Truncated {
                offset: 3,
                expected: 2 * PAGE_SIZE,
                found: 3
            }
        );
        // Both slots intact, the arena's tail lost.
        let e = err(&good[..100_000]);
        assert_eq!(
            e,
            CheckError::Truncated {
                offset: 100_000,
                expected: SIZE,
                found: 100_000
            }
        );
        assert_eq!(
            e.to_string(),
            "arena truncated at 0x186a0: expected 0x100000 bytes, found 0x186a0"
        );
        // A file shorter than the image magic that starts like it.
        let e = err(&MAGIC[..5]);
        assert!(
            matches!(
                e,
                CheckError::Image {
                    base: 0,
                    source: ParseError::Truncated { found: 5, .. }
                }
            ),
            "{e}"
        );
        // Neither: only the bytes that are there are named.
        let e = err(b"short");
        assert!(
            matches!(e, CheckError::Unrecognized { found, found_len: 5, .. } if &found[..5] == b"short"),
            "{e}"
        );
        assert!(e.to_string().ends_with("found [73, 68, 6f, 72, 74]"), "{e}");
        // A file longer than the size its slots record is not truncated.
        let mut long = good.clone();
        long.extend_from_slice(&[0; 4096]);
        assert!(matches!(err(&long), CheckError::NoSuperblock { .. }));
    }

    #[test]
    fn tree_ranges_dangling_and_outside() {
        let mut t = T::new();
        let g = pa(t.layout.general.start);
        if let Some(tree) = &mut t.tree {
            let root = tree.root_mut();
            // Straddles the end of the preserved folio.
            root.set_prop(
                "half",
                Value::Range(PhysRange::new(PhysAddr(g + 4096), 8192)),
            );
            root.set_prop("far", Value::Range(PhysRange::new(PhysAddr(SIZE - 16), 32)));
            root.set_prop("empty", Value::Range(PhysRange::new(PhysAddr(0), 0)));
        }
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-T001", "KHO-T002"]);
        assert!(find(&r, "KHO-T001")
            .message
            .contains(&format!("byte {:#x}", g + 8192)));
        assert_eq!(r.stats.tree_ranges, 4);
        // The same tree checks run on the bare image.
        let r = run(&t.image());
        assert_eq!(r.kind, InputKind::Image);
        assert_eq!(codes(&r), ["KHO-T001", "KHO-T002"]);
        assert_eq!(r.skipped.len(), 4);
        assert_eq!(r.stats.scanned_bytes, 0);
    }

    #[test]
    fn image_placement() {
        // I001: the image's pages are in no folio of its MEMMAP.
        let mut t = T::new();
        t.image_folio = false;
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-I001"]);
        assert!(find(&r, "KHO-I001")
            .message
            .contains(&format!("page at {:#x}", t.image_at)));
        // I001: preserved, but its first page is not a folio head (the
        // image starts one page into an order-2 folio).
        let mut t = T::new();
        t.image_folio = false;
        let head = Pfn(t.image_at / PAGE_SIZE);
        t.map.preserve(head, Order::new(2).unwrap()).unwrap();
        t.image_at += PAGE_SIZE;
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-I001"]);
        assert!(find(&r, "KHO-I001").message.contains("not by one folio"));
        // I001: only part of the image is preserved: an order-0 folio at
        // its head, the image being made longer than a page.
        let mut t = T::new();
        t.image_folio = false;
        if let Some(tree) = &mut t.tree {
            tree.root_mut()
                .set_prop("blob", Value::Bytes(vec![0x5a; PAGE_SIZE as usize]));
        }
        t.map
            .preserve(Pfn(t.image_at / PAGE_SIZE), Order::ZERO)
            .unwrap();
        assert!(t.image().len() as u64 > PAGE_SIZE);
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-I001"]);
        assert!(find(&r, "KHO-I001")
            .message
            .contains(&format!("page at {:#x}", t.image_at + PAGE_SIZE)));
        // I002: the image (and its preserved folio) in the preservable
        // pool.
        let mut t = T::new();
        t.image_at = pa(t.layout.preservable.start) + 8 * PAGE_SIZE;
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-I002"]);
        assert!(find(&r, "KHO-I002").message.contains("preservable"));
        // I001 and I002: in scratch, where the image's own SCRATCH section
        // forbids preserving its folio.
        let mut t = T::new();
        t.image_at = pa(t.layout.scratch.start);
        t.image_folio = false;
        let r = run(&t.bytes());
        assert_eq!(codes(&r), ["KHO-I001", "KHO-I002"]);
        assert!(find(&r, "KHO-I002").message.contains("scratch"));
        // I003.
        let mut t = T::new();
        t.image_size = 2 * SIZE;
        assert_eq!(codes(&run(&t.bytes())), ["KHO-I003"]);
    }

    #[test]
    fn superblock_findings_and_errors() {
        let t = T::new();
        let good = t.bytes();
        // B001: the old slot is corrupt.
        let mut b = good.clone();
        b[0x7c] ^= 1;
        let r = run(&b);
        assert_eq!(codes(&r), ["KHO-B001"]);
        assert_eq!(
            r.findings[0].location,
            PhysRange::new(PhysAddr(0), PAGE_SIZE)
        );
        // B002: equal generations.
        let mut b = good.clone();
        let (s0, s1) = b.split_at_mut(4096);
        s0[..RAW].copy_from_slice(&s1[..RAW]);
        let r = run(&b);
        assert_eq!(codes(&r), ["KHO-B002"]);
        assert_eq!(r.slot, Some((0, 2)));
        // B003: wrong image CRC in the slot.
        let r = run(&t.bytes_with(&t.image(), Some(7)));
        assert_eq!(codes(&r), ["KHO-B003"]);
        // Both slots bad, not an arena, no image, image does not parse.
        let mut b = good.clone();
        b[0x7c] ^= 1;
        b[4096 + 0x7c] ^= 1;
        let opts = CheckOptions::default();
        let e = check(&b, &opts, &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, CheckError::NoSuperblock { .. }), "{e}");
        let e = check(&vec![0u8; 300_000], &opts, &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, CheckError::Unrecognized { .. }), "{e}");
        let mut b = good.clone();
        b[4096..8192].fill(0);
        let e = check(&b, &opts, &mut |_, _| {}).unwrap_err();
        assert!(matches!(e, CheckError::NoImage { slot: 0, .. }), "{e}");
        let mut raw = RawImage::from_image(&Image::parse(&t.image()).unwrap());
        raw.section_mut(SectionKind::Scratch).unwrap().crc = Some(1);
        let bad = raw.to_bytes();
        let e = check(&t.bytes_with(&bad, None), &opts, &mut |_, _| {}).unwrap_err();
        assert!(
            matches!(e, CheckError::Image { base, source: ParseError::SectionCrc { .. } } if base == t.image_at),
            "{e}"
        );
        assert!(check(&bad, &opts, &mut |_, _| {}).is_err());
    }

    #[test]
    fn no_panic_on_corrupted_arenas() {
        let good = T::new().bytes();
        let img = T::new().image_at as usize;
        let opts = CheckOptions {
            show_bytes: true,
            ..CheckOptions::default()
        };
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = good.clone();
            // Flip bytes in the slots, the image and the data pages.
            let at = match x % 3 {
                0 => (x >> 8) as usize % 8192,
                1 => img + (x >> 8) as usize % 2048,
                _ => (x >> 8) as usize % b.len(),
            };
            b[at] ^= (x >> 40) as u8 | 1;
            let _ = check(&b, &opts, &mut |_, _| {});
            let _ = check(&b[..at], &opts, &mut |_, _| {});
        }
    }

    #[test]
    fn first_nonzero_matches_naive() {
        for len in [0usize, 1, 255, 256, 257, 1000, 4096] {
            for pos in [0usize, 1, 200, 255, 256, 511, 999, 4095] {
                let mut v = vec![0u8; len];
                if pos < len {
                    v[pos] = 3;
                }
                assert_eq!(
                    first_nonzero(&v),
                    v.iter().position(|&b| b != 0),
                    "{len} {pos}"
                );
            }
        }
    }

    #[test]
    fn every_code_is_in_the_table_once() {
        for (i, c) in CODES.iter().enumerate() {
            assert!(
                c.code.starts_with("KHO-") && c.code.len() == 8,
                "{}",
                c.code
            );
            assert!(
                CODES[i + 1..].iter().all(|d| d.code != c.code),
                "{}",
                c.code
            );
        }
        assert_eq!(
            code_info("KHO-S001").map(|c| c.severity),
            Some(Severity::Error)
        );
        assert!(code_info("KHO-X999").is_none());
    }

    #[cfg(not(miri))]
    #[test]
    fn a_real_heap_handover_is_clean() {
        use crate::{GfpFlags, Heap};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        {
            let heap = Heap::new(
                crate::Arena::create_file(&path, &ArenaConfig::with_size(16 << 20)).unwrap(),
            )
            .unwrap();
            let cache = heap.cache("sessions", 64, 8).unwrap();
            let mut objs = Vec::new();
            for i in 0..10u8 {
                let mut o = cache.alloc(GfpFlags::ZERO).unwrap();
                heap.bytes_mut(&mut o).unwrap().fill(i | 0x80);
                objs.push(o);
            }
            // Freed objects leave their bytes behind; freeze scrubs them.
            for o in objs.drain(5..) {
                cache.free(o).unwrap();
            }
            let first = objs[0].range();
            let tree = Tree::new(Node::root("h-v1").with_range("first", first));
            heap.freeze_and_commit(Some(&tree)).unwrap();
            for o in objs {
                let _ = o.leak();
            }
        }
        let bytes = std::fs::read(&path).unwrap();
        let r = run(&bytes);
        assert!(r.is_clean(), "{:?}", r.findings);
        assert_eq!(r.stats.slab_pages, 1);
        assert_eq!(r.stats.tree_ranges, 1);
        assert!(r.stats.scanned_bytes > 0);
    }

    /// The sampler's pool is 2N+1 pages of the KFENCE region, and that is
    /// what freeze writes into the KFENCE section: such an image, with
    /// sampled objects live at freeze, checks clean.
    #[cfg(not(miri))]
    #[test]
    fn a_heap_handover_with_kfence_enabled_is_clean() {
        use crate::kfence::{PoolConfig, SampleMode};
        use crate::{GfpFlags, Heap};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        let (pool, region) = {
            let heap = Heap::new(
                crate::Arena::create_file(&path, &ArenaConfig::with_size(16 << 20)).unwrap(),
            )
            .unwrap();
            let sampler = heap
                .enable_kfence(SampleMode::Count(1), PoolConfig::default())
                .unwrap();
            let pool = sampler.pool().ranges();
            let region = heap.layout().bytes_of(Region::Kfence);
            // The pool full of sampled objects, one freed before freeze.
            let want = sampler.pool().capacity();
            assert!(want >= 2, "{want}");
            let (mut sampled, mut plain) = (Vec::new(), Vec::new());
            for i in 0..1000u32 {
                let mut o = heap.alloc(100, GfpFlags::NONE).unwrap();
                heap.bytes_mut(&mut o).unwrap().fill(i as u8 | 0x40);
                if heap.region_of(o.addr().pfn()) == Some(Region::Kfence) {
                    sampled.push(o);
                    if sampled.len() == want {
                        break;
                    }
                } else {
                    plain.push(o);
                }
            }
            assert_eq!(sampled.len(), want, "sampling with Count(1)");
            heap.free(sampled.pop().unwrap()).unwrap();
            let cache = heap.cache("sessions", 64, 8).unwrap();
            let mut o = cache.alloc(GfpFlags::ZERO).unwrap();
            heap.bytes_mut(&mut o).unwrap().fill(0x77);
            let tree = Tree::new(Node::root("h-v1").with_range("obj", o.range()));
            heap.freeze_and_commit(Some(&tree)).unwrap();
            let _ = o.leak();
            for o in sampled.into_iter().chain(plain) {
                let _ = o.leak();
            }
            (pool, region)
        };
        // The premise: the pool is a strict part of the region.
        assert_eq!(pool.len(), 1);
        assert!(pool[0].start >= region.start && pool[0].len < region.len);
        let bytes = std::fs::read(&path).unwrap();
        let image = arena_image(&bytes).unwrap();
        assert_eq!(image.image.kfence().collect::<Vec<_>>(), pool);
        let r = run(&bytes);
        assert!(r.is_clean(), "{:?}", r.findings);
        assert_eq!(r.stats.slab_pages, 1);
    }
}
