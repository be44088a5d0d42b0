//! One malformed image per rejection, built in code.

use std::collections::BTreeSet;

use kho_core::image::testing::{RawImage, RawSectionSpec};
use kho_core::{Image, ParseError, SectionKind};

use super::{parse_err, sample_image, sample_raw, ARENA};

type Edit = Box<dyn Fn(&mut RawImage)>;

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

/// Every case: its name, the edit, the expected `kind()`.
fn cases() -> Vec<(&'static str, Edit, &'static str)> {
    let page = 1u64 << 12;
    vec![
        (
            "bad magic",
            Box::new(|r: &mut RawImage| r.magic[1] = b'X'),
            "bad-magic",
        ),
        (
            "header size 64",
            Box::new(|r: &mut RawImage| r.header_size = Some(64)),
            "header-size",
        ),
        (
            "header size 76",
            Box::new(|r: &mut RawImage| r.header_size = Some(76)),
            "header-size",
        ),
        (
            "major 2",
            Box::new(|r: &mut RawImage| r.version_major = 2),
            "unsupported-major",
        ),
        (
            "header crc",
            Box::new(|r: &mut RawImage| r.header_crc = Some(0xdead_beef)),
            "header-crc",
        ),
        (
            "header tail",
            Box::new(|r: &mut RawImage| r.header_tail = vec![0, 0, 0, 1, 0, 0, 0, 0]),
            "header-tail",
        ),
        (
            "page shift 13",
            Box::new(|r: &mut RawImage| r.page_shift = 13),
            "page-shift",
        ),
        (
            "header flags",
            Box::new(|r: &mut RawImage| r.flags = 2),
            "header-flags",
        ),
        (
            "arena size",
            Box::new(|r: &mut RawImage| r.arena_size = ARENA + 1),
            "arena-size",
        ),
        (
            "image len below header",
            Box::new(|r: &mut RawImage| r.image_len = Some(8)),
            "image-length",
        ),
        (
            "image len unaligned",
            Box::new(|r: &mut RawImage| r.image_len = Some(0x104)),
            "image-length",
        ),
        (
            "image len past input",
            Box::new(|r: &mut RawImage| r.image_len = Some(1 << 20)),
            "truncated",
        ),
        (
            "entry size 24",
            Box::new(|r: &mut RawImage| r.entry_size = 24),
            "entry-size",
        ),
        (
            "table inside header",
            Box::new(|r: &mut RawImage| r.table_offset = Some(8)),
            "table-bounds",
        ),
        (
            "table too long",
            Box::new(|r: &mut RawImage| r.section_count = Some(1 << 30)),
            "table-bounds",
        ),
        (
            "table crc",
            Box::new(|r: &mut RawImage| r.table_crc = Some(1)),
            "table-crc",
        ),
        (
            "entry reserved",
            Box::new(|r: &mut RawImage| r.sections[0].reserved = 1),
            "reserved",
        ),
        (
            "entry tail",
            Box::new(|r: &mut RawImage| {
                r.entry_size = 40;
                r.entry_tail = vec![0, 0, 5, 0, 0, 0, 0, 0];
            }),
            "reserved",
        ),
        (
            "section flags",
            Box::new(|r: &mut RawImage| r.sections[0].flags = 3),
            "section-flags",
        ),
        (
            "section past image",
            Box::new(|r: &mut RawImage| r.sections[0].len = Some(1 << 40)),
            "section-bounds",
        ),
        (
            "section misaligned",
            Box::new(|r: &mut RawImage| r.sections[0].offset = Some(0x101)),
            "section-bounds",
        ),
        (
            "section in table",
            Box::new(|r: &mut RawImage| r.sections[1].offset = Some(72)),
            "section-overlap",
        ),
        (
            "duplicate memmap",
            Box::new(|r: &mut RawImage| {
                r.sections.push(RawSectionSpec::new(1, 1, Vec::new()));
            }),
            "duplicate-section",
        ),
        (
            "unknown required",
            Box::new(|r: &mut RawImage| {
                r.sections.push(RawSectionSpec::new(0x99, 1, vec![1, 2, 3]));
            }),
            "unknown-required-section",
        ),
        (
            "no memmap",
            Box::new(|r: &mut RawImage| r.sections.retain(|s| s.kind != 1)),
            "missing-section",
        ),
        (
            "padding",
            Box::new(|r: &mut RawImage| r.sections[1].gap = vec![0, 0, 0, 0, 0, 0, 0, 0x5a]),
            "padding",
        ),
        (
            "trailer",
            Box::new(|r: &mut RawImage| r.trailer = vec![1]),
            "padding",
        ),
        (
            "section crc",
            Box::new(|r: &mut RawImage| r.sections[2].crc = Some(0)),
            "section-crc",
        ),
        (
            "memmap length",
            Box::new(|r: &mut RawImage| {
                let s = sec(r, SectionKind::Memmap);
                s.payload.truncate(s.payload.len() - 8);
            }),
            "section-length",
        ),
        (
            "ranges length",
            Box::new(|r: &mut RawImage| {
                sec(r, SectionKind::Scratch).payload.extend([0; 8]);
            }),
            "section-length",
        ),
        (
            "slab counts",
            Box::new(|r: &mut RawImage| {
                sec(r, SectionKind::Slab).payload[0] = 9;
            }),
            "section-length",
        ),
        (
            "slab too short",
            payload(SectionKind::Slab, vec![0; 8]),
            "section-length",
        ),
        (
            "block order 19",
            memmap(&[RawImage::block(0, 19, &bits(&[0]))]),
            "block-order",
        ),
        (
            "block order field above 255",
            Box::new(|r: &mut RawImage| {
                sec(r, SectionKind::Memmap).payload[1] = 1;
            }),
            "block-order",
        ),
        (
            "block misaligned",
            memmap(&[RawImage::block(0x1000, 2, &bits(&[0x300]))]),
            "block-misaligned",
        ),
        (
            "block misaligned order 1",
            memmap(&[RawImage::block(4096, 1, &bits(&[0x300]))]),
            "block-misaligned",
        ),
        (
            "blocks unsorted",
            memmap(&[
                RawImage::block(4096, 0, &bits(&[0x300])),
                RawImage::block(0, 0, &bits(&[0x300])),
            ]),
            "block-unsorted",
        ),
        (
            "blocks duplicate",
            memmap(&[
                RawImage::block(0, 0, &bits(&[0x300])),
                RawImage::block(0, 0, &bits(&[0x301])),
            ]),
            "block-unsorted",
        ),
        (
            "blocks order descending",
            memmap(&[
                RawImage::block(0, 1, &bits(&[0x300])),
                RawImage::block(4096 * 4, 0, &bits(&[0x300])),
            ]),
            "block-unsorted",
        ),
        (
            "empty block",
            memmap(&[RawImage::block(0, 0, &[0; 64])]),
            "empty-block",
        ),
        (
            "folio past arena",
            memmap(&[RawImage::block(ARENA / page, 0, &bits(&[0]))]),
            "folio-out-of-arena",
        ),
        (
            "large folio past arena",
            memmap(&[RawImage::block(0, 18, &bits(&[0]))]),
            "folio-out-of-arena",
        ),
        (
            "base overflows",
            memmap(&[RawImage::block(!0xfff, 0, &bits(&[4095]))]),
            "folio-out-of-arena",
        ),
        (
            "overlap across orders",
            memmap(&[
                RawImage::block(0, 0, &bits(&[0x3ff])),
                RawImage::block(0, 9, &bits(&[1])),
            ]),
            "folio-overlap",
        ),
        (
            "range empty",
            payload(SectionKind::Scratch, RawImage::range(0, 0)),
            "range-invalid",
        ),
        (
            "range unaligned",
            payload(SectionKind::Kfence, RawImage::range(0x300_0800, 0x1000)),
            "range-invalid",
        ),
        (
            "ranges unsorted",
            payload(
                SectionKind::Scratch,
                cat(&[
                    RawImage::range(0x8_0000, 0x1000),
                    RawImage::range(0, 0x1000),
                ]),
            ),
            "range-unsorted",
        ),
        (
            "ranges overlap",
            payload(
                SectionKind::Scratch,
                cat(&[RawImage::range(0, 0x2000), RawImage::range(0x1000, 0x1000)]),
            ),
            "range-unsorted",
        ),
        (
            "range past arena",
            payload(SectionKind::Kfence, RawImage::range(ARENA - 0x1000, 0x2000)),
            "range-out-of-arena",
        ),
        (
            "range overflows",
            payload(SectionKind::Kfence, RawImage::range(!0xfff, 0x2000)),
            "range-out-of-arena",
        ),
        (
            "kfence in scratch",
            payload(SectionKind::Kfence, RawImage::range(0x8_0000, 0x1000)),
            "kfence-in-scratch",
        ),
        (
            "preserved in scratch",
            payload(SectionKind::Scratch, RawImage::range(0x20_0000, 0x1000)),
            "preserved-in-range",
        ),
        (
            "preserved in kfence",
            payload(SectionKind::Kfence, RawImage::range(0x1ff_f000, 0x2000)),
            "preserved-in-range",
        ),
        (
            "caches unsorted",
            slab(&[kv_cache(2), kv_cache(1)], &[], &[]),
            "slab-cache-unsorted",
        ),
        (
            "caches duplicate",
            slab(&[kv_cache(1), kv_cache(1)], &[], &[]),
            "slab-cache-unsorted",
        ),
        (
            "cache reserved",
            Box::new(|r: &mut RawImage| {
                sec(r, SectionKind::Slab).payload[16 + 18] = 1;
            }),
            "reserved",
        ),
        (
            "cache align",
            slab(&[RawImage::slab_cache(1, b"x", 64, 3, 64, 0)], &[], &[]),
            "slab-cache-field",
        ),
        (
            "cache size 0",
            slab(&[RawImage::slab_cache(1, b"x", 0, 8, 64, 0)], &[], &[]),
            "slab-cache-field",
        ),
        (
            "cache order",
            slab(&[RawImage::slab_cache(1, b"x", 64, 8, 64, 19)], &[], &[]),
            "slab-cache-field",
        ),
        (
            "cache overfull",
            slab(&[RawImage::slab_cache(1, b"x", 64, 8, 65, 0)], &[], &[]),
            "slab-cache-field",
        ),
        (
            "cache name utf8",
            slab(
                &[RawImage::slab_cache(1, &[0xff, 0xfe], 64, 8, 64, 0)],
                &[],
                &[],
            ),
            "slab-cache-field",
        ),
        (
            "cache name after nul",
            slab(&[RawImage::slab_cache(1, b"ab\0c", 64, 8, 64, 0)], &[], &[]),
            "slab-cache-field",
        ),
        (
            "page unknown cache",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 2, 64, 64, 0)], &[1]),
            "slab-unknown-cache",
        ),
        (
            "pages unsorted",
            slab(
                &[kv_cache(1)],
                &[kv_page(0x1000, 1, 64, 64, 0), kv_page(0x1000, 1, 64, 64, 1)],
                &[1, 1],
            ),
            "slab-page-unsorted",
        ),
        (
            "page not preserved",
            slab(&[kv_cache(1)], &[kv_page(0x1001, 1, 64, 64, 0)], &[1]),
            "slab-page-not-preserved",
        ),
        (
            "page not head",
            slab(&[kv_cache(1)], &[kv_page(0x201, 1, 64, 64, 0)], &[1]),
            "slab-page-not-preserved",
        ),
        (
            "page wrong order",
            slab(&[kv_cache(1)], &[kv_page(0x100, 1, 64, 64, 0)], &[1]),
            "slab-page-not-preserved",
        ),
        (
            "page object size",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 32, 64, 0)], &[1]),
            "slab-page-field",
        ),
        (
            "page no objects",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 0, 0)], &[]),
            "slab-page-field",
        ),
        (
            "page objects past folio",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 65, 0)], &[1, 0]),
            "slab-page-field",
        ),
        (
            "page bitmap index",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 64, 1)], &[1, 1]),
            "slab-page-field",
        ),
        (
            "page bitmap words",
            slab(
                &[kv_cache(1)],
                &[RawImage::slab_page(0x1000, 1, 0, 64, 64, 0, 2, 0)],
                &[1, 1],
            ),
            "slab-page-field",
        ),
        (
            "spare bitmap words",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 64, 0)], &[1, 1]),
            "slab-page-field",
        ),
        (
            "page reserved",
            Box::new(|r: &mut RawImage| {
                let off = 16 + 56 + 13;
                sec(r, SectionKind::Slab).payload[off] = 1;
            }),
            "reserved",
        ),
        (
            "bitmap tail",
            slab(&[kv_cache(1)], &[kv_page(0x1000, 1, 64, 10, 0)], &[1 << 10]),
            "slab-bitmap-tail",
        ),
        (
            "extent empty",
            payload(SectionKind::Extents, RawImage::extent(0x20_0000, 0, 1)),
            "extent-invalid",
        ),
        (
            "extent overflows",
            payload(SectionKind::Extents, RawImage::extent(!0, 2, 1)),
            "extent-invalid",
        ),
        (
            "extents unsorted",
            payload(
                SectionKind::Extents,
                cat(&[
                    RawImage::extent(0x20_1000, 0x10, 1),
                    RawImage::extent(0x20_0000, 0x10, 1),
                ]),
            ),
            "extent-unsorted",
        ),
        (
            "extents overlap",
            payload(
                SectionKind::Extents,
                cat(&[
                    RawImage::extent(0x20_0000, 0x20, 1),
                    RawImage::extent(0x20_0010, 0x10, 1),
                ]),
            ),
            "extent-unsorted",
        ),
        (
            "extent reserved",
            Box::new(|r: &mut RawImage| {
                sec(r, SectionKind::Extents).payload[21] = 1;
            }),
            "reserved",
        ),
        (
            "extent outside",
            payload(SectionKind::Extents, RawImage::extent(0x5000, 0x10, 1)),
            "extent-not-preserved",
        ),
        (
            "extent past folio end",
            payload(SectionKind::Extents, RawImage::extent(0x102_f00, 0x200, 1)),
            "extent-not-preserved",
        ),
        (
            "extent before folio",
            payload(SectionKind::Extents, RawImage::extent(0x1ff_f00, 0x200, 1)),
            "extent-not-preserved",
        ),
        (
            "tree garbage",
            payload(SectionKind::Tree, vec![0xff; 8]),
            "tree",
        ),
    ]
}

/// Every variant's `kind()`, to prove each one has a case.
const ALL_KINDS: &[&str] = &[
    "truncated",
    "bad-magic",
    "header-size",
    "unsupported-major",
    "header-crc",
    "header-tail",
    "page-shift",
    "header-flags",
    "arena-size",
    "image-length",
    "reserved",
    "entry-size",
    "table-bounds",
    "table-crc",
    "section-flags",
    "section-bounds",
    "section-overlap",
    "duplicate-section",
    "unknown-required-section",
    "missing-section",
    "padding",
    "section-crc",
    "section-length",
    "block-order",
    "block-misaligned",
    "block-unsorted",
    "empty-block",
    "folio-out-of-arena",
    "folio-overlap",
    "range-invalid",
    "range-unsorted",
    "range-out-of-arena",
    "kfence-in-scratch",
    "preserved-in-range",
    "slab-cache-unsorted",
    "slab-cache-field",
    "slab-unknown-cache",
    "slab-page-unsorted",
    "slab-page-not-preserved",
    "slab-page-field",
    "slab-bitmap-tail",
    "extent-invalid",
    "extent-unsorted",
    "extent-not-preserved",
    "tree",
];

#[test]
fn the_sample_is_valid() {
    let bytes = sample_raw().to_bytes();
    assert_eq!(
        bytes,
        sample_image(),
        "RawImage reassembles the writer's bytes"
    );
    Image::parse(&bytes).unwrap();
}

#[test]
fn every_rejection_has_a_case() {
    let mut seen = BTreeSet::new();
    for (name, edit, want) in cases() {
        let mut raw = sample_raw();
        edit(&mut raw);
        let bytes = raw.to_bytes();
        let err = parse_err(&bytes);
        assert_eq!(err.kind(), want, "{name}: {err}");
        let off = err.offset().unwrap();
        assert!(
            off <= bytes.len() as u64,
            "{name}: offset {off:#x} past the image"
        );
        // Display never panics and names the offset in hex.
        assert!(!err.to_string().is_empty());
        seen.insert(err.kind());
    }
    seen.insert(parse_err(&sample_image()[..40]).kind());
    let missing: Vec<_> = ALL_KINDS.iter().filter(|k| !seen.contains(*k)).collect();
    assert!(missing.is_empty(), "no case for {missing:?}");
}

#[test]
fn errors_carry_the_numbers() {
    let mut raw = sample_raw();
    raw.version_major = 3;
    assert_eq!(
        parse_err(&raw.to_bytes()),
        ParseError::UnsupportedMajor {
            offset: 12,
            expected: 1,
            found: 3
        }
    );

    let mut raw = sample_raw();
    raw.set_payload(
        SectionKind::Memmap,
        cat(&[
            RawImage::block(0, 0, &bits(&[0x3ff])),
            RawImage::block(0, 9, &bits(&[1])),
        ]),
    );
    let bytes = raw.to_bytes();
    let memmap = Image::parse(&sample_image())
        .unwrap()
        .section(SectionKind::Memmap)
        .unwrap()
        .offset;
    assert_eq!(
        parse_err(&bytes),
        ParseError::FolioOverlap {
            offset: memmap,
            pfn: 0x3ff,
            order: 0,
            other_pfn: 0x200,
            other_order: 9
        }
    );

    let mut raw = sample_raw();
    raw.set_payload(SectionKind::Scratch, RawImage::range(0x1f_f000, 0x3000));
    let scratch = raw.to_bytes();
    match parse_err(&scratch) {
        ParseError::PreservedInRange {
            kind, pfn, order, ..
        } => assert_eq!((kind, pfn, order), (SectionKind::Scratch, 0x200, 9)),
        e => panic!("{e}"),
    }
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
        assert_eq!(err.kind(), "truncated", "length {n}: {err}");
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
