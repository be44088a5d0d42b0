//! One malformed image per rejection, built in code, each with the exact
//! error it must produce.

use std::collections::BTreeSet;

use kho_core::image::layout::{MAGIC, SECTION_REQUIRED};
use kho_core::image::testing::{RawImage, RawSectionSpec};
use kho_core::tree::TreeError;
use kho_core::{Image, ParseError, SectionKind};

use super::{parse_err, sample_image, sample_raw, ARENA};

type Edit = Box<dyn Fn(&mut RawImage)>;
type Expect = Box<dyn Fn(&[u8]) -> ParseError>;

fn bits(set: &[usize]) -> [u64; 64] {
    let mut w = [0u64; 64];
    for &i in set {
        w[i / 64] |= 1 << (i % 64);
    }
    w
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

fn payload(kind: SectionKind, bytes: Vec<u8>) -> Edit {
    Box::new(move |r: &mut RawImage| {
        r.set_payload(kind, bytes.clone());
    })
}

fn memmap(blocks: &[Vec<u8>]) -> Edit {
    payload(SectionKind::Memmap, cat(blocks))
}

/// A SLAB payload from records; header counts follow the records given.
fn slab(caches: &[Vec<u8>], pages: &[Vec<u8>], words: &[u64]) -> Edit {
    let mut bytes =
        RawImage::slab_header(caches.len() as u32, pages.len() as u32, words.len() as u32);
    bytes.extend(cat(caches));
    bytes.extend(cat(pages));
    for w in words {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    payload(SectionKind::Slab, bytes)
}

fn kv_cache(id: u32) -> Vec<u8> {
    RawImage::slab_cache(id, b"kv-node", 64, 8, 64, 0)
}

fn kv_page(pfn: u64, cache: u32, size: u32, count: u32, index: u32) -> Vec<u8> {
    RawImage::slab_page(pfn, cache, 0, size, count, 0, count.div_ceil(64), index)
}

fn sec(r: &mut RawImage, kind: SectionKind) -> &mut RawSectionSpec {
    r.section_mut(kind).unwrap()
}

fn le(b: &[u8], at: u64, n: usize) -> u64 {
    let at = at as usize;
    let mut v = [0u8; 8];
    v[..n].copy_from_slice(&b[at..at + n]);
    u64::from_le_bytes(v)
}

/// The table entry of the first section of `kind`, read straight from the
/// bytes (the image need not be valid): `(entry offset, offset, len)`.
fn entry(b: &[u8], kind: SectionKind) -> (u64, u64, u64) {
    let (table, count, stride) = (le(b, 48, 8), le(b, 56, 4), le(b, 60, 4));
    (0..count)
        .map(|i| table + i * stride)
        .find(|&e| le(b, e, 4) == u64::from(kind.raw()))
        .map(|e| (e, le(b, e + 8, 8), le(b, e + 16, 8)))
        .unwrap_or_else(|| panic!("no {kind} entry"))
}

/// Offset of the section of `kind`.
fn at(b: &[u8], kind: SectionKind) -> u64 {
    entry(b, kind).1
}

/// Length of the section of `kind`.
fn len_of(b: &[u8], kind: SectionKind) -> u64 {
    entry(b, kind).2
}

fn crc_of(b: &[u8], off: u64, len: u64) -> u32 {
    crc32fast::hash(&b[off as usize..(off + len) as usize])
}

fn header_crc(b: &[u8]) -> u32 {
    let hs = le(b, 8, 4) as usize;
    let mut head = b[..hs].to_vec();
    head[68..72].fill(0);
    crc32fast::hash(&head)
}

fn len(b: &[u8]) -> u64 {
    b.len() as u64
}

/// Start of the SLAB cache records, page records and bitmap words, for
/// a SLAB section of `caches` caches and `pages` pages.
fn slab_parts(b: &[u8], caches: u64, pages: u64) -> (u64, u64, u64) {
    let c = at(b, SectionKind::Slab) + 16;
    (c, c + 56 * caches, c + 56 * caches + 40 * pages)
}

const TABLE: u64 = 72;
const PAGE: u64 = 4096;
const ENTRIES: u64 = 6;
use SectionKind::{Extents, Kfence, Memmap, Scratch, Slab};

fn case(
    name: &'static str,
    edit: impl Fn(&mut RawImage) + 'static,
    expect: impl Fn(&[u8]) -> ParseError + 'static,
) -> (&'static str, Edit, Expect) {
    (name, Box::new(edit), Box::new(expect))
}

fn case_with(
    name: &'static str,
    edit: Edit,
    expect: impl Fn(&[u8]) -> ParseError + 'static,
) -> (&'static str, Edit, Expect) {
    (name, edit, Box::new(expect))
}

/// Every case: its name, the edit, the exact error.
fn cases() -> Vec<(&'static str, Edit, Expect)> {
    use ParseError as E;
    let mut bad_magic = MAGIC;
    bad_magic[1] = b'X';
    let (c1, p1, w1) = (
        |b: &[u8]| slab_parts(b, 1, 1).0,
        |b: &[u8]| slab_parts(b, 1, 1).1,
        |b: &[u8]| slab_parts(b, 1, 1).2,
    );
    vec![
        case(
            "bad magic",
            |r| r.magic[1] = b'X',
            move |_| E::BadMagic {
                offset: 0,
                expected: MAGIC,
                found: bad_magic,
            },
        ),
        case(
            "header size 64",
            |r| r.header_size = Some(64),
            |b| E::HeaderSize {
                offset: 8,
                expected_min: 72,
                expected_max: len(b),
                found: 64,
            },
        ),
        case(
            "header size 76",
            |r| r.header_size = Some(76),
            |b| E::HeaderSize {
                offset: 8,
                expected_min: 72,
                expected_max: len(b),
                found: 76,
            },
        ),
        case(
            "header size past the input",
            |r| r.header_size = Some(1 << 20),
            |b| E::HeaderSize {
                offset: 8,
                expected_min: 72,
                expected_max: len(b),
                found: 1 << 20,
            },
        ),
        case(
            "major 2",
            |r| r.version_major = 2,
            |_| E::UnsupportedMajor {
                offset: 12,
                expected: 1,
                found: 2,
            },
        ),
        case(
            "header crc",
            |r| r.header_crc = Some(0xdead_beef),
            |b| E::HeaderCrc {
                offset: 68,
                expected: 0xdead_beef,
                found: header_crc(b),
            },
        ),
        case(
            "header tail",
            |r| r.header_tail = vec![0, 0, 0, 1, 0, 0, 0, 0],
            |_| E::HeaderTail {
                offset: 75,
                expected: 0,
                found: 1,
            },
        ),
        case(
            "page shift 13",
            |r| r.page_shift = 13,
            |_| E::PageShift {
                offset: 16,
                expected: 12,
                found: 13,
            },
        ),
        case(
            "header flags",
            |r| r.flags = 2,
            |_| E::HeaderFlags {
                offset: 20,
                expected: 0,
                found: 2,
            },
        ),
        case(
            "arena size",
            |r| r.arena_size = ARENA + 1,
            |_| E::ArenaSize {
                offset: 24,
                expected: 4096,
                found: ARENA + 1,
            },
        ),
        case(
            "image len past input",
            |r| r.image_len = Some(1 << 20),
            |b| E::Truncated {
                offset: len(b),
                expected: 1 << 20,
                found: len(b),
            },
        ),
        case(
            "image len below header",
            |r| r.image_len = Some(8),
            |b| E::ImageLength {
                offset: 32,
                expected_min: 72,
                expected_max: len(b),
                found: 8,
            },
        ),
        case(
            "image len unaligned",
            |r| r.image_len = Some(0x104),
            |b| E::ImageLength {
                offset: 32,
                expected_min: 72,
                expected_max: len(b),
                found: 0x104,
            },
        ),
        case(
            "entry size 24",
            |r| r.entry_size = 24,
            |_| E::EntrySize {
                offset: 60,
                expected: 32,
                found: 24,
            },
        ),
        case(
            "table inside header",
            |r| r.table_offset = Some(8),
            |b| E::TableBounds {
                offset: 48,
                expected_min: 72,
                expected_max: len(b),
                found: 8,
                len: ENTRIES * 32,
            },
        ),
        case(
            "table too long",
            |r| r.section_count = Some(1 << 30),
            |b| E::TableBounds {
                offset: 48,
                expected_min: 72,
                expected_max: len(b),
                found: TABLE,
                len: (1 << 30) * 32,
            },
        ),
        case(
            "table crc",
            |r| r.table_crc = Some(1),
            |b| E::TableCrc {
                offset: TABLE,
                expected: 1,
                found: crc_of(b, TABLE, ENTRIES * 32),
            },
        ),
        case(
            "padding before the table",
            |r| {
                r.header_size = Some(72);
                r.header_tail = vec![0, 0, 0, 0, 0, 0, 9, 0];
            },
            |_| E::Padding {
                offset: 78,
                gap: "before the section table",
                expected: 0,
                found: 9,
            },
        ),
        case(
            "entry tail",
            |r| {
                r.entry_size = 40;
                r.entry_tail = vec![0, 0, 5, 0, 0, 0, 0, 0];
            },
            |_| E::Reserved {
                offset: TABLE + 34,
                field: "entry tail",
                expected: 0,
                found: 5,
            },
        ),
        case(
            "entry reserved",
            |r| r.sections[0].reserved = 1,
            |_| E::Reserved {
                offset: TABLE + 28,
                field: "entry reserved",
                expected: 0,
                found: 1,
            },
        ),
        case(
            "section flags",
            |r| r.sections[0].flags = 3,
            |_| E::SectionFlags {
                offset: TABLE + 4,
                expected: SECTION_REQUIRED,
                found: 3,
            },
        ),
        case(
            "duplicate memmap",
            |r| r.sections.push(RawSectionSpec::new(1, 1, Vec::new())),
            |_| E::DuplicateSection {
                offset: TABLE + ENTRIES * 32,
                kind: Memmap,
                first: TABLE,
            },
        ),
        case(
            "unknown required",
            |r| r.sections.push(RawSectionSpec::new(0x99, 1, vec![1, 2, 3])),
            |_| E::UnknownRequiredSection {
                offset: TABLE + ENTRIES * 32,
                found: 0x99,
            },
        ),
        case(
            "section past image",
            |r| r.sections[0].len = Some(1 << 40),
            |b| E::SectionBounds {
                offset: TABLE,
                kind: Memmap,
                start: at(b, Memmap),
                len: 1 << 40,
                image_len: len(b),
            },
        ),
        case(
            "section misaligned",
            |r| r.sections[0].offset = Some(0x101),
            |b| E::SectionBounds {
                offset: TABLE,
                kind: Memmap,
                start: 0x101,
                len: len_of(b, Memmap),
                image_len: len(b),
            },
        ),
        case(
            "section in table",
            |r| r.sections[1].offset = Some(72),
            |b| E::SectionOverlap {
                offset: TABLE + 32,
                kind: Scratch,
                expected: at(b, Memmap) + len_of(b, Memmap),
                found: 72,
            },
        ),
        case(
            "padding between sections",
            |r| r.sections[1].gap = vec![0, 0, 0, 0, 0, 0, 0, 0x5a],
            |b| E::Padding {
                offset: at(b, Memmap) + len_of(b, Memmap) + 7,
                gap: "before a section",
                expected: 0,
                found: 0x5a,
            },
        ),
        case(
            "trailer",
            |r| r.trailer = vec![1],
            |b| E::Padding {
                offset: at(b, SectionKind::Tree) + len_of(b, SectionKind::Tree),
                gap: "after the last section",
                expected: 0,
                found: 1,
            },
        ),
        case(
            "no memmap",
            |r| r.sections.retain(|s| s.kind != 1),
            |_| E::MissingSection {
                offset: TABLE,
                kind: Memmap,
            },
        ),
        case(
            "section crc",
            |r| r.sections[2].crc = Some(0),
            |b| E::SectionCrc {
                offset: at(b, Kfence),
                kind: Kfence,
                expected: 0,
                found: crc_of(b, at(b, Kfence), len_of(b, Kfence)),
            },
        ),
        case(
            "memmap length",
            |r| {
                let s = sec(r, Memmap);
                s.payload.truncate(s.payload.len() - 8);
            },
            |b| E::SectionLength {
                offset: at(b, Memmap),
                kind: Memmap,
                expected: 520,
                found: 5 * 520 - 8,
            },
        ),
        case(
            "ranges length",
            |r| sec(r, Scratch).payload.extend([0; 8]),
            |b| E::SectionLength {
                offset: at(b, Scratch),
                kind: Scratch,
                expected: 16,
                found: 24,
            },
        ),
        case(
            "extents length",
            |r| sec(r, Extents).payload.extend([0; 8]),
            |b| E::SectionLength {
                offset: at(b, Extents),
                kind: Extents,
                expected: 24,
                found: 56,
            },
        ),
        case_with(
            "block order 19",
            memmap(&[RawImage::block(0, 19, &bits(&[0]))]),
            |b| E::BlockOrder {
                offset: at(b, Memmap),
                expected: 18,
                found: 19,
            },
        ),
        case(
            "block order field above 255",
            |r| sec(r, Memmap).payload[1] = 1,
            |b| E::BlockOrder {
                offset: at(b, Memmap),
                expected: 18,
                found: 0x100,
            },
        ),
        case_with(
            "block misaligned",
            memmap(&[RawImage::block(0x1000, 2, &bits(&[0x300]))]),
            |b| E::BlockMisaligned {
                offset: at(b, Memmap),
                expected: 0x4000,
                found: 0x1000,
            },
        ),
        case_with(
            "block misaligned order 1",
            memmap(&[RawImage::block(4096, 1, &bits(&[0x300]))]),
            |b| E::BlockMisaligned {
                offset: at(b, Memmap),
                expected: 0x2000,
                found: 0x1000,
            },
        ),
        case_with(
            "blocks unsorted",
            memmap(&[
                RawImage::block(4096, 0, &bits(&[0x300])),
                RawImage::block(0, 0, &bits(&[0x300])),
            ]),
            |b| E::BlockUnsorted {
                offset: at(b, Memmap) + 520,
                prev_order: 0,
                prev_base: 4096,
                order: 0,
                base: 0,
            },
        ),
        case_with(
            "blocks duplicate",
            memmap(&[
                RawImage::block(0, 0, &bits(&[0x300])),
                RawImage::block(0, 0, &bits(&[0x301])),
            ]),
            |b| E::BlockUnsorted {
                offset: at(b, Memmap) + 520,
                prev_order: 0,
                prev_base: 0,
                order: 0,
                base: 0,
            },
        ),
        case_with(
            "blocks order descending",
            memmap(&[
                RawImage::block(0, 1, &bits(&[0x300])),
                RawImage::block(4096 * 4, 0, &bits(&[0x300])),
            ]),
            |b| E::BlockUnsorted {
                offset: at(b, Memmap) + 520,
                prev_order: 1,
                prev_base: 0,
                order: 0,
                base: 0x4000,
            },
        ),
        case_with(
            "empty block",
            memmap(&[RawImage::block(0, 0, &[0; 64])]),
            |b| E::EmptyBlock {
                offset: at(b, Memmap),
                order: 0,
                base: 0,
                expected: 1,
                found: 0,
            },
        ),
        case_with(
            "folio past arena",
            memmap(&[RawImage::block(ARENA / PAGE, 0, &bits(&[0]))]),
            |b| E::FolioOutOfArena {
                offset: at(b, Memmap),
                pfn: ARENA / PAGE,
                order: 0,
                expected: ARENA / PAGE,
            },
        ),
        case_with(
            "large folio past arena",
            memmap(&[RawImage::block(0, 18, &bits(&[0]))]),
            |b| E::FolioOutOfArena {
                offset: at(b, Memmap),
                pfn: 0,
                order: 18,
                expected: ARENA / PAGE,
            },
        ),
        case_with(
            "base overflows",
            memmap(&[RawImage::block(!0xfff, 0, &bits(&[4095]))]),
            |b| E::FolioOutOfArena {
                offset: at(b, Memmap),
                pfn: u64::MAX,
                order: 0,
                expected: ARENA / PAGE,
            },
        ),
        case_with(
            "overlap across orders",
            memmap(&[
                RawImage::block(0, 0, &bits(&[0x3ff])),
                RawImage::block(0, 9, &bits(&[1])),
            ]),
            |b| E::FolioOverlap {
                offset: at(b, Memmap),
                pfn: 0x3ff,
                order: 0,
                other_pfn: 0x200,
                other_order: 9,
            },
        ),
        case_with(
            "range empty",
            payload(Scratch, RawImage::range(0, 0)),
            |b| E::RangeEmpty {
                offset: at(b, Scratch) + 8,
                kind: Scratch,
                expected: PAGE,
                found: 0,
            },
        ),
        case_with(
            "range start unaligned",
            payload(Kfence, RawImage::range(0x300_0800, 0x1000)),
            |b| E::RangeUnaligned {
                offset: at(b, Kfence),
                kind: Kfence,
                field: "start",
                expected: PAGE,
                found: 0x300_0800,
            },
        ),
        case_with(
            "range length unaligned",
            payload(Kfence, RawImage::range(0x300_0000, 0x1800)),
            |b| E::RangeUnaligned {
                offset: at(b, Kfence) + 8,
                kind: Kfence,
                field: "len",
                expected: PAGE,
                found: 0x1800,
            },
        ),
        case_with(
            "ranges unsorted",
            payload(
                Scratch,
                cat(&[
                    RawImage::range(0x8_0000, 0x1000),
                    RawImage::range(0, 0x1000),
                ]),
            ),
            |b| E::RangeUnsorted {
                offset: at(b, Scratch) + 16,
                kind: Scratch,
                expected: 0x8_1000,
                found: 0,
            },
        ),
        case_with(
            "ranges overlap",
            payload(
                Scratch,
                cat(&[RawImage::range(0, 0x2000), RawImage::range(0x1000, 0x1000)]),
            ),
            |b| E::RangeUnsorted {
                offset: at(b, Scratch) + 16,
                kind: Scratch,
                expected: 0x2000,
                found: 0x1000,
            },
        ),
        case_with(
            "range past arena",
            payload(Kfence, RawImage::range(ARENA - 0x1000, 0x2000)),
            |b| E::RangeOutOfArena {
                offset: at(b, Kfence),
                kind: Kfence,
                start: ARENA - 0x1000,
                len: 0x2000,
                expected: ARENA,
            },
        ),
        case_with(
            "range overflows",
            payload(Kfence, RawImage::range(!0xfff, 0x2000)),
            |b| E::RangeOutOfArena {
                offset: at(b, Kfence),
                kind: Kfence,
                start: !0xfff,
                len: 0x2000,
                expected: ARENA,
            },
        ),
        case_with(
            "kfence in scratch",
            payload(Kfence, RawImage::range(0x8_0000, 0x1000)),
            |b| E::KfenceInScratch {
                offset: at(b, Kfence),
                start: 0x8_0000,
                len: 0x1000,
                scratch_start: 0,
                scratch_len: 0x10_0000,
            },
        ),
        case_with(
            "preserved in scratch",
            payload(Scratch, RawImage::range(0x20_0000, 0x1000)),
            |b| E::PreservedInRange {
                offset: at(b, Scratch),
                kind: Scratch,
                start: 0x20_0000,
                len: 0x1000,
                pfn: 0x200,
                order: 9,
            },
        ),
        case_with(
            "preserved in kfence",
            payload(Kfence, RawImage::range(0x1ff_f000, 0x2000)),
            |b| E::PreservedInRange {
                offset: at(b, Kfence),
                kind: Kfence,
                start: 0x1ff_f000,
                len: 0x2000,
                pfn: 0x2000,
                order: 2,
            },
        ),
        case_with("slab too short", payload(Slab, vec![0; 8]), |b| {
            E::SlabTooShort {
                offset: at(b, Slab),
                expected: 16,
                found: 8,
            }
        }),
        case(
            "slab counts",
            |r| sec(r, Slab).payload[0] = 9,
            |b| E::SlabLength {
                offset: at(b, Slab),
                expected: 16 + 9 * 56 + 40 + 8,
                found: len_of(b, Slab),
            },
        ),
        case(
            "slab header reserved",
            |r| sec(r, Slab).payload[12] = 1,
            |b| E::Reserved {
                offset: at(b, Slab) + 12,
                field: "slab header reserved",
                expected: 0,
                found: 1,
            },
        ),
        case_with(
            "caches unsorted",
            slab(&[kv_cache(2), kv_cache(1)], &[], &[]),
            |b| E::SlabCacheUnsorted {
                offset: slab_parts(b, 2, 0).0 + 56,
                expected: 2,
                found: 1,
            },
        ),
        case_with(
            "caches duplicate",
            slab(&[kv_cache(1), kv_cache(1)], &[], &[]),
            |b| E::SlabCacheUnsorted {
                offset: slab_parts(b, 2, 0).0 + 56,
                expected: 1,
                found: 1,
            },
        ),
        case(
            "cache reserved",
            |r| sec(r, Slab).payload[16 + 18] = 1,
            move |b| E::Reserved {
                offset: c1(b) + 18,
                field: "cache reserved",
                expected: 0,
                found: 1,
            },
        ),
        case_with(
            "cache align",
            slab(&[RawImage::slab_cache(1, b"x", 64, 3, 64, 0)], &[], &[]),
            |b| E::SlabCacheAlign {
                offset: slab_parts(b, 1, 0).0 + 8,
                expected: "a power of two",
                found: 3,
            },
        ),
        case_with(
            "cache size 0",
            slab(&[RawImage::slab_cache(1, b"x", 0, 8, 64, 0)], &[], &[]),
            |b| E::SlabCacheObjectSize {
                offset: slab_parts(b, 1, 0).0 + 4,
                expected: 8,
                found: 0,
            },
        ),
        case_with(
            "cache size not a multiple of align",
            slab(&[RawImage::slab_cache(1, b"x", 60, 8, 64, 0)], &[], &[]),
            |b| E::SlabCacheObjectSize {
                offset: slab_parts(b, 1, 0).0 + 4,
                expected: 8,
                found: 60,
            },
        ),
        case_with(
            "cache order",
            slab(&[RawImage::slab_cache(1, b"x", 64, 8, 64, 19)], &[], &[]),
            |b| E::SlabCacheOrder {
                offset: slab_parts(b, 1, 0).0 + 16,
                expected: 18,
                found: 19,
            },
        ),
        case_with(
            "cache overfull",
            slab(&[RawImage::slab_cache(1, b"x", 64, 8, 65, 0)], &[], &[]),
            |b| E::SlabCacheObjects {
                offset: slab_parts(b, 1, 0).0 + 12,
                expected_min: 1,
                expected_max: 64,
                found: 65,
            },
        ),
        case_with(
            "cache without objects",
            slab(&[RawImage::slab_cache(1, b"x", 64, 8, 0, 1)], &[], &[]),
            |b| E::SlabCacheObjects {
                offset: slab_parts(b, 1, 0).0 + 12,
                expected_min: 1,
                expected_max: 128,
                found: 0,
            },
        ),
        case_with(
            "cache name utf8",
            slab(
                &[RawImage::slab_cache(1, b"a\xff\xfe", 64, 8, 64, 0)],
                &[],
                &[],
            ),
            |b| E::SlabCacheNameUtf8 {
                offset: slab_parts(b, 1, 0).0 + 24 + 1,
                expected: "UTF-8",
                found: 0xff,
            },
        ),
        case_with(
            "cache name after nul",
            slab(&[RawImage::slab_cache(1, b"ab\0c", 64, 8, 64, 0)], &[], &[]),
            |b| E::SlabCacheNamePadding {
                offset: slab_parts(b, 1, 0).0 + 24 + 3,
                expected: 0,
                found: b'c',
            },
        ),
        case_with(
            "pages unsorted",
            slab(
                &[kv_cache(1)],
                &[kv_page(0x1000, 1, 64, 64, 0), kv_page(0x1000, 1, 64, 64, 1)],
                &[1, 1],
            ),
            |b| E::SlabPageUnsorted {
                offset: slab_parts(b, 1, 2).1 + 40,
                expected: 0x1000,
                found: 0x1000,
            },
        ),
        case(
            "page reserved",
            |r| sec(r, Slab).payload[16 + 56 + 13] = 1,
            move |b| E::Reserved {
                offset: p1(b) + 13,
                field: "page reserved",
                expected: 0,
                found: 1,
            },
        ),
        case(
            "page reserved2",
            |r| sec(r, Slab).payload[16 + 56 + 37] = 1,
            move |b| E::Reserved {
                offset: p1(b) + 36,
                field: "page reserved2",
                expected: 0,
                found: 0x100,
            },
        ),
        case_with(
            "page unknown cache",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 2, 64, 64, 0)], &[1]),
            move |b| E::SlabUnknownCache {
                offset: p1(b) + 8,
                expected: "the id of a cache record",
                found: 2,
            },
        ),
        case_with(
            "page order above the maximum",
            slab(
                &[kv_cache(1)],
                &[RawImage::slab_page(0x1000, 1, 19, 64, 64, 0, 1, 0)],
                &[1],
            ),
            move |b| E::SlabPageOrder {
                offset: p1(b) + 12,
                expected: 0,
                found: 19,
            },
        ),
        case_with(
            "order-9 page of an order-0 cache",
            slab(
                &[kv_cache(1)],
                &[RawImage::slab_page(0x200, 1, 9, 64, 64, 0, 1, 0)],
                &[1],
            ),
            move |b| E::SlabPageOrder {
                offset: p1(b) + 12,
                expected: 0,
                found: 9,
            },
        ),
        case_with(
            "page not preserved",
            slab(&[kv_cache(1)], &[kv_page(0x1001, 1, 64, 64, 0)], &[1]),
            move |b| E::SlabPageNotPreserved {
                offset: p1(b),
                pfn: 0x1001,
                order: 0,
                found: None,
            },
        ),
        case_with(
            "page not head",
            slab(&[kv_cache(1)], &[kv_page(0x201, 1, 64, 64, 0)], &[1]),
            move |b| E::SlabPageNotPreserved {
                offset: p1(b),
                pfn: 0x201,
                order: 0,
                found: Some((0x200, 9)),
            },
        ),
        case_with(
            "page of a folio of another order",
            slab(&[kv_cache(1)], &[kv_page(0x100, 1, 64, 64, 0)], &[1]),
            move |b| E::SlabPageNotPreserved {
                offset: p1(b),
                pfn: 0x100,
                order: 0,
                found: Some((0x100, 1)),
            },
        ),
        case_with(
            "page object size",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 32, 64, 0)], &[1]),
            move |b| E::SlabPageObjectSize {
                offset: p1(b) + 16,
                expected: 64,
                found: 32,
            },
        ),
        case_with(
            "page without objects",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 0, 0)], &[]),
            move |b| E::SlabPageObjectCount {
                offset: p1(b) + 20,
                expected: 64,
                found: 0,
            },
        ),
        case_with(
            "page object count below the cache's",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 10, 0)], &[1]),
            move |b| E::SlabPageObjectCount {
                offset: p1(b) + 20,
                expected: 64,
                found: 10,
            },
        ),
        case_with(
            "page first object misaligned",
            slab(
                &[kv_cache(1)],
                &[RawImage::slab_page(0x1000, 1, 0, 64, 64, 4, 1, 0)],
                &[1],
            ),
            move |b| E::SlabPageFirstOffset {
                offset: p1(b) + 24,
                expected: 8,
                found: 4,
            },
        ),
        case_with(
            "page objects past folio",
            slab(
                &[kv_cache(1)],
                &[RawImage::slab_page(0x1000, 1, 0, 64, 64, 8, 1, 0)],
                &[1],
            ),
            move |b| E::SlabPageOverflow {
                offset: p1(b) + 24,
                expected: 4096,
                found: 4104,
            },
        ),
        case_with(
            "page bitmap words",
            slab(
                &[kv_cache(1)],
                &[RawImage::slab_page(0x1000, 1, 0, 64, 64, 0, 2, 0)],
                &[1, 1],
            ),
            move |b| E::SlabPageBitmapWords {
                offset: p1(b) + 28,
                expected: 1,
                found: 2,
            },
        ),
        case_with(
            "page bitmap index",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 64, 1)], &[1, 1]),
            move |b| E::SlabPageBitmapIndex {
                offset: p1(b) + 32,
                expected: 0,
                found: 1,
            },
        ),
        case_with(
            "bitmap past word_count",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 64, 0)], &[]),
            |b| E::SlabBitmapOverrun {
                offset: slab_parts(b, 1, 1).1 + 28,
                expected: 0,
                found: 1,
            },
        ),
        case_with(
            "bitmap tail",
            slab(
                &[RawImage::slab_cache(1, b"kv", 64, 8, 10, 0)],
                &[kv_page(0x1000, 1, 64, 10, 0)],
                &[1 << 10],
            ),
            move |b| E::SlabBitmapTail {
                offset: w1(b),
                expected: 10,
                found: 10,
            },
        ),
        case_with(
            "spare bitmap words",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 64, 0)], &[1, 1]),
            |b| E::SlabWordCount {
                offset: at(b, Slab) + 8,
                expected: 1,
                found: 2,
            },
        ),
        case_with(
            "extent empty",
            payload(Extents, RawImage::extent(0x20_0000, 0, 1)),
            |b| E::ExtentEmpty {
                offset: at(b, Extents) + 8,
                expected: 1,
                found: 0,
            },
        ),
        case_with(
            "extent overflows",
            payload(Extents, RawImage::extent(!0, 2, 1)),
            |b| E::ExtentOverflow {
                offset: at(b, Extents) + 8,
                start: !0,
                expected: 0,
                found: 2,
            },
        ),
        case_with(
            "extents unsorted",
            payload(
                Extents,
                cat(&[
                    RawImage::extent(0x20_1000, 0x10, 1),
                    RawImage::extent(0x20_0000, 0x10, 1),
                ]),
            ),
            |b| E::ExtentUnsorted {
                offset: at(b, Extents) + 24,
                expected: 0x20_1010,
                found: 0x20_0000,
            },
        ),
        case_with(
            "extents overlap",
            payload(
                Extents,
                cat(&[
                    RawImage::extent(0x20_0000, 0x20, 1),
                    RawImage::extent(0x20_0010, 0x10, 1),
                ]),
            ),
            |b| E::ExtentUnsorted {
                offset: at(b, Extents) + 24,
                expected: 0x20_0020,
                found: 0x20_0010,
            },
        ),
        case(
            "extent reserved",
            |r| sec(r, Extents).payload[21] = 1,
            |b| E::Reserved {
                offset: at(b, Extents) + 20,
                field: "extent reserved",
                expected: 0,
                found: 0x100,
            },
        ),
        case_with(
            "extent outside",
            payload(Extents, RawImage::extent(0x5000, 0x10, 1)),
            |b| E::ExtentNotPreserved {
                offset: at(b, Extents),
                start: 0x5000,
                len: 0x10,
                found: 0x5000,
            },
        ),
        case_with(
            "extent past folio end",
            payload(Extents, RawImage::extent(0x102_f00, 0x200, 1)),
            |b| E::ExtentNotPreserved {
                offset: at(b, Extents),
                start: 0x102_f00,
                len: 0x200,
                found: 0x103_000,
            },
        ),
        case_with(
            "extent before folio",
            payload(Extents, RawImage::extent(0x1ff_f00, 0x200, 1)),
            |b| E::ExtentNotPreserved {
                offset: at(b, Extents),
                start: 0x1ff_f00,
                len: 0x200,
                found: 0x1ff_f00,
            },
        ),
        case_with(
            "tree garbage",
            payload(SectionKind::Tree, vec![0xff; 8]),
            |b| E::Tree {
                offset: at(b, SectionKind::Tree),
                source: TreeError::UnsupportedVersion {
                    found: 0xff,
                    expected: 1,
                },
            },
        ),
    ]
}

#[test]
fn the_sample_is_valid() {
    let bytes = sample_raw().to_bytes();
    assert_eq!(
        bytes,
        sample_image(),
        "RawImage reassembles the writer's bytes"
    );
    let img = Image::parse(&bytes).unwrap();
    // The offsets the cases assume.
    assert_eq!(img.header().table_offset, TABLE);
    assert_eq!(u64::from(img.header().section_count), ENTRIES);
    assert_eq!(img.section(Memmap).unwrap().len, 5 * 520);
}

#[test]
fn every_rejection_is_exact() {
    let mut seen = BTreeSet::new();
    let mut wrong = Vec::new();
    for (name, edit, expect) in cases() {
        let mut raw = sample_raw();
        edit(&mut raw);
        let bytes = raw.to_bytes();
        let err = parse_err(&bytes);
        let want = expect(&bytes);
        if err != want {
            wrong.push(format!("{name}:\n   got {err:?}\n  want {want:?}"));
        }
        let off = err.offset().unwrap();
        assert!(
            off <= bytes.len() as u64,
            "{name}: offset {off:#x} past the image"
        );
        // Display names the offset in hex.
        if !err.to_string().contains(&format!("{off:#x}")) {
            wrong.push(format!("{name}: {err} does not name {off:#x}"));
        }
        seen.insert(err.kind());
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let short = &sample_image()[..40];
    let err = parse_err(short);
    assert_eq!(
        err,
        ParseError::HeaderTruncated {
            offset: 40,
            expected: 72,
            found: 40
        }
    );
    seen.insert(err.kind());
    let missing: Vec<_> = ParseError::KINDS
        .iter()
        .filter(|k| !seen.contains(*k))
        .collect();
    assert!(missing.is_empty(), "no case for {missing:?}");
}

#[test]
fn kinds_are_unique() {
    let set: BTreeSet<_> = ParseError::KINDS.iter().collect();
    assert_eq!(set.len(), ParseError::KINDS.len());
}

#[test]
fn forward_compatible_extensions_are_accepted() {
    // A newer writer's header with a zero tail.
    let mut raw = sample_raw();
    raw.header_tail = vec![0; 16];
    raw.version_minor = 3;
    let bytes = raw.to_bytes();
    let img = Image::parse(&bytes).unwrap();
    assert_eq!(img.header().header_size, 88);
    assert_eq!(img.header().version_minor, 3);

    // Wider table entries with a zero tail, and an unknown optional section.
    let mut raw = sample_raw();
    raw.entry_size = 48;
    raw.entry_tail = vec![0; 16];
    raw.sections
        .push(RawSectionSpec::new(0x4242, 0, vec![9; 13]));
    let bytes = raw.to_bytes();
    let img = Image::parse(&bytes).unwrap();
    let unknown = img.sections().last().unwrap();
    assert_eq!(unknown.kind, SectionKind::Unknown(0x4242));
    assert!(!unknown.is_required());
    assert_eq!(img.folio_count(), 12);

    // Zero padding between sections is fine.
    let mut raw = sample_raw();
    raw.sections[1].gap = vec![0; 24];
    Image::parse(&raw.to_bytes()).unwrap();
}

#[test]
fn every_truncation_fails_cleanly() {
    let bytes = sample_image();
    for n in 0..bytes.len() {
        let err = parse_err(&bytes[..n]);
        let want = if n < 72 {
            ParseError::HeaderTruncated {
                offset: n as u64,
                expected: 72,
                found: n as u64,
            }
        } else {
            ParseError::Truncated {
                offset: n as u64,
                expected: bytes.len() as u64,
                found: n as u64,
            }
        };
        assert_eq!(err, want, "length {n}");
    }
}

#[test]
fn empty_and_minimal_images() {
    let empty = RawImage::new(0).to_bytes();
    let img = Image::parse(&empty).unwrap();
    assert_eq!(img.folio_count(), 0);
    assert!(img.tree().is_none());
    assert_eq!(img.folios().count(), 0);
    assert!(Image::parse(&[]).is_err());
}
