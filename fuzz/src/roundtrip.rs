//! The `roundtrip` target: an arbitrary preserved set, scratch and KFENCE
//! ranges, slab caches and pages, extents and metadata tree are written
//! with [`ImageBuilder`], parsed back and compared field by field; then one
//! byte of a checksummed region is changed and the image must be rejected.
//!
//! The generator only produces sets that the format allows (folios that fit
//! the arena and do not overlap, ranges clear of preserved memory, slab
//! pages on preserved folios, extents inside preserved runs, a tree within
//! the default limits), so every build must succeed.

use arbitrary::{Arbitrary, Unstructured};

use super::image::HeapCap;
use kho_core::{
    Extent, Image, ImageBuilder, Node, Order, ParseError, Pfn, PhysAddr, PhysRange, PreservedMap,
    SlabCacheInfo, SlabPageInfo, Tree, Value, MAX_MAP_ORDER, PAGE_SHIFT, PAGE_SIZE,
};

/// Most nodes the generator puts in a tree.
const MAX_NODES: usize = 48;
/// Most properties per node.
const MAX_PROPS: usize = 12;
/// Deepest node, as [`kho_core::TreeLimits::DEFAULT`] allows.
const MAX_DEPTH: usize = 16;

/// A folio request: head PFN (reduced modulo the arena) and order.
#[derive(Debug, Arbitrary)]
struct FolioReq {
    pfn: u32,
    order: u8,
}

/// A page range request: first page and page count (both reduced).
#[derive(Debug, Arbitrary)]
struct RangeReq {
    page: u32,
    pages: u16,
}

#[derive(Debug, Arbitrary)]
struct CacheReq {
    id: u32,
    object_size: u16,
    align_log: u8,
    objects_per_slab: u16,
    order: u8,
    name: String,
}

#[derive(Debug, Arbitrary)]
struct SlabPageReq {
    /// Which preserved folio of the cache's order.
    folio: u16,
    /// Which cache.
    cache: u8,
    /// Reduced to a multiple of the cache's alignment that keeps the
    /// objects inside the folio.
    first_offset: u16,
    bitmap: Vec<u64>,
}

#[derive(Debug, Arbitrary)]
struct ExtentReq {
    /// Which preserved run.
    run: u16,
    offset: u32,
    len: u32,
    tag: u32,
}

#[derive(Debug, Arbitrary)]
enum ValueReq {
    U64(u64),
    Bytes(Vec<u8>),
    Str(String),
    Range(u64, u64),
}

#[derive(Debug, Arbitrary)]
struct NodeReq {
    /// Parent among the nodes before this one (reduced).
    parent: u16,
    name: String,
    compatible: String,
    props: Vec<(String, ValueReq)>,
}

/// Everything one round trip writes.
#[derive(Debug, Arbitrary)]
struct Input {
    /// log2 of the arena size in pages, reduced to 4..=22.
    arena_log: u8,
    generation: u64,
    folios: Vec<FolioReq>,
    preserve_ranges: Vec<RangeReq>,
    scratch: Vec<RangeReq>,
    kfence: Vec<RangeReq>,
    caches: Vec<CacheReq>,
    slab_pages: Vec<SlabPageReq>,
    extents: Vec<ExtentReq>,
    root_compatible: String,
    nodes: Vec<NodeReq>,
    /// Which byte of the checksummed regions to change, and how.
    flip_at: u32,
    flip: u8,
}

/// [`run_capped`] without a heap cap.
pub fn run(data: &[u8]) {
    run_capped(data, HeapCap::NONE);
}

/// Run one round trip from raw fuzzer bytes, parsing the image it builds
/// under `cap`.
pub fn run_capped(data: &[u8], cap: HeapCap) {
    let mut u = Unstructured::new(data);
    let Ok(input) = Input::arbitrary(&mut u) else {
        return;
    };
    round_trip(&input, cap);
}

/// A string made valid as a tree name: no `/` or NUL, at most `max` bytes,
/// never empty.
fn clean_name(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
    {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push('x');
    }
    out
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn build_map(input: &Input, pages: u64) -> PreservedMap {
    let mut map = PreservedMap::new(Pfn(pages));
    for f in &input.folios {
        let order = Order::new(f.order % (MAX_MAP_ORDER + 1)).unwrap_or(Order::ZERO);
        if order.pages() > pages {
            continue;
        }
        let pfn = Pfn(u64::from(f.pfn) % pages).align_down(order);
        // Overlapping requests are refused; the generator simply drops them.
        let _ = map.preserve(pfn, order);
    }
    for r in &input.preserve_ranges {
        let start = u64::from(r.page) % pages;
        let len = (u64::from(r.pages) % 64 + 1).min(pages - start);
        if map.first_overlap(Pfn(start), Pfn(start + len)).is_none() {
            let done = map.preserve_range(PhysAddr(start << PAGE_SHIFT), len << PAGE_SHIFT);
            assert!(done.is_ok(), "free range refused: {done:?}");
        }
    }
    map
}

/// Page ranges clear of preserved memory and of the ranges in `taken`.
fn free_ranges(
    reqs: &[RangeReq],
    pages: u64,
    map: &PreservedMap,
    taken: &mut Vec<(u64, u64)>,
) -> Vec<PhysRange> {
    let mut out = Vec::new();
    for r in reqs.iter().take(64) {
        let start = u64::from(r.page) % pages;
        let len = (u64::from(r.pages) % 256 + 1).min(pages - start);
        let end = start + len;
        if map.first_overlap(Pfn(start), Pfn(end)).is_some()
            || taken.iter().any(|&(s, e)| start < e && s < end)
        {
            continue;
        }
        taken.push((start, end));
        out.push(PhysRange::new(
            PhysAddr(start << PAGE_SHIFT),
            len << PAGE_SHIFT,
        ));
    }
    out
}

fn build_slab(
    input: &Input,
    folios: &[kho_core::Folio],
) -> (Vec<SlabCacheInfo>, Vec<SlabPageInfo>) {
    let mut caches: Vec<SlabCacheInfo> = Vec::new();
    for c in input.caches.iter().take(16) {
        if caches.iter().any(|k| k.id == c.id) {
            continue;
        }
        let order = Order::new(c.order % 4).unwrap_or(Order::ZERO);
        let align = 1u32 << (c.align_log % 13);
        // A non-zero multiple of the alignment that fits the folio; the
        // alignment itself (at most a page) always does.
        let mut object_size = (u32::from(c.object_size) % order.bytes() as u32)
            .max(1)
            .next_multiple_of(align);
        if u64::from(object_size) > order.bytes() {
            object_size = align;
        }
        let fit = order.bytes() / u64::from(object_size);
        let per = u64::from(c.objects_per_slab) % fit + 1;
        caches.push(SlabCacheInfo {
            id: c.id,
            name: truncate(&c.name.replace('\0', ""), 32),
            object_size,
            align,
            objects_per_slab: per as u32,
            order,
        });
    }
    let mut pages: Vec<SlabPageInfo> = Vec::new();
    if caches.is_empty() {
        return (caches, pages);
    }
    for p in input.slab_pages.iter().take(32) {
        let cache = &caches[usize::from(p.cache) % caches.len()];
        // A slab page is a preserved folio of exactly its cache's order.
        let candidates: Vec<&kho_core::Folio> =
            folios.iter().filter(|f| f.order == cache.order).collect();
        if candidates.is_empty() {
            continue;
        }
        let folio = *candidates[usize::from(p.folio) % candidates.len()];
        if pages.iter().any(|q| q.pfn == folio.pfn) {
            continue;
        }
        let (size, count, align) = (
            u64::from(cache.object_size),
            u64::from(cache.objects_per_slab),
            u64::from(cache.align),
        );
        let room = folio.bytes() - size * count;
        let first_offset = (u64::from(p.first_offset) % (room / align + 1)) * align;
        let words = count.div_ceil(64) as usize;
        let mut bitmap: Vec<u64> = (0..words)
            .map(|i| p.bitmap.get(i).copied().unwrap_or(0))
            .collect();
        if count % 64 != 0 {
            if let Some(last) = bitmap.last_mut() {
                *last &= (1u64 << (count % 64)) - 1;
            }
        }
        pages.push(SlabPageInfo {
            pfn: folio.pfn,
            cache_id: cache.id,
            order: folio.order,
            object_size: cache.object_size,
            object_count: count as u32,
            first_offset: first_offset as u32,
            bitmap,
        });
    }
    (caches, pages)
}

fn build_extents(input: &Input, map: &PreservedMap) -> Vec<Extent> {
    let runs: Vec<(u64, u64)> = map
        .ranges()
        .map(|r| (r.start.0 << PAGE_SHIFT, r.end.0 << PAGE_SHIFT))
        .collect();
    let mut out: Vec<Extent> = Vec::new();
    if runs.is_empty() {
        return out;
    }
    for e in input.extents.iter().take(64) {
        let (lo, hi) = runs[usize::from(e.run) % runs.len()];
        let start = lo + u64::from(e.offset) % (hi - lo);
        let len = (u64::from(e.len) % (hi - start)).max(1);
        let end = start + len;
        if out
            .iter()
            .any(|x| start < x.range.start + x.range.len && x.range.start < end)
        {
            continue;
        }
        out.push(Extent {
            range: PhysRange::new(PhysAddr(start), len),
            tag: e.tag,
        });
    }
    out
}

fn value_of(v: &ValueReq) -> Value {
    match v {
        ValueReq::U64(x) => Value::U64(*x),
        ValueReq::Bytes(b) => Value::Bytes(b.clone()),
        ValueReq::Str(s) => Value::Str(s.clone()),
        ValueReq::Range(s, l) => Value::Range(PhysRange::new(PhysAddr(*s), *l)),
    }
}

/// A tree within the default limits: unique names (a `.index` suffix),
/// depth at most [`MAX_DEPTH`].
fn build_tree(input: &Input) -> Tree {
    let reqs = &input.nodes[..input.nodes.len().min(MAX_NODES - 1)];
    let n = reqs.len() + 1;
    let mut parent = vec![0usize; n];
    let mut depth = vec![0usize; n];
    for (i, r) in reqs.iter().enumerate() {
        let me = i + 1;
        let mut p = usize::from(r.parent) % me;
        if depth[p] >= MAX_DEPTH {
            p = 0;
        }
        parent[me] = p;
        depth[me] = depth[p] + 1;
    }
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    nodes.push(Node::root(truncate(&input.root_compatible, 255)));
    for (i, r) in reqs.iter().enumerate() {
        let suffix = format!(".{}", i + 1);
        let name = clean_name(&r.name, 255 - suffix.len()) + &suffix;
        let mut node = Node::new(name, truncate(&r.compatible, 255));
        for (k, (pname, v)) in r.props.iter().take(MAX_PROPS).enumerate() {
            let suffix = format!(".{k}");
            node.set_prop(clean_name(pname, 255 - suffix.len()) + &suffix, value_of(v));
        }
        nodes.push(node);
    }
    // Attach children last to first, so each parent sees them in order.
    let mut children: Vec<Vec<Node>> = (0..n).map(|_| Vec::new()).collect();
    for i in (1..n).rev() {
        let mut node = core::mem::take(&mut nodes[i]);
        let mut mine = core::mem::take(&mut children[i]);
        mine.reverse();
        node.children = mine;
        children[parent[i]].push(node);
    }
    let mut root = core::mem::take(&mut nodes[0]);
    let mut mine = core::mem::take(&mut children[0]);
    mine.reverse();
    root.children = mine;
    Tree::new(root)
}

fn round_trip(input: &Input, cap: HeapCap) {
    let pages = 1u64 << (4 + input.arena_log % 19);
    let arena = pages * PAGE_SIZE;
    let map = build_map(input, pages);
    let folios: Vec<kho_core::Folio> = map.folios().collect();
    let mut taken = Vec::new();
    let mut scratch = free_ranges(&input.scratch, pages, &map, &mut taken);
    let mut kfence = free_ranges(&input.kfence, pages, &map, &mut taken);
    let (mut caches, mut slab_pages) = build_slab(input, &folios);
    let mut extents = build_extents(input, &map);
    let tree = build_tree(input);

    let mut builder = ImageBuilder::new(arena)
        .generation(input.generation)
        .memmap(&map)
        .scratch(scratch.clone())
        .kfence(kfence.clone())
        .extents(extents.clone())
        .tree(&tree);
    if !caches.is_empty() || !slab_pages.is_empty() {
        builder = builder.slab(caches.clone(), slab_pages.clone());
    }
    let bytes = match builder.build() {
        Ok(b) => b,
        Err(e) => panic!("the builder refused a valid set: {e}"),
    };
    assert_eq!(bytes.len() as u64, builder.encoded_len());

    let image = match cap.around(bytes.len(), || Image::parse(&bytes)) {
        Ok(i) => i,
        Err(e) => panic!("the reader rejected what the builder wrote: {e}"),
    };
    let h = image.header();
    assert_eq!((h.arena_size, h.generation), (arena, input.generation));
    assert!(image.folios().eq(folios.iter().copied()), "folios differ");
    assert_eq!(image.to_map(), map);
    scratch.sort_unstable();
    kfence.sort_unstable();
    extents.sort_unstable();
    assert!(image.scratch().eq(scratch.iter().copied()));
    assert!(image.kfence().eq(kfence.iter().copied()));
    assert!(image.extents().eq(extents.iter().copied()));
    caches.sort_unstable_by_key(|c| c.id);
    slab_pages.sort_unstable_by_key(|p| p.pfn);
    assert_eq!(image.slab_caches().len(), caches.len());
    for (got, want) in image.slab_caches().zip(&caches) {
        assert_eq!(
            (
                got.id(),
                got.name(),
                got.object_size(),
                got.align(),
                got.objects_per_slab(),
                got.order()
            ),
            (
                want.id,
                want.name.as_str(),
                want.object_size,
                want.align,
                want.objects_per_slab,
                want.order
            )
        );
    }
    assert_eq!(image.slab_pages().len(), slab_pages.len());
    for (got, want) in image.slab_pages().zip(&slab_pages) {
        assert_eq!(
            (
                got.pfn(),
                got.cache_id(),
                got.order(),
                got.object_size(),
                got.object_count(),
                got.first_offset()
            ),
            (
                want.pfn,
                want.cache_id,
                want.order,
                want.object_size,
                want.object_count,
                want.first_offset
            )
        );
        assert!(got.bitmap_words().eq(want.bitmap.iter().copied()));
    }
    assert_eq!(image.tree(), Some(&tree));
    super::image::walk(&image);

    flip_one_byte(&bytes, &image, input.flip_at, input.flip);
}

/// Change one byte of a checksummed region (the header, the section table
/// or a section) and require a rejection: the matching CRC error for the
/// table and the sections, any error for the header.
fn flip_one_byte(bytes: &[u8], image: &Image<'_>, at: u32, flip: u8) {
    let h = image.header();
    let mut regions: Vec<(u64, u64, Option<kho_core::SectionKind>)> = vec![
        (0, u64::from(h.header_size), None),
        (
            h.table_offset,
            u64::from(h.section_count) * u64::from(h.entry_size),
            None,
        ),
    ];
    regions.extend(
        image
            .sections()
            .filter(|s| s.len > 0)
            .map(|s| (s.offset, s.len, Some(s.kind))),
    );
    let total: u64 = regions.iter().map(|r| r.1).sum();
    let mut i = u64::from(at) % total;
    let (start, region, kind) = regions
        .iter()
        .find_map(|&(s, l, k)| {
            if i < l {
                Some((s, s + i, k))
            } else {
                i -= l;
                None
            }
        })
        .expect("index inside a region");
    let mut bad = bytes.to_vec();
    bad[region as usize] ^= flip.max(1);
    let err = match Image::parse(&bad) {
        Ok(_) => panic!("a changed byte at {region:#x} went unnoticed"),
        Err(e) => e,
    };
    match kind {
        Some(k) => assert!(
            matches!(err, ParseError::SectionCrc { kind, .. } if kind == k),
            "byte {region:#x} of {k}: {err}"
        ),
        None if start == h.table_offset && start != 0 => {
            assert!(
                matches!(err, ParseError::TableCrc { .. }),
                "table byte {region:#x}: {err}"
            )
        }
        None => {}
    }
}
