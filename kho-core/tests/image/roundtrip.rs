//! Property tests: maps survive the image, mutations and probes.

use std::collections::BTreeMap;

use kho_core::image::testing::RawImage;
use kho_core::{
    BuildError, Extent, Image, ImageBuilder, Order, ParseError, Pfn, PhysAddr, PhysRange,
    PreservedMap, Restorer, SectionKind, SlabCacheInfo, SlabPageInfo,
};
use proptest::prelude::*;

use super::{o, sample_image};

const LIMIT: u64 = 1 << 16;

/// A request: preserve one folio, or a page range (dense, mixed orders).
#[derive(Debug, Clone)]
enum Req {
    Folio(u64, u8),
    Range(u64, u64),
}

fn arb_reqs() -> impl Strategy<Value = Vec<Req>> {
    let folio = (
        0..LIMIT,
        prop_oneof![Just(0u8), Just(1), Just(3), Just(9), 0u8..=12, Just(13)],
    )
        .prop_map(|(p, ord)| Req::Folio(p, ord));
    let range = (0..LIMIT, 1u64..9000).prop_map(|(p, n)| Req::Range(p, n));
    prop::collection::vec(prop_oneof![4 => folio, 1 => range], 0..120)
}

fn build_map(reqs: &[Req]) -> PreservedMap {
    let mut map = PreservedMap::new(Pfn(LIMIT));
    for r in reqs {
        // Refused requests (overlaps, out of range) are simply skipped.
        let _ = match *r {
            Req::Folio(p, ord) => {
                let order = o(ord);
                map.preserve(Pfn(p).align_down(order), order)
            }
            Req::Range(p, n) => map.preserve_range(PhysAddr(p << 12), n << 12),
        };
    }
    map
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn maps_round_trip(
        reqs in arb_reqs(),
        probes in prop::collection::vec(0..LIMIT + 4096, 128),
        extend_pick in any::<prop::sample::Index>(),
        split in any::<prop::sample::Index>(),
    ) {
        let map = build_map(&reqs);
        let bytes = ImageBuilder::new(LIMIT << 12).memmap(&map).build().unwrap();
        let img = Image::parse(&bytes).unwrap();
        prop_assert_eq!(img.folio_count(), map.folio_count());
        prop_assert!(img.folios().eq(map.folios()));
        // Internal iteration (fold, as count and for_each use) yields the
        // same folios as next(), also when it takes over part way.
        let want: Vec<_> = map.folios().collect();
        let k = split.index(want.len() + 1);
        let mut it = img.folios();
        let mut got: Vec<_> = it.by_ref().take(k).collect();
        got = it.fold(got, |mut v, f| {
            v.push(f);
            v
        });
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(img.folios().count(), want.len());
        let mut r = Restorer::new(&img);
        let mut restored: Vec<_> = r.restore_all().take(k).collect();
        restored = r.restore_all().fold(restored, |mut v, f| {
            v.push(f);
            v
        });
        prop_assert_eq!(&restored, &want);
        prop_assert_eq!(r.remaining(), 0);
        prop_assert_eq!(r.restore_all().count(), 0);
        prop_assert!(img.ranges().eq(map.ranges()));
        prop_assert!(img.blocks().eq(map.blocks()));
        prop_assert_eq!(img.preserved_bytes(), map.total_bytes());
        for ord in Order::all() {
            prop_assert_eq!(img.bytes_per_order()[ord.index()], map.bytes_of(ord));
        }
        for p in probes {
            prop_assert_eq!(img.is_preserved(Pfn(p)), map.is_preserved(Pfn(p)), "probe {:#x}", p);
        }
        prop_assert_eq!(&img.to_map(), &map);

        // Extents: every coalesced range is accepted whole; one byte past
        // any range end is refused.
        let whole: Vec<_> = map
            .ranges()
            .map(|r| Extent { range: PhysRange::new(PhysAddr(r.start.0 << 12), r.bytes()), tag: 1 })
            .collect();
        let with = ImageBuilder::new(LIMIT << 12).memmap(&map).extents(whole.clone()).build();
        prop_assert!(with.is_ok(), "{:?}", with.err());
        if let Some(pick) = whole.get(extend_pick.index(whole.len().max(1))) {
            let mut bad = whole.clone();
            let i = bad.iter().position(|e| e == pick).unwrap();
            bad[i].range.len += 1;
            let err = ImageBuilder::new(LIMIT << 12).memmap(&map).extents(bad).build().unwrap_err();
            prop_assert!(
                matches!(err, BuildError::Invalid(ParseError::ExtentNotPreserved { found, .. }) if found == pick.range.start + pick.range.len),
                "{}", err
            );
        }
        prop_assert_eq!(bytes.len() as u64, 72 + 32 + map.block_count() as u64 * 520);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Raw blocks of several orders, overlapping or not: the parser's
    /// verdict matches a brute-force pairwise check.
    #[test]
    fn overlap_detection_matches_brute_force(
        sets in prop::collection::vec(
            (
                prop::sample::select(vec![0u8, 1, 3, 9]),
                0u64..2,
                prop::collection::vec(prop_oneof![0usize..64, 0usize..4096], 1..40),
            ),
            1..6,
        )
    ) {
        let mut blocks: BTreeMap<(u8, u64), [u64; 64]> = BTreeMap::new();
        for (order, bi, bits) in sets {
            let words = blocks.entry((order, bi * (4096u64 << order))).or_insert([0; 64]);
            for b in bits {
                words[b / 64] |= 1 << (b % 64);
            }
        }
        let mut folios: Vec<(u64, u64, u8)> = Vec::new();
        let mut payload = Vec::new();
        for (&(order, base), words) in &blocks {
            payload.extend(RawImage::block(base, order, words));
            for i in 0..4096u64 {
                if words[(i / 64) as usize] >> (i % 64) & 1 != 0 {
                    let pfn = base + (i << order);
                    folios.push((pfn, pfn + (1 << order), order));
                }
            }
        }
        folios.sort();
        let overlap = folios.windows(2).any(|w| w[1].0 < w[0].1)
            || folios.iter().enumerate().any(|(i, a)| folios[..i].iter().any(|b| a.0 < b.1));
        let mut raw = RawImage::new((2 * (4096u64 << 9)) << 12);
        raw.set_payload(SectionKind::Memmap, payload);
        let bytes = raw.to_bytes();
        match Image::parse(&bytes) {
            Ok(img) => {
                prop_assert!(!overlap, "overlap missed");
                let got: Vec<_> = img.folios().map(|f| (f.pfn.0, f.end_pfn().0, f.order.get())).collect();
                prop_assert_eq!(got, folios);
            }
            Err(e) => {
                prop_assert!(overlap, "false overlap: {}", e);
                prop_assert_eq!(e.kind(), "folio-overlap");
            }
        }
    }
}

#[test]
fn the_sample_has_padding_and_all_sections() {
    // The bit-flip test of `full.rs` only means something if every region
    // kind is present.
    let bytes = sample_image();
    let img = Image::parse(&bytes).unwrap();
    let kinds: Vec<_> = img.sections().map(|s| s.kind).collect();
    assert_eq!(kinds, SectionKind::KNOWN);
    let covered: u64 = 72 + 32 * kinds.len() as u64 + img.sections().map(|s| s.len).sum::<u64>();
    assert!(covered < bytes.len() as u64, "no padding to mutate");
}

#[test]
fn parse_reads_unaligned_and_oversized_input() {
    let bytes = sample_image();
    let mut shifted = vec![0u8; bytes.len() + 4096 + 1];
    shifted[1..1 + bytes.len()].copy_from_slice(&bytes);
    // Misaligned by one byte, and followed by the rest of a "page".
    let img = Image::parse(&shifted[1..]).unwrap();
    assert_eq!(img.bytes().len(), bytes.len());
    assert_eq!(img.folio_count(), 12);
}

#[test]
fn sections_read_back() {
    let bytes = sample_image();
    let img = Image::parse(&bytes).unwrap();
    assert_eq!(img.header().generation, 7);
    assert_eq!(img.arena_size(), super::ARENA);
    let scratch: Vec<_> = img.scratch().collect();
    assert_eq!(scratch, [kho_core::PhysRange::new(PhysAddr(0), 0x10_0000)]);
    assert_eq!(img.kfence().count(), 1);
    let caches: Vec<_> = img.slab_caches().collect();
    assert_eq!(caches.len(), 1);
    assert_eq!(caches[0].name(), "kv-node");
    assert_eq!(caches[0].object_size(), 64);
    let page = img.slab_pages().next().unwrap();
    assert_eq!(page.pfn(), Pfn(0x1000));
    assert_eq!(page.order(), Order::ZERO);
    assert_eq!(page.object_count(), 64);
    assert_eq!(page.allocated().collect::<Vec<_>>(), [0, 1, 3]);
    assert!(page.is_allocated(3) && !page.is_allocated(2) && !page.is_allocated(64));
    assert_eq!(page.bitmap_words().collect::<Vec<_>>(), [0b1011]);
    assert_eq!(page.object_addr(3), Some(PhysAddr(0x100_0000 + 192)));
    assert_eq!(img.slab_page(Pfn(0x1000)).unwrap().cache_id(), 1);
    assert!(img.slab_cache(1).is_some() && img.slab_cache(2).is_none());
    let tags: Vec<_> = img.extents().map(|e| e.tag).collect();
    assert_eq!(tags, [8, 7]);
    assert_eq!(img.tree(), Some(&super::sample_tree()));
}

#[test]
fn builder_refuses_what_the_reader_rejects() {
    let map = super::sample_map();
    // Scratch over preserved memory.
    let err = ImageBuilder::new(super::ARENA)
        .memmap(&map)
        .scratch(vec![kho_core::PhysRange::new(PhysAddr(0x20_0000), 0x1000)])
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        kho_core::BuildError::Invalid(ParseError::PreservedInRange { .. })
    ));
    // A map larger than the arena.
    assert!(ImageBuilder::new(0x1000).memmap(&map).build().is_err());
    // A name too long for its field.
    let mut cache = super::sample_cache();
    cache.name = "x".repeat(33);
    assert!(matches!(
        ImageBuilder::new(super::ARENA)
            .memmap(&map)
            .slab(vec![cache], vec![])
            .build(),
        Err(kho_core::BuildError::CacheName { .. })
    ));
    // A bitmap of the wrong length.
    let mut page = super::sample_page();
    page.bitmap.push(0);
    assert!(matches!(
        ImageBuilder::new(super::ARENA)
            .memmap(&map)
            .slab(vec![super::sample_cache()], vec![page])
            .build(),
        Err(kho_core::BuildError::BitmapLength { .. })
    ));
    // write_to checks the buffer.
    let b = super::sample_builder();
    let mut small = vec![0u8; 16];
    assert!(matches!(
        b.write_to(&mut small),
        Err(kho_core::BuildError::BufferTooSmall { .. })
    ));
    let mut page_buf = vec![0xffu8; b.encoded_len() as usize + 100];
    let n = b.write_to(&mut page_buf).unwrap();
    assert_eq!(&page_buf[..n], &b.build().unwrap()[..]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Section payloads scrambled with the CRCs recomputed, so the content
    /// validators see hostile input: parsing never panics, and whatever it
    /// accepts can be walked, restored and rebuilt.
    #[test]
    fn hostile_contents_never_panic(
        edits in prop::collection::vec(
            (0usize..6, any::<prop::sample::Index>(), any::<u8>(), 0u8..3),
            1..12,
        )
    ) {
        let mut raw = super::sample_raw();
        for (sec, at, value, mode) in edits {
            let Some(s) = raw.sections.get_mut(sec) else { continue };
            if s.payload.is_empty() {
                continue;
            }
            let i = at.index(s.payload.len());
            match mode {
                0 => s.payload[i] = value,
                1 => s.payload[i] ^= 1 << (value % 8),
                // Eight bytes at once: a whole field.
                _ => {
                    let end = (i + 8).min(s.payload.len());
                    s.payload[i..end].fill(value);
                }
            }
        }
        let bytes = raw.to_bytes();
        if let Ok(img) = Image::parse(&bytes) {
            let n = img.folios().count() as u64;
            prop_assert_eq!(n, img.folio_count());
            let _ = img.ranges().count();
            let _ = img.to_map();
            for p in img.slab_pages() {
                let _ = (p.allocated_count(), p.allocated().count(), p.object_addr(0));
            }
            let _ = img.slab_caches().map(|c| c.name().len()).sum::<usize>();
            let _ = img.extents().count();
            let mut r = kho_core::Restorer::new(&img);
            prop_assert_eq!(r.restore_all().count() as u64, n);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Hostile header and table fields with valid CRCs: parsing returns,
    /// never panics, and never accepts a table that does not fit.
    #[test]
    fn hostile_header_and_table_never_panic(
        header_size in prop_oneof![Just(None), any::<u32>().prop_map(Some), (0u32..40).prop_map(|n| Some(n * 8))],
        arena_size in prop_oneof![Just(super::ARENA), any::<u64>(), (0u64..1 << 20).prop_map(|p| p << 12)],
        image_len in prop_oneof![Just(None), any::<u64>().prop_map(Some), (0u64..1 << 10).prop_map(|n| Some(n * 8))],
        table_offset in prop_oneof![Just(None), any::<u64>().prop_map(Some), (0u64..64).prop_map(|n| Some(n * 8))],
        section_count in prop_oneof![Just(None), any::<u32>().prop_map(Some), (0u32..10).prop_map(Some)],
        entry_size in prop_oneof![Just(32u32), any::<u32>(), (0u32..10).prop_map(|n| n * 8)],
        entry in (0usize..6, prop_oneof![Just(None), any::<u64>().prop_map(Some)], prop_oneof![Just(None), any::<u64>().prop_map(Some)]),
    ) {
        let mut raw = super::sample_raw();
        raw.header_size = header_size;
        raw.arena_size = arena_size;
        raw.image_len = image_len;
        raw.table_offset = table_offset;
        raw.section_count = section_count;
        raw.entry_size = entry_size.min(1 << 12);
        let (i, off, len) = entry;
        raw.sections[i].offset = off;
        raw.sections[i].len = len;
        let bytes = raw.to_bytes();
        if let Ok(img) = Image::parse(&bytes) {
            let h = img.header();
            prop_assert!(h.table_offset + u64::from(h.section_count) * u64::from(h.entry_size) <= bytes.len() as u64);
            prop_assert_eq!(img.folios().count() as u64, img.folio_count());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The range check (a cursor per order through sorted ranges) names
    /// the same first range and lowest folio as a brute-force scan.
    #[test]
    fn preserved_in_range_matches_brute_force(
        reqs in arb_reqs(),
        ranges in prop::collection::vec((0..LIMIT, 1u64..3000), 1..12),
    ) {
        let map = build_map(&reqs);
        // Sorted, disjoint page ranges, some over preserved memory.
        let mut pages: Vec<(u64, u64)> = Vec::new();
        let mut sorted = ranges;
        sorted.sort_unstable();
        for (s, n) in sorted {
            let e = (s + n).min(LIMIT);
            if pages.last().is_none_or(|&(_, pe)| s >= pe) && s < e {
                pages.push((s, e));
            }
        }
        let first_hit = pages.iter().find_map(|&(s, e)| {
            let f = map.folios().find(|f| f.end_pfn().0 > s)?;
            (f.pfn.0 < e).then_some(((s, e), f))
        });
        let scratch = pages
            .iter()
            .map(|&(s, e)| PhysRange::new(PhysAddr(s << 12), (e - s) << 12))
            .collect();
        let got = ImageBuilder::new(LIMIT << 12).memmap(&map).scratch(scratch).build();
        match (got, first_hit) {
            (Ok(_), None) => {}
            (Err(BuildError::Invalid(ParseError::PreservedInRange { start, len, pfn, order, .. })), Some(((s, e), f))) => {
                prop_assert_eq!((start, len), (s << 12, (e - s) << 12));
                prop_assert_eq!((pfn, order), (f.pfn.0, f.order.get()));
            }
            (got, want) => prop_assert!(false, "got {:?}, want {:?}", got.err(), want),
        }
    }

    /// The slab page check (a cursor per order through pages sorted by
    /// PFN) agrees with `is_preserved` on every page.
    #[test]
    fn slab_page_heads_match_is_preserved(
        reqs in arb_reqs(),
        picks in prop::collection::vec((0..LIMIT, 0u8..=13, any::<bool>()), 1..24),
    ) {
        let map = build_map(&reqs);
        let folios: Vec<_> = map.folios().collect();
        // One cache per order, a single page-sized object per slab.
        let caches: Vec<SlabCacheInfo> = (0..=13u8)
            .map(|ord| SlabCacheInfo {
                id: u32::from(ord) + 1,
                name: format!("o{ord}"),
                object_size: 4096,
                align: 8,
                objects_per_slab: 1,
                order: o(ord),
            })
            .collect();
        let mut pages: Vec<SlabPageInfo> = Vec::new();
        for (p, ord, on_folio) in picks {
            // Mostly real folio heads, so the check runs deep into the list.
            let (pfn, order) = match folios.get(p as usize % folios.len().max(1)) {
                Some(f) if on_folio => (f.pfn, f.order),
                _ => (Pfn(p), o(ord)),
            };
            if pages.iter().any(|q| q.pfn == pfn) {
                continue;
            }
            pages.push(SlabPageInfo {
                pfn,
                cache_id: u32::from(order.get()) + 1,
                order,
                object_size: 4096,
                object_count: 1,
                first_offset: 0,
                bitmap: vec![1],
            });
        }
        pages.sort_unstable_by_key(|q| q.pfn);
        let bad = pages
            .iter()
            .find(|q| map.is_preserved(q.pfn) != Some((q.pfn, q.order)));
        let got = ImageBuilder::new(LIMIT << 12)
            .memmap(&map)
            .slab(caches, pages.clone())
            .build();
        match (got, bad) {
            (Ok(bytes), None) => prop_assert_eq!(Image::parse(&bytes).unwrap().slab_pages().len(), pages.len()),
            (Err(BuildError::Invalid(ParseError::SlabPageNotPreserved { pfn, order, found, .. })), Some(q)) => {
                prop_assert_eq!((pfn, order), (q.pfn.0, q.order.get()));
                prop_assert_eq!(found, map.is_preserved(q.pfn).map(|(h, o)| (h.0, o.get())));
            }
            (got, want) => prop_assert!(false, "got {:?}, want {:?}", got.err(), want),
        }
    }
}
