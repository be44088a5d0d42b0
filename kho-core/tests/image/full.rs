//! Property tests over random full images: every section populated, folios
//! of every order up to 18. Each image must survive the round trip intact,
//! any single changed byte of a checksummed region must be caught by the
//! CRC that covers it, and any truncation must fail with the exact error.

use kho_core::image::layout::HEADER_CRC_OFFSET;
use kho_core::{
    Extent, Folio, Image, ImageBuilder, Node, Order, ParseError, Pfn, PhysAddr, PhysRange,
    PreservedMap, SectionKind, SlabCacheInfo, SlabPageInfo, Tree, MAX_MAP_ORDER, PAGE_SHIFT,
};
use proptest::prelude::*;

/// What one image holds, as raw requests; [`build`] turns it into a valid
/// set (requests that would overlap or not fit are dropped).
#[derive(Debug, Clone)]
struct Spec {
    /// log2 of the arena size in pages.
    arena_log: u32,
    generation: u64,
    folios: Vec<(u64, u8)>,
    runs: Vec<(u64, u64)>,
    scratch: Vec<(u64, u64)>,
    kfence: Vec<(u64, u64)>,
    /// `(object size, log2 of align, objects per slab, order)`.
    caches: Vec<(u32, u8, u16, u8)>,
    /// `(which folio, which cache, first offset, bitmap words)`.
    pages: Vec<(u16, u8, u16, Vec<u64>)>,
    /// `(which preserved run, offset into it, length, tag)`.
    extents: Vec<(u16, u64, u64, u32)>,
    /// `(parent among earlier nodes, property value)`.
    nodes: Vec<(u8, u64)>,
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    let order = prop_oneof![
        3 => Just(0u8),
        1 => 0u8..=MAX_MAP_ORDER,
        1 => Just(9u8),
        1 => Just(MAX_MAP_ORDER),
    ];
    (
        (19u32..=22, any::<u64>()),
        prop::collection::vec((any::<u64>(), order), 0..48),
        prop::collection::vec((any::<u64>(), 1u64..600), 0..6),
        prop::collection::vec((any::<u64>(), 1u64..64), 0..6),
        prop::collection::vec((any::<u64>(), 1u64..64), 0..6),
        prop::collection::vec((1u32..5000, 0u8..8, any::<u16>(), 0u8..4), 0..4),
        prop::collection::vec(
            (
                any::<u16>(),
                any::<u8>(),
                any::<u16>(),
                prop::collection::vec(any::<u64>(), 0..8),
            ),
            0..8,
        ),
        prop::collection::vec(
            (any::<u16>(), any::<u64>(), 1u64..10_000, any::<u32>()),
            0..8,
        ),
        prop::collection::vec((any::<u8>(), any::<u64>()), 0..12),
    )
        .prop_map(
            |(
                (arena_log, generation),
                folios,
                runs,
                scratch,
                kfence,
                caches,
                pages,
                extents,
                nodes,
            )| {
                Spec {
                    arena_log,
                    generation,
                    folios,
                    runs,
                    scratch,
                    kfence,
                    caches,
                    pages,
                    extents,
                    nodes,
                }
            },
        )
}

/// A valid image and everything it was built from.
struct Built {
    arena: u64,
    map: PreservedMap,
    scratch: Vec<PhysRange>,
    kfence: Vec<PhysRange>,
    caches: Vec<SlabCacheInfo>,
    pages: Vec<SlabPageInfo>,
    extents: Vec<Extent>,
    tree: Tree,
    bytes: Vec<u8>,
}

fn free_ranges(
    reqs: &[(u64, u64)],
    pages: u64,
    map: &PreservedMap,
    taken: &mut Vec<(u64, u64)>,
) -> Vec<PhysRange> {
    let mut out = Vec::new();
    for &(at, n) in reqs {
        let start = at % pages;
        let end = (start + n).min(pages);
        if map.first_overlap(Pfn(start), Pfn(end)).is_some()
            || taken.iter().any(|&(s, e)| start < e && s < end)
        {
            continue;
        }
        taken.push((start, end));
        out.push(PhysRange::new(
            PhysAddr(start << PAGE_SHIFT),
            (end - start) << PAGE_SHIFT,
        ));
    }
    out.sort_unstable();
    out
}

fn build(spec: &Spec) -> Built {
    let pages = 1u64 << spec.arena_log;
    let arena = pages << PAGE_SHIFT;
    let mut map = PreservedMap::new(Pfn(pages));
    for &(pfn, order) in &spec.folios {
        let order = Order::new(order).unwrap();
        // Overlapping requests are refused and simply dropped.
        let _ = map.preserve(Pfn(pfn % pages).align_down(order), order);
    }
    for &(at, n) in &spec.runs {
        let start = at % pages;
        let end = (start + n).min(pages);
        if map.first_overlap(Pfn(start), Pfn(end)).is_none() {
            map.preserve_range(PhysAddr(start << PAGE_SHIFT), (end - start) << PAGE_SHIFT)
                .unwrap();
        }
    }
    let mut taken = Vec::new();
    let scratch = free_ranges(&spec.scratch, pages, &map, &mut taken);
    let kfence = free_ranges(&spec.kfence, pages, &map, &mut taken);

    let mut caches = Vec::new();
    for (i, &(size, align_log, per, order)) in spec.caches.iter().enumerate() {
        let order = Order::new(order).unwrap();
        let align = 1u32 << align_log;
        let object_size = size.next_multiple_of(align);
        let fit = order.bytes() / u64::from(object_size);
        if fit == 0 {
            continue;
        }
        caches.push(SlabCacheInfo {
            id: 3 * i as u32 + 1,
            name: format!("cache-{i}"),
            object_size,
            align,
            objects_per_slab: (u64::from(per) % fit + 1) as u32,
            order,
        });
    }
    let folios: Vec<Folio> = map.folios().collect();
    let mut slab_pages: Vec<SlabPageInfo> = Vec::new();
    for (pick, cache, first, words) in &spec.pages {
        let Some(c) = caches.get(usize::from(*cache) % caches.len().max(1)) else {
            continue;
        };
        let fitting: Vec<&Folio> = folios.iter().filter(|f| f.order == c.order).collect();
        let Some(folio) = fitting.get(usize::from(*pick) % fitting.len().max(1)) else {
            continue;
        };
        if slab_pages.iter().any(|p| p.pfn == folio.pfn) {
            continue;
        }
        let count = u64::from(c.objects_per_slab);
        let room = folio.bytes() - count * u64::from(c.object_size);
        let align = u64::from(c.align);
        let first_offset = u64::from(*first) % (room / align + 1) * align;
        let n = count.div_ceil(64) as usize;
        let mut bitmap: Vec<u64> = (0..n)
            .map(|i| words.get(i).copied().unwrap_or(!0))
            .collect();
        if count % 64 != 0 {
            bitmap[n - 1] &= (1 << (count % 64)) - 1;
        }
        slab_pages.push(SlabPageInfo {
            pfn: folio.pfn,
            cache_id: c.id,
            order: folio.order,
            object_size: c.object_size,
            object_count: count as u32,
            first_offset: first_offset as u32,
            bitmap,
        });
    }
    slab_pages.sort_unstable_by_key(|p| p.pfn);

    let runs: Vec<(u64, u64)> = map
        .ranges()
        .map(|r| (r.start.0 << PAGE_SHIFT, r.end.0 << PAGE_SHIFT))
        .collect();
    let mut extents: Vec<Extent> = Vec::new();
    for &(run, off, len, tag) in &spec.extents {
        let Some(&(lo, hi)) = runs.get(usize::from(run) % runs.len().max(1)) else {
            continue;
        };
        let start = lo + off % (hi - lo);
        let len = len.min(hi - start);
        let end = start + len;
        if extents
            .iter()
            .any(|e| start < e.range.start + e.range.len && e.range.start < end)
        {
            continue;
        }
        extents.push(Extent {
            range: PhysRange::new(PhysAddr(start), len),
            tag,
        });
    }
    extents.sort_unstable();

    let tree = build_tree(&spec.nodes, &runs);
    let builder = ImageBuilder::new(arena)
        .generation(spec.generation)
        .memmap(&map)
        .scratch(scratch.clone())
        .kfence(kfence.clone())
        .slab(caches.clone(), slab_pages.clone())
        .extents(extents.clone())
        .tree(&tree);
    let bytes = builder
        .build()
        .unwrap_or_else(|e| panic!("the builder refused a valid set: {e}"));
    Built {
        arena,
        map,
        scratch,
        kfence,
        caches,
        pages: slab_pages,
        extents,
        tree,
        bytes,
    }
}

/// A tree of up to 13 nodes, each a child of an earlier one, with a u64
/// and a range property.
fn build_tree(nodes: &[(u8, u64)], runs: &[(u64, u64)]) -> Tree {
    // Children are attached bottom-up: node i's subtree is complete once
    // every later node has been placed.
    let n = nodes.len();
    let mut built: Vec<Option<Node>> = (0..n)
        .map(|i| {
            let (_, v) = nodes[i];
            let mut node = Node::new(format!("n{i}"), "kho-test-v1").with_u64("v", v);
            if let Some(&(lo, hi)) = runs.get(i % runs.len().max(1)) {
                node = node.with_range("mem", PhysRange::new(PhysAddr(lo), hi - lo));
            }
            Some(node)
        })
        .collect();
    let parent = |i: usize| usize::from(nodes[i].0) % (i + 1);
    let mut root = Node::root("kho-root-v1");
    for i in (0..n).rev() {
        let node = built[i].take().unwrap();
        // Parent 0 is the root; parent p > 0 is node p - 1.
        match parent(i) {
            0 => root.children.insert(0, node),
            p => built[p - 1].as_mut().unwrap().children.insert(0, node),
        }
    }
    Tree::new(root)
}

/// The image agrees with what it was built from, field by field.
fn assert_round_trip(b: &Built, probes: &[u64]) -> Result<(), TestCaseError> {
    let img = Image::parse(&b.bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(img.arena_size(), b.arena);
    prop_assert!(img.folios().eq(b.map.folios()));
    prop_assert!(img.ranges().eq(b.map.ranges()));
    prop_assert_eq!(&img.to_map(), &b.map);
    for &p in probes {
        let pfn = Pfn(p % (b.arena >> PAGE_SHIFT));
        prop_assert_eq!(img.is_preserved(pfn), b.map.is_preserved(pfn));
    }
    prop_assert!(img.scratch().eq(b.scratch.iter().copied()));
    prop_assert!(img.kfence().eq(b.kfence.iter().copied()));
    prop_assert!(img.extents().eq(b.extents.iter().copied()));
    prop_assert_eq!(img.slab_caches().len(), b.caches.len());
    for (got, want) in img.slab_caches().zip(&b.caches) {
        prop_assert_eq!(
            (got.id(), got.name(), got.object_size(), got.align()),
            (want.id, want.name.as_str(), want.object_size, want.align)
        );
        prop_assert_eq!(
            (got.objects_per_slab(), got.order()),
            (want.objects_per_slab, want.order)
        );
    }
    prop_assert_eq!(img.slab_pages().len(), b.pages.len());
    for (got, want) in img.slab_pages().zip(&b.pages) {
        prop_assert_eq!(
            (got.pfn(), got.cache_id(), got.order(), got.object_size()),
            (want.pfn, want.cache_id, want.order, want.object_size)
        );
        prop_assert_eq!(
            (got.object_count(), got.first_offset()),
            (want.object_count, want.first_offset)
        );
        prop_assert!(got.bitmap_words().eq(want.bitmap.iter().copied()));
    }
    prop_assert_eq!(img.tree(), Some(&b.tree));
    Ok(())
}

/// The error a change of byte `i` (of a checksummed region) must give.
fn crc_error(img: &Image<'_>, bad: &[u8], i: usize) -> Option<ParseError> {
    let h = img.header();
    let crc = |off: u64, len: u64| crc32fast::hash(&bad[off as usize..(off + len) as usize]);
    let table = h.table_offset..h.table_offset + u64::from(h.section_count) * 32;
    let i64 = i as u64;
    if (14..72).contains(&i) {
        // Past magic, size and major: the header CRC is the first check to
        // see the change.
        let mut head = bad[..72].to_vec();
        head[HEADER_CRC_OFFSET..HEADER_CRC_OFFSET + 4].fill(0);
        let stored = u32::from_le_bytes(bad[68..72].try_into().unwrap());
        return Some(ParseError::HeaderCrc {
            offset: 68,
            expected: stored,
            found: crc32fast::hash(&head),
        });
    }
    if table.contains(&i64) {
        return Some(ParseError::TableCrc {
            offset: h.table_offset,
            expected: h.table_crc32,
            found: crc(h.table_offset, table.end - table.start),
        });
    }
    img.sections()
        .find(|s| (s.offset..s.offset + s.len).contains(&i64))
        .map(|s| ParseError::SectionCrc {
            offset: s.offset,
            kind: s.kind,
            expected: s.crc32,
            found: crc(s.offset, s.len),
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn full_images_round_trip(spec in arb_spec(), probes in prop::collection::vec(any::<u64>(), 64)) {
        let b = build(&spec);
        assert_round_trip(&b, &probes)?;
        // Every section kind is reachable by the generator.
        let img = Image::parse(&b.bytes).unwrap();
        prop_assert!(img.section(SectionKind::Memmap).is_some());
        prop_assert!(img.section(SectionKind::Tree).is_some());
    }

    #[test]
    fn any_changed_checksummed_byte_is_its_crcs_error(
        spec in arb_spec(),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let b = build(&spec);
        let img = Image::parse(&b.bytes).unwrap();
        let h = img.header();
        // Checksummed bytes: the header past magic, size and major (those
        // have their own earlier checks), the table and every section.
        let mut regions: Vec<(u64, u64)> = vec![(14, 58), (h.table_offset, u64::from(h.section_count) * 32)];
        regions.extend(img.sections().filter(|s| s.len > 0).map(|s| (s.offset, s.len)));
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let mut k = at.index(total as usize) as u64;
        let i = regions
            .iter()
            .find_map(|&(s, l)| if k < l { Some(s + k) } else { k -= l; None })
            .unwrap() as usize;
        let mut bad = b.bytes.clone();
        bad[i] ^= flip;
        let want = crc_error(&img, &bad, i).unwrap();
        prop_assert_eq!(Image::parse(&bad).unwrap_err(), want, "byte {:#x}", i);
    }

    #[test]
    fn any_truncation_is_exact(spec in arb_spec(), at in any::<prop::sample::Index>()) {
        let b = build(&spec);
        let n = at.index(b.bytes.len());
        let want = if n < 72 {
            ParseError::HeaderTruncated { offset: n as u64, expected: 72, found: n as u64 }
        } else {
            ParseError::Truncated {
                offset: n as u64,
                expected: b.bytes.len() as u64,
                found: n as u64,
            }
        };
        prop_assert_eq!(Image::parse(&b.bytes[..n]).unwrap_err(), want);
    }
}

#[test]
fn every_bit_flip_of_the_full_sample_is_caught() {
    // Every byte and every bit of the sample, which has every section and
    // padding between them: each flip fails with the check that guards that
    // byte.
    let bytes = super::sample_image();
    let img = Image::parse(&bytes).unwrap();
    let h = *img.header();
    let table_end = h.table_offset + u64::from(h.section_count) * 32;
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[i] ^= 1 << bit;
            let err = Image::parse(&bad).unwrap_err();
            let ctx = format!("byte {i:#x} bit {bit}: {err}");
            match i {
                0..=7 => assert_eq!(err.kind(), "bad-magic", "{ctx}"),
                // A smaller or unaligned size, or one past the input; else
                // the CRC (which covers the size) catches it.
                8..=11 => assert!(matches!(err.kind(), "header-size" | "header-crc"), "{ctx}"),
                12..=13 => assert_eq!(err.kind(), "unsupported-major", "{ctx}"),
                14..=71 => assert_eq!(err, crc_error(&img, &bad, i).unwrap(), "{ctx}"),
                _ if (h.table_offset..table_end).contains(&(i as u64)) => {
                    assert_eq!(err, crc_error(&img, &bad, i).unwrap(), "{ctx}")
                }
                _ => match crc_error(&img, &bad, i) {
                    Some(want) => assert_eq!(err, want, "{ctx}"),
                    None => assert!(
                        matches!(err, ParseError::Padding { offset, found, .. } if offset == i as u64 && found == 1 << bit),
                        "{ctx}"
                    ),
                },
            }
        }
    }
}
