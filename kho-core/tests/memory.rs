//! Peak heap use of the parsers on adversarial inputs, against the bound
//! docs/FORMAT.md §8 states: `Image::parse` and `Tree::decode` use at most
//! [`TREE_FACTOR`] heap bytes per input byte of the tree plus [`SLACK`];
//! everything else parsing allocates is a fixed table of per-order
//! cursors. `Restorer::new` and `Image::to_map` stay within a small
//! multiple of the MEMMAP section's own size.
//!
//! A counting global allocator records live and peak heap bytes (as
//! requested from the allocator; its own overhead comes on top). Each test
//! of this binary holds one lock throughout, so a measurement sees only its
//! own allocations (and at most a line of the test harness's output).

use std::sync::{Mutex, MutexGuard};

use kho_core::image::testing::RawImage;
use kho_core::tree::{Node, Tree, TreeLimits};
use kho_core::{
    Extent, Image, ImageBuilder, Order, Pfn, PhysAddr, PhysRange, PreservedMap, Restorer,
    SectionKind, SlabCacheInfo, SlabPageInfo,
};
use peak_alloc::PeakAlloc;

#[global_allocator]
static PEAK: PeakAlloc = PeakAlloc;
static LOCK: Mutex<()> = Mutex::new(());

/// Heap bytes per byte of TREE section, at most (FORMAT.md §8).
const TREE_FACTOR: usize = 64;
/// Heap bytes on top of that, at most (FORMAT.md §8).
const SLACK: usize = 64 << 10;

/// Held by every test for its whole run.
fn exclusive() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The result of `f` and the most heap it held live at once (whatever it
/// returns included).
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = PEAK.current_usage();
    PEAK.reset_peak_usage();
    let out = f();
    let peak = PEAK.peak_usage().saturating_sub(base);
    (out, peak)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// A short name, unique per `i`.
fn name(mut i: usize) -> String {
    const A: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut s = String::new();
    loop {
        s.push(A[i % A.len()] as char);
        i /= A.len();
        if i == 0 {
            return s;
        }
    }
}

/// Trees that cost the most heap per input byte: as many minimal nodes or
/// properties as the limits allow, valid or failing only after every node
/// is built.
fn adversarial_trees() -> Vec<(&'static str, Vec<u8>)> {
    let limits = TreeLimits::DEFAULT;
    let mut out = Vec::new();

    // A root with the most children of one-byte and two-byte names.
    let mut root = Node::root("");
    for i in 1..limits.max_nodes {
        root.children.push(Node::new(name(i), ""));
    }
    out.push(("flat", Tree::new(root).encode().unwrap()));

    // As many 4-byte nodes with empty names: decoded in full, refused only
    // by the name checks that follow.
    let mut b = vec![1u8];
    varint(limits.max_nodes as u64, &mut b);
    for _ in 0..limits.max_nodes {
        b.extend([0, 0, 0, 0]);
    }
    out.push(("flat, empty names", b));

    // Chains of single children down to the depth limit.
    let mut root = Node::root("");
    for i in 0..(limits.max_nodes - 1) / limits.max_depth {
        let mut chain = Node::new("l", "");
        for d in 0..limits.max_depth - 2 {
            chain = Node::new(name(d), "").with_child(chain);
        }
        root.children.push(Node::new(name(i), "").with_child(chain));
    }
    out.push(("chains", Tree::new(root).encode().unwrap()));

    // Nodes with the most properties of minimal encoding.
    let mut root = Node::root("");
    for i in 0..64 {
        let mut n = Node::new(name(i), "");
        for k in 0..limits.max_props {
            n = n.with_u64(name(k), 0);
        }
        root.children.push(n);
    }
    out.push(("properties", Tree::new(root).encode().unwrap()));

    // 3-byte properties with empty names, refused after decoding.
    let mut b = vec![1u8];
    varint(65, &mut b);
    b.extend([0, 0, 0, 0]);
    for i in 0..64 {
        b.push(0);
        let n = name(i);
        varint(n.len() as u64, &mut b);
        b.extend(n.as_bytes());
        b.push(0);
        varint(limits.max_props as u64, &mut b);
        for _ in 0..limits.max_props {
            b.extend([0, 0, 0]);
        }
    }
    out.push(("properties, empty names", b));

    // Small trees, where fixed costs weigh most.
    out.push((
        "one node",
        Tree::new(Node::root("kho-root-v1")).encode().unwrap(),
    ));
    let mut root = Node::root("");
    for i in 1..100 {
        root.children.push(Node::new(name(i), ""));
    }
    out.push(("100 nodes", Tree::new(root).encode().unwrap()));
    out
}

#[test]
fn tree_decode_stays_within_its_bound() {
    let _only = exclusive();
    for (what, bytes) in adversarial_trees() {
        let (result, peak) = peak_of(|| Tree::decode(&bytes, &TreeLimits::DEFAULT));
        let bound = TREE_FACTOR * bytes.len() + SLACK;
        eprintln!(
            "[memory] Tree::decode, {what}: {} bytes in, peak {peak} bytes ({:.1}x), {}",
            bytes.len(),
            peak as f64 / bytes.len() as f64,
            if result.is_ok() { "decoded" } else { "refused" },
        );
        assert!(peak <= bound, "{what}: peak {peak} > bound {bound}");
    }
}

/// An image with every section: a map of many blocks of several orders,
/// slab pages, extents, and `tree` as its TREE section.
fn image_with_tree(tree: Vec<u8>) -> Vec<u8> {
    let arena = 1u64 << 40;
    let mut map = PreservedMap::new(Pfn(arena >> 12));
    // Scattered order-0 folios: one block each.
    for i in 0..512u64 {
        map.preserve(Pfn(i * 4096 * 3 + 7), Order::ZERO).unwrap();
    }
    map.preserve_folios(Pfn(1 << 24), Order::new(9).unwrap(), 64)
        .unwrap();
    map.preserve(Pfn(1 << 25), Order::new(18).unwrap()).unwrap();
    let cache = SlabCacheInfo {
        id: 1,
        name: "c".into(),
        object_size: 64,
        align: 8,
        objects_per_slab: 64,
        order: Order::ZERO,
    };
    let pages = (0..64u64)
        .map(|i| SlabPageInfo {
            pfn: Pfn(i * 4096 * 3 + 7),
            cache_id: 1,
            order: Order::ZERO,
            object_size: 64,
            object_count: 64,
            first_offset: 0,
            bitmap: vec![0x5555],
        })
        .collect();
    let base = ImageBuilder::new(arena)
        .memmap(&map)
        .scratch(vec![PhysRange::new(PhysAddr(0x1000), 0x1000)])
        .kfence(vec![PhysRange::new(PhysAddr(0x2000), 0x1000)])
        .slab(vec![cache], pages)
        .extents(vec![Extent {
            range: PhysRange::new(PhysAddr(1 << 37), 1 << 30),
            tag: 1,
        }])
        .build()
        .unwrap();
    if tree.is_empty() {
        return base;
    }
    // The builder refuses a tree its reader would: assemble by hand.
    let mut raw = RawImage::from_image(&Image::parse(&base).unwrap());
    raw.set_payload(SectionKind::Tree, tree);
    raw.to_bytes()
}

#[test]
fn image_parse_allocates_only_the_tree() {
    let _only = exclusive();
    // Without a tree, parsing allocates only the cursors of the EXTENTS
    // merge, however many blocks, ranges and records there are.
    let bytes = image_with_tree(Vec::new());
    let (blocks, peak) = peak_of(|| Image::parse(&bytes).map(|i| i.block_count()));
    assert!(blocks.unwrap() > 500);
    eprintln!(
        "[memory] Image::parse, no tree: {} bytes in, peak {peak} bytes",
        bytes.len()
    );
    assert!(peak <= 8192, "peak {peak} without a tree");

    // With a hostile tree (or one refused after decoding), the tree's own
    // bound holds for the whole parse.
    for (what, tree) in adversarial_trees() {
        let tree_len = tree.len();
        let bytes = image_with_tree(tree);
        let (result, peak) = peak_of(|| Image::parse(&bytes).map(|i| i.tree().is_some()));
        let bound = TREE_FACTOR * tree_len + SLACK;
        eprintln!(
            "[memory] Image::parse, {what}: {} bytes in ({tree_len} of tree), peak {peak} bytes, {}",
            bytes.len(),
            if result.is_ok() { "parsed" } else { "refused" },
        );
        assert!(peak <= bound, "{what}: peak {peak} > bound {bound}");
    }
}

#[test]
fn restore_and_rebuild_stay_within_the_memmap() {
    let _only = exclusive();
    let bytes = image_with_tree(Vec::new());
    let image = Image::parse(&bytes).unwrap();
    let memmap = image.section(SectionKind::Memmap).unwrap().len as usize;
    let (restored, peak) = peak_of(|| {
        let mut r = Restorer::new(&image);
        r.restore_all().count()
    });
    assert_eq!(restored as u64, image.folio_count());
    eprintln!("[memory] Restorer: MEMMAP {memmap} bytes, peak {peak} bytes");
    assert!(peak <= memmap, "restorer peak {peak} > MEMMAP {memmap}");

    let (map, peak) = peak_of(|| image.to_map());
    assert_eq!(map.folio_count(), image.folio_count());
    eprintln!("[memory] Image::to_map: MEMMAP {memmap} bytes, peak {peak} bytes");
    assert!(
        peak <= 2 * memmap,
        "to_map peak {peak} > 2 x MEMMAP {memmap}"
    );
}
