//! What a heap refuses: a fresh heap over a pending handover, restores of
//! images that do not match the arena (each leaving the arena's bytes as
//! they were), and misuse of preservation.

use kho_alloc::{Arena, ArenaConfig, Error, Heap};

fn cfg() -> ArenaConfig {
    ArenaConfig::with_size(8 << 20)
}

#[test]
fn a_fresh_heap_refuses_a_pending_handover() {
    let heap = Heap::new(Arena::heap(&cfg()).unwrap()).unwrap();
    heap.freeze_and_commit(None).unwrap();
    let arena = heap.into_arena().unwrap();
    let image = arena.current_image().unwrap();
    match Heap::new(arena) {
        Err(Error::PendingHandover { generation, offset }) => {
            assert_eq!((generation, offset), (2, image.offset));
        }
        other => panic!("{other:?}"),
    }
    // Discarding the image explicitly lets a fresh heap start.
    let heap = Heap::new(Arena::heap(&cfg()).unwrap()).unwrap();
    heap.freeze_and_commit(None).unwrap();
    let arena = heap.into_arena().unwrap();
    assert_eq!(arena.discard_image().unwrap(), 3);
    assert_eq!(arena.current_image(), None);
    // Nothing to discard: nothing written.
    assert_eq!(arena.discard_image().unwrap(), 3);
    let heap = Heap::new(arena).unwrap();
    assert_eq!(heap.generation(), 3);

    // A restored image is no longer pending.
    heap.freeze_and_commit(None).unwrap();
    let (heap, _) = Heap::restore(heap.into_arena().unwrap()).unwrap();
    Heap::new(heap.into_arena().unwrap()).unwrap();
}

#[test]
#[cfg_attr(miri, ignore = "files and mmap")]
fn a_refused_fresh_heap_leaves_the_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arena");
    Heap::new(Arena::create_file(&path, &cfg()).unwrap())
        .unwrap()
        .freeze_and_commit(None)
        .unwrap();
    let before = std::fs::read(&path).unwrap();
    assert!(matches!(
        Heap::new(Arena::open(&path).unwrap()),
        Err(Error::PendingHandover { generation: 2, .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

// ---- restores of images that do not fit the arena -------------------------

use kho_alloc::Layout;
use kho_core::{
    ImageBuilder, Order, ParseError, Pfn, PreservedMap, SlabCacheInfo, SlabPageInfo, PAGE_SIZE,
};

/// A slab image: what goes into it, built by `ImageBuilder` (an invalid one
/// is written anyway: the builder writes all bytes before its self-check).
struct Spec {
    /// Where the image goes (its own folio, preserved by its MEMMAP).
    at: Pfn,
    caches: Vec<SlabCacheInfo>,
    pages: Vec<SlabPageInfo>,
}

fn cache64(id: u32, per_slab: u32) -> SlabCacheInfo {
    SlabCacheInfo {
        id,
        name: "c".into(),
        object_size: 64,
        align: 8,
        objects_per_slab: per_slab,
        order: Order::ZERO,
    }
}

fn page64(pfn: Pfn, cache_id: u32, order: Order, count: u32, bitmap: Vec<u64>) -> SlabPageInfo {
    SlabPageInfo {
        pfn,
        cache_id,
        order,
        object_size: 64,
        object_count: count,
        first_offset: 0,
        bitmap,
    }
}

fn image_bytes(l: &Layout, spec: &Spec) -> Vec<u8> {
    let mut map = PreservedMap::new(Pfn(l.pages));
    map.preserve(spec.at, Order::ZERO).unwrap();
    for p in &spec.pages {
        map.preserve(p.pfn, p.order).unwrap();
    }
    let scratch = l.bytes_of(kho_alloc::Region::Scratch);
    let builder = ImageBuilder::new(l.size())
        .generation(2)
        .memmap(&map)
        .scratch(if scratch.len == 0 {
            vec![]
        } else {
            vec![scratch]
        })
        .slab(spec.caches.clone(), spec.pages.clone());
    let mut out = vec![0u8; builder.encoded_len() as usize];
    let _ = builder.write_to(&mut out);
    assert!(out.len() as u64 <= PAGE_SIZE);
    out
}

fn commit(arena: &mut Arena, spec: &Spec) {
    let bytes = image_bytes(arena.layout(), spec);
    let at = spec.at.addr().unwrap();
    arena.write(at, &bytes).unwrap();
    arena
        .commit_image(kho_alloc::ImageLocation {
            offset: at.0,
            len: bytes.len() as u64,
            crc: crc32fast::hash(&bytes),
        })
        .unwrap();
}

/// Restore an arena holding `spec`'s image: on heap memory, and (outside
/// Miri) from a file, whose bytes the failed restore must leave as they
/// were. Returns the error.
fn refused_restore(spec: impl Fn(&Layout) -> Spec) -> Error {
    let mut arena = Arena::heap(&cfg()).unwrap();
    let s = spec(arena.layout());
    commit(&mut arena, &s);
    let err = match Heap::restore(arena) {
        Err(e) => e,
        Ok(_) => panic!("restore accepted the image"),
    };
    #[cfg(not(miri))]
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        let mut arena = Arena::create_file(&path, &cfg()).unwrap();
        let s = spec(arena.layout());
        commit(&mut arena, &s);
        drop(arena);
        let before = std::fs::read(&path).unwrap();
        let again = Heap::restore(Arena::open(&path).unwrap()).map(|_| ());
        assert_eq!(
            format!("{:?}", again.unwrap_err()),
            format!("{err:?}"),
            "file and heap arenas disagree"
        );
        assert_eq!(std::fs::read(&path).unwrap(), before, "{err}");
    }
    err
}

fn inconsistent(e: Error) -> (&'static str, u64) {
    match e {
        Error::Inconsistent { what, addr, .. } => (what, addr),
        other => panic!("{other:?}"),
    }
}

#[test]
fn restore_refuses_an_image_outside_general_memory() {
    let (what, addr) = inconsistent(refused_restore(|l| Spec {
        at: l.preservable.start,
        caches: vec![],
        pages: vec![],
    }));
    assert_eq!(what, "image outside general memory");
    assert_eq!(
        addr,
        cfg().layout().unwrap().preservable.start.0 * PAGE_SIZE
    );
}

#[test]
fn restore_refuses_a_slab_page_outside_the_pool() {
    let (what, addr) = inconsistent(refused_restore(|l| Spec {
        at: l.general.start,
        caches: vec![cache64(1, 64)],
        pages: vec![page64(
            Pfn(l.general.start.0 + 1),
            1,
            Order::ZERO,
            64,
            vec![1],
        )],
    }));
    assert_eq!(what, "slab page not a preserved folio of the pool");
    assert_eq!(
        addr,
        (cfg().layout().unwrap().general.start.0 + 1) * PAGE_SIZE
    );
}

#[test]
fn restore_refuses_slab_geometry_the_cache_does_not_have() {
    // A page that starts its objects where the cache's slabs do not (the
    // parser accepts any aligned start that fits the page).
    let c200 = |l: &Layout| {
        let cache = SlabCacheInfo {
            object_size: 200,
            objects_per_slab: 20,
            ..cache64(1, 20)
        };
        let page = SlabPageInfo {
            object_size: 200,
            first_offset: 64,
            ..page64(l.preservable.start, 1, Order::ZERO, 20, vec![1])
        };
        Spec {
            at: l.general.start,
            caches: vec![cache],
            pages: vec![page],
        }
    };
    let (what, addr) = inconsistent(refused_restore(c200));
    assert_eq!(what, "slab geometry");
    assert_eq!(
        addr,
        cfg().layout().unwrap().preservable.start.0 * PAGE_SIZE
    );
    // Pages that disagree with their cache's record are the parser's.
    match refused_restore(|l| Spec {
        at: l.general.start,
        caches: vec![cache64(1, 64)],
        pages: vec![page64(l.preservable.start, 1, Order::ZERO, 63, vec![1])],
    }) {
        Error::Image(ParseError::SlabPageObjectCount {
            expected: 64,
            found: 63,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let order1 = Order::new(1).unwrap();
    match refused_restore(|l| Spec {
        at: l.general.start,
        caches: vec![cache64(1, 64)],
        pages: vec![page64(l.preservable.start, 1, order1, 64, vec![1])],
    }) {
        Error::Image(ParseError::SlabPageOrder { .. }) => {}
        other => panic!("{other:?}"),
    }
    // A cache whose record disagrees with the geometry of its size.
    match refused_restore(|l| Spec {
        at: l.general.start,
        caches: vec![cache64(1, 32)],
        pages: vec![page64(l.preservable.start, 1, Order::ZERO, 32, vec![1])],
    }) {
        Error::CacheMismatch { name, .. } => assert_eq!(name, "c"),
        other => panic!("{other:?}"),
    }
    // A cache of objects no slab serves.
    match refused_restore(|l| Spec {
        at: l.general.start,
        caches: vec![SlabCacheInfo {
            object_size: 8192,
            objects_per_slab: 1,
            order: order1,
            ..cache64(1, 1)
        }],
        pages: vec![],
    }) {
        Error::BadSize { size: 8192, .. } => {}
        other => panic!("{other:?}"),
    }
}

/// Slab pages of an unknown cache, and bitmap bits past the object count,
/// are rejected by the image parser before the heap looks at them.
#[test]
fn restore_refuses_slab_records_the_parser_rejects() {
    match refused_restore(|l| Spec {
        at: l.general.start,
        caches: vec![cache64(1, 64)],
        pages: vec![page64(l.preservable.start, 7, Order::ZERO, 64, vec![1])],
    }) {
        Error::Image(ParseError::SlabUnknownCache { found: 7, .. }) => {}
        other => panic!("{other:?}"),
    }
    match refused_restore(|l| Spec {
        at: l.general.start,
        caches: vec![cache64(1, 40)],
        pages: vec![page64(
            l.preservable.start,
            1,
            Order::ZERO,
            40,
            vec![1 << 50],
        )],
    }) {
        Error::Image(ParseError::SlabBitmapTail {
            expected: 40,
            found: 50,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

/// Two valid superblock slots with different geometry: refused at open,
/// naming the field, the file untouched.
#[test]
#[cfg_attr(miri, ignore = "files")]
fn slots_that_disagree_are_refused_and_untouched() {
    use kho_alloc::superblock::Superblock;
    use std::os::unix::fs::FileExt;
    use zerocopy::IntoBytes;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arena");
    let a = Arena::create_file(&path, &cfg()).unwrap();
    let mut other = cfg();
    other.max_order = 11;
    let newer = Superblock {
        layout: other.layout().unwrap(),
        generation: a.generation() + 1,
        image: None,
        flags: 0,
    };
    drop(a);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(newer.encode().as_bytes(), PAGE_SIZE)
        .unwrap();
    drop(f);
    let before = std::fs::read(&path).unwrap();
    match Arena::open(&path) {
        Err(Error::GeometryMismatch {
            what,
            expected,
            found,
        }) => assert_eq!(
            (what, expected, found),
            ("superblock slots disagree on max order", 10, 11)
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
