//! Freeze, commit and restore: in one process, across processes, and the
//! refusals.

use std::process::Command;

use kho_alloc::{Arena, ArenaConfig, Error, GfpFlags, Heap, Obj, Region};
use kho_core::{
    Image, ImageBuilder, Node, Order, Pfn, PhysAddr, PhysRange, PreservedMap, Tree, PAGE_SIZE,
};

use crate::common::{checksum, populate, OBJ};

const ROLE: &str = "KHO_ALLOC_TEST_ROLE";
const PATH: &str = "KHO_ALLOC_TEST_ARENA";

fn cfg() -> ArenaConfig {
    ArenaConfig::with_size(32 << 20)
}

/// What the predecessor left: live objects' checksum and a preserved folio.
struct Written {
    objects: usize,
    sum: u64,
    folio: PhysRange,
}

/// Predecessor: a cache with live and freed objects, a preserved folio of
/// general memory, a tree pointing at it; freeze and commit.
fn write_state(heap: &Heap) -> Written {
    let kv = heap.cache("kv", OBJ, 8).unwrap();
    let mut objs = populate(heap, &kv, 1000);
    // Free every third object: free slots to scrub and to reuse.
    let mut keep: Vec<Obj> = Vec::new();
    for (i, o) in objs.drain(..).enumerate() {
        if i % 3 == 0 {
            kv.free(o).unwrap();
        } else {
            keep.push(o);
        }
    }
    keep.sort_by_key(|o| o.addr());
    let sum = checksum(keep.iter().map(|o| (o.addr().0, heap.bytes(o).unwrap())));
    let mut pages = heap
        .alloc_pages(Order::new(2).unwrap(), GfpFlags::NONE)
        .unwrap();
    heap.page_bytes_mut(&mut pages).unwrap().fill(0x5a);
    heap.preserve_pages(&pages).unwrap();
    let folio = pages.range();
    heap.add_extent(folio, 7);
    let tree = Tree::new(
        Node::root("kho-alloc-test-v1")
            .with_u64("objects", keep.len() as u64)
            .with_u64("checksum", sum)
            .with_range("table", folio),
    );
    let (generation, stats) = heap.freeze_and_commit(Some(&tree)).unwrap();
    assert_eq!(generation, 2);
    assert_eq!(stats.live_objects, keep.len() as u64);
    assert!(stats.scrubbed_bytes >= 334 * u64::from(OBJ));
    // The objects stay allocated in this process; leaking the handles is
    // what a predecessor about to exit does.
    keep.into_iter().for_each(|o| {
        o.leak();
    });
    pages.leak();
    Written {
        objects: 666,
        sum,
        folio,
    }
}

/// Successor: restore and check everything.
fn check_restored(arena: Arena, expect: Option<&Written>) -> Heap {
    let (heap, mut restored) = Heap::restore(arena).unwrap();
    let tree = restored.tree.clone().expect("tree");
    let root = tree.root();
    root.expect_compatible("kho-alloc-test-v1").unwrap();
    let objects = root.u64_prop("objects").unwrap() as usize;
    let sum = root.u64_prop("checksum").unwrap();
    let table = root.range_prop("table").unwrap();
    if let Some(w) = expect {
        assert_eq!((objects, sum, table), (w.objects, w.sum, w.folio));
    }
    assert_eq!(restored.extents.len(), 1);
    assert_eq!(restored.extents[0].range, table);

    let pages = restored
        .take_folio(PhysAddr(table.start).pfn())
        .expect("preserved folio");
    assert!(heap.page_bytes(&pages).unwrap().iter().all(|&b| b == 0x5a));

    let rc = restored.cache_mut("kv").expect("kv cache");
    assert_eq!(rc.len(), objects);
    let addrs: Vec<PhysAddr> = rc.addrs().collect();
    assert!(addrs.windows(2).all(|w| w[0] < w[1]));
    let live: Vec<Obj> = addrs.iter().map(|&a| rc.take(a).unwrap()).collect();
    assert!(rc.is_empty() && rc.take(addrs[0]).is_none());
    let got = checksum(live.iter().map(|o| (o.addr().0, heap.bytes(o).unwrap())));
    assert_eq!(got, sum, "live object checksum");

    // The cache continues: new objects never overlap restored ones, and
    // restored objects can be freed and reused.
    let kv = heap.cache("kv", OBJ, 8).unwrap();
    assert_eq!(kv.live(), objects as u64);
    let fresh: Vec<Obj> = (0..500)
        .map(|_| kv.alloc(GfpFlags::ZERO).unwrap())
        .collect();
    for f in &fresh {
        assert!(live.iter().all(|o| !o.range().overlaps(f.range())));
        assert!(!f.range().overlaps(table));
        assert!(heap.bytes(f).unwrap().iter().all(|&b| b == 0));
    }
    for o in live.into_iter().chain(fresh) {
        kv.free(o).unwrap();
    }
    assert_eq!(kv.live(), 0);
    heap.free_pages(pages).unwrap();
    // Same-geometry checks.
    assert!(matches!(
        heap.cache("kv", 128, 8),
        Err(Error::CacheMismatch { .. })
    ));
    heap
}

#[test]
fn round_trip_in_one_process() {
    let arena = Arena::heap(&cfg()).unwrap();
    let heap = Heap::new(arena).unwrap();
    let w = write_state(&heap);
    let arena = heap.into_arena().unwrap();
    let heap = check_restored(arena, Some(&w));
    // A second restore of the same image is refused.
    let arena = heap.into_arena().unwrap();
    assert!(matches!(
        Heap::restore(arena),
        Err(Error::AlreadyRestored { .. })
    ));
}

#[test]
#[cfg_attr(miri, ignore = "files, mmap and processes")]
fn round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arena");
    let w = {
        let heap = Heap::new(Arena::create_file(&path, &cfg()).unwrap()).unwrap();
        write_state(&heap)
    };
    check_restored(Arena::open(&path).unwrap(), Some(&w));
    assert!(matches!(
        Heap::restore(Arena::open(&path).unwrap()),
        Err(Error::AlreadyRestored { .. })
    ));
    assert!(matches!(
        Heap::restore(Arena::open_readonly(&path).unwrap()),
        Err(Error::ReadOnly)
    ));
}

/// Parent writes an arena file, a re-executed copy of this test binary
/// restores it and verifies every live object's checksum.
#[test]
#[cfg_attr(miri, ignore = "files, mmap and processes")]
fn round_trip_across_processes() {
    if std::env::var(ROLE).as_deref() == Ok("child") {
        let path = std::env::var(PATH).unwrap();
        check_restored(Arena::open(&path).unwrap(), None);
        println!("child restored {path}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arena");
    {
        let heap = Heap::new(Arena::create_file(&path, &cfg()).unwrap()).unwrap();
        write_state(&heap);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "handover::round_trip_across_processes",
            "--nocapture",
        ])
        .env(ROLE, "child")
        .env(PATH, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child restored"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The child recorded the restore in the superblock.
    assert!(Arena::open_readonly(&path).unwrap().image_restored());
}

/// The same through a memfd inherited across exec: the child uses the
/// descriptor it inherited, never a reopen of it.
#[test]
#[cfg(not(miri))]
fn round_trip_through_inherited_memfd() {
    if std::env::var(ROLE).as_deref() == Ok("memfd-child") {
        let arena = kho_alloc::session::inherited_arena()
            .unwrap()
            .expect("an inherited arena");
        let fd = std::os::fd::AsRawFd::as_raw_fd(arena.file().unwrap());
        assert_eq!(kho_alloc::session::cloexec(fd), Some(true));
        assert!(std::env::var_os(kho_alloc::session::ARENA_FD_ENV).is_none());
        check_restored(arena, None);
        println!("child restored memfd {fd}");
        return;
    }
    let arena = Arena::create_memfd("kho-test", &cfg()).unwrap();
    let fd = arena.inheritable_fd().unwrap();
    let heap = Heap::new(arena).unwrap();
    write_state(&heap);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "handover::round_trip_through_inherited_memfd",
            "--nocapture",
        ])
        .env(ROLE, "memfd-child")
        .env(kho_alloc::session::ARENA_FD_ENV, fd.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child restored memfd"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A session handover through a memfd inherited by a new program: the
/// parent commits and passes [`Session::exec_env`]; the child takes the
/// descriptor with `inherited_arena`, restores and verifies every entry.
#[test]
#[cfg(not(miri))]
fn session_handover_through_an_inherited_memfd() {
    use std::sync::{Arc, RwLock};

    use kho_alloc::kv::demo::fill_value;
    use kho_alloc::kv::{KvConfig, KvHandle, KvStore, KvSubsystem};
    use kho_alloc::session::{self, Session, Start};

    const N: u64 = 2000;
    let kv_cfg = KvConfig {
        capacity: N,
        value_size: 32,
    };
    if std::env::var(ROLE).as_deref() == Ok("session-child") {
        let arena = session::inherited_arena().unwrap().expect("inherited");
        let fd = std::os::fd::AsRawFd::as_raw_fd(arena.file().unwrap());
        assert_eq!(session::cloexec(fd), Some(true), "FD_CLOEXEC set again");
        let (mut s, start) = Session::start(arena).unwrap();
        assert_eq!(start, Start::Handover { generation: 2 });
        let kv: KvHandle = Arc::new(RwLock::new(None));
        s.register(Box::new(KvSubsystem::new("kv", Arc::clone(&kv), kv_cfg)))
            .unwrap();
        s.restore().unwrap();
        s.finish().unwrap();
        let g = kv.read().unwrap();
        let store = g.as_ref().unwrap();
        let mut want = vec![0u8; 32];
        let r = store
            .verify(|k, v| {
                fill_value(k, &mut want);
                v == want.as_slice()
            })
            .unwrap();
        assert!(r.consistent && r.good == N, "{r:?}");
        println!("child verified {} digest {:#x}", r.good, r.digest);
        return;
    }
    let heap = Heap::new(Arena::create_memfd("kho-session-test", &cfg()).unwrap()).unwrap();
    let mut store = KvStore::new(&heap, kv_cfg).unwrap();
    let mut v = vec![0u8; 32];
    for k in 0..N {
        fill_value(k, &mut v);
        store.insert(k, &v).unwrap();
    }
    let digest = store.digest();
    let kv: KvHandle = Arc::new(RwLock::new(Some(store)));
    let mut s = Session::new(&heap);
    s.register(Box::new(KvSubsystem::new("kv", Arc::clone(&kv), kv_cfg)))
        .unwrap();
    s.prepare().unwrap();
    s.freeze_and_commit().unwrap();
    let (var, fd) = s.exec_env().unwrap();
    let fd_number: i32 = fd.parse().unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "handover::session_handover_through_an_inherited_memfd",
            "--nocapture",
        ])
        .env(ROLE, "session-child")
        .env(var, fd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("child verified {N} digest {digest:#x}")),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The child recorded the restore through the shared memfd.
    assert!(current_slot_restored(fd_number));
    drop(s);
}

/// Whether the current superblock slot of the arena open at `fd` has the
/// restored flag (layout: `superblock.rs`; flags at 0x5c, generation at
/// 0x60). Read through a read-only descriptor of its own.
#[cfg_attr(miri, allow(dead_code))]
fn current_slot_restored(fd: i32) -> bool {
    let file = std::fs::File::open(format!("/proc/self/fd/{fd}")).unwrap();
    let mut sb = vec![0u8; 2 * PAGE_SIZE as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut sb, 0).unwrap();
    let (p0, p1) = sb.split_at(PAGE_SIZE as usize);
    let field = |p: &[u8]| {
        (
            u32::from_le_bytes(p[0x5c..0x60].try_into().unwrap()),
            u64::from_le_bytes(p[0x60..0x68].try_into().unwrap()),
        )
    };
    let ((f0, g0), (f1, g1)) = (field(p0), field(p1));
    (if g0 > g1 { f0 } else { f1 }) & 1 == 1
}

/// After freeze every free slot and tail of every preserved slab page
/// reads zero, and live objects are intact.
#[test]
#[cfg_attr(miri, ignore = "files, mmap and processes")]
fn freeze_scrubs_free_slots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arena");
    let heap = Heap::new(Arena::create_file(&path, &cfg()).unwrap()).unwrap();
    // 96-byte objects leave a 64-byte tail in each page.
    let c = heap.cache("odd", 96, 32).unwrap();
    let mut objs = Vec::new();
    for i in 0..500u64 {
        let mut o = c.alloc(GfpFlags::NONE).unwrap();
        heap.bytes_mut(&mut o).unwrap().fill(0xaa);
        if i % 2 == 0 {
            objs.push(o);
        } else {
            c.free(o).unwrap();
        }
    }
    // Generic preservable allocations are recorded too.
    let mut p = heap.alloc(40, GfpFlags::PRESERVE).unwrap();
    heap.bytes_mut(&mut p).unwrap().fill(0xbb);
    heap.freeze_and_commit(None).unwrap();
    drop(c);
    drop(heap);

    let arena = Arena::open_readonly(&path).unwrap();
    let image = Image::parse(arena.image_bytes().unwrap()).unwrap();
    let mut pages = 0;
    let mut live = 0;
    for page in image.slab_pages() {
        pages += 1;
        let folio = arena
            .bytes(PhysRange::new(
                page.pfn().addr().unwrap(),
                page.order().bytes(),
            ))
            .unwrap();
        let size = page.object_size() as usize;
        for i in 0..page.object_count() {
            let slot = &folio[i as usize * size..(i as usize + 1) * size];
            if page.is_allocated(i) {
                live += 1;
                // A 96-byte object, or a 40-byte one whose slack is zero.
                let whole = slot.iter().all(|&b| b == 0xaa);
                let (head, slack) = slot.split_at(40.min(slot.len()));
                let small = head.iter().all(|&b| b == 0xbb) && slack.iter().all(|&b| b == 0);
                assert!(whole || small, "live slot {i} of {:?}", page.pfn());
            } else {
                assert!(
                    slot.iter().all(|&b| b == 0),
                    "stale slot {i} of {:?}",
                    page.pfn()
                );
            }
        }
        let tail = &folio[page.object_count() as usize * size..];
        assert!(
            tail.iter().all(|&b| b == 0),
            "stale tail of {:?}",
            page.pfn()
        );
        assert_eq!(
            image.is_preserved(page.pfn()).map(|p| p.1),
            Some(page.order())
        );
    }
    assert_eq!(live, 251);
    assert!(pages >= 2);
    let names: Vec<&str> = image.slab_caches().map(|c| c.name()).collect();
    assert!(names.contains(&"odd") && names.contains(&"kmalloc-p-64"));
    objs.into_iter().for_each(|o| {
        o.leak();
    });
    p.leak();
}

#[test]
fn refusals_are_typed() {
    let heap = Heap::new(Arena::heap(&cfg()).unwrap()).unwrap();
    let l = *heap.layout();
    for (range, region) in [
        (l.scratch, "scratch"),
        (l.kfence, "kfence"),
        (l.superblock, "superblock"),
    ] {
        let r = PhysRange::new(range.start.addr().unwrap(), PAGE_SIZE);
        match heap.preserve_range(r) {
            Err(Error::PreserveRefused { region: got, .. }) => assert_eq!(got, region),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            heap.preserve_folio(kho_core::Folio {
                pfn: range.start,
                order: Order::ZERO
            }),
            Err(Error::PreserveRefused { .. })
        ));
    }
    // A range straddling general memory and past the end.
    let end = PhysRange::new(PhysAddr(heap.size() - PAGE_SIZE), 2 * PAGE_SIZE);
    assert!(heap.preserve_range(end).is_err());
    // Preserving twice is a map error.
    let p = heap.alloc_pages(Order::ZERO, GfpFlags::NONE).unwrap();
    heap.preserve_pages(&p).unwrap();
    assert!(matches!(heap.preserve_pages(&p), Err(Error::Map(_))));
    assert!(heap.is_preserved(p.folio().pfn));
    assert!(!heap.is_preserved(l.kfence.start));
    assert!(heap.is_preserved(l.preservable.start));
    heap.free_pages(p).unwrap();
    assert_eq!(heap.stats().preserved_folios, 0);

    // No image yet.
    let arena = heap.into_arena().unwrap();
    assert!(matches!(Heap::restore(arena), Err(Error::NoImage)));
}

#[test]
fn geometry_mismatch_is_refused() {
    let mut arena = Arena::heap(&cfg()).unwrap();
    let bytes = ImageBuilder::new(64 << 20).build().unwrap();
    let at = arena.layout().general.start.addr().unwrap();
    arena.write(at, &bytes).unwrap();
    arena
        .commit_image(kho_alloc::ImageLocation {
            offset: at.0,
            len: bytes.len() as u64,
            crc: crc32fast::hash(&bytes),
        })
        .unwrap();
    match Heap::restore(arena) {
        Err(Error::GeometryMismatch {
            expected, found, ..
        }) => assert_eq!((expected, found), (32 << 20, 64 << 20)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn corrupt_image_is_refused() {
    let heap = Heap::new(Arena::heap(&cfg()).unwrap()).unwrap();
    let frozen = heap.freeze(None).unwrap();
    let loc = frozen.location();
    heap.commit(frozen).unwrap();
    let mut arena = heap.into_arena().unwrap();
    arena.write(PhysAddr(loc.offset + 8), &[0xff]).unwrap();
    assert!(matches!(
        Heap::restore(arena),
        Err(Error::Inconsistent {
            what: "image crc32",
            ..
        })
    ));
}

#[test]
fn discard_and_recommit_free_image_pages() {
    let heap = Heap::new(Arena::heap(&cfg()).unwrap()).unwrap();
    let before = heap.stats().general.free_pages;
    let f = heap.freeze(None).unwrap();
    heap.discard(f).unwrap();
    assert_eq!(heap.stats().general.free_pages, before);
    heap.freeze_and_commit(None).unwrap();
    let one = heap.stats().general.free_pages;
    let (g, _) = heap.freeze_and_commit(None).unwrap();
    assert_eq!(g, 3);
    // The previous image folio was freed when the new one was published.
    assert_eq!(heap.stats().general.free_pages, one);
    let other = Heap::new(Arena::heap(&cfg()).unwrap()).unwrap();
    let f = other.freeze(None).unwrap();
    assert!(matches!(heap.commit(f), Err(Error::WrongHeap { .. })));
    let _ = Pfn(0);
}

/// The image lies in a folio that its own MEMMAP preserves (headed at the
/// image's first page, covering it); restore claims that folio for the heap
/// and does not hand it to subsystems; an image outside preserved memory is
/// refused.
#[test]
fn the_image_lies_in_a_folio_it_preserves() {
    let heap = Heap::new(Arena::anonymous(&cfg()).unwrap()).unwrap();
    let written = write_state(&heap);
    let loc = heap.current_image().unwrap();
    let arena = heap.into_arena().unwrap();
    let image_bytes = arena.image_bytes().unwrap().to_vec();
    let image = Image::parse(&image_bytes).unwrap();
    let head = PhysAddr(loc.offset).aligned_pfn().unwrap();
    let (found, order) = image.is_preserved(head).expect("image folio preserved");
    assert_eq!(found, head);
    assert!(order.bytes() >= loc.len);
    let (_heap, restored) = Heap::restore(arena).unwrap();
    assert!(restored.folios.iter().all(|p| p.folio().pfn != head));
    assert!(restored.folios.iter().any(|p| p.range() == written.folio));
}

#[test]
fn restore_refuses_an_image_outside_preserved_memory() {
    let mut arena = Arena::anonymous(&cfg()).unwrap();
    let layout = *arena.layout();
    // A valid image that preserves nothing, written into general memory.
    let bytes = ImageBuilder::new(layout.size())
        .generation(2)
        .scratch(vec![layout.bytes_of(Region::Scratch)])
        .kfence(vec![layout.bytes_of(Region::Kfence)])
        .build()
        .unwrap();
    let at = layout.general.start.addr().unwrap();
    arena.write(at, &bytes).unwrap();
    arena
        .commit_image(kho_alloc::ImageLocation {
            offset: at.0,
            len: bytes.len() as u64,
            crc: crc32fast::hash(&bytes),
        })
        .unwrap();
    match Heap::restore(arena) {
        Err(Error::Inconsistent { addr, .. }) => assert_eq!(addr, at.0),
        other => panic!("expected Inconsistent, got {:?}", other.map(|_| ())),
    }
}

/// The bytes of the image's folio past the image are zero, even when the
/// folio held other data before.
#[test]
fn the_image_folio_tail_is_scrubbed() {
    let heap = Heap::new(Arena::heap(&cfg()).unwrap()).unwrap();
    // Dirty the general zone's first folios, then give them back.
    let mut junk = Vec::new();
    for _ in 0..8 {
        let mut p = heap
            .alloc_pages(Order::new(4).unwrap(), GfpFlags::NONE)
            .unwrap();
        heap.page_bytes_mut(&mut p).unwrap().fill(0xee);
        junk.push(p);
    }
    for p in junk {
        heap.free_pages(p).unwrap();
    }
    let frozen = heap.freeze(None).unwrap();
    let loc = frozen.location();
    heap.commit(frozen).unwrap();
    let arena = heap.into_arena().unwrap();
    let image = Image::parse(arena.image_bytes().unwrap()).unwrap();
    let (head, order) = image
        .is_preserved(PhysAddr(loc.offset).aligned_pfn().unwrap())
        .unwrap();
    let folio = arena
        .bytes(PhysRange::new(head.addr().unwrap(), order.bytes()))
        .unwrap();
    assert!(order.bytes() > loc.len, "the folio has a tail");
    let tail = &folio[loc.len as usize..];
    assert!(
        tail.iter().all(|&b| b == 0),
        "stale bytes in the image folio's tail"
    );
}

/// Dropping a frozen image frees its folio; a commit refused because
/// another came first frees it too.
#[test]
fn frozen_images_never_leak() {
    let heap = Heap::new(Arena::heap(&cfg()).unwrap()).unwrap();
    let before = heap.stats().general.allocated_pages;
    drop(heap.freeze(None).unwrap());
    assert_eq!(heap.stats().general.allocated_pages, before);

    let older = heap.freeze(None).unwrap();
    let newer = heap.freeze(None).unwrap();
    assert_eq!((older.generation(), newer.generation()), (2, 2));
    assert_eq!(heap.commit(newer).unwrap(), 2);
    let one = heap.stats().general.allocated_pages;
    match heap.commit(older) {
        Err(Error::Inconsistent {
            expected, found, ..
        }) => assert_eq!((expected, found), (3, 2)),
        other => panic!("{other:?}"),
    }
    assert_eq!(heap.generation(), 2);
    // The refused image's folio is gone; the published one stays.
    assert!(heap.stats().general.allocated_pages < one);
    let arena = heap.into_arena().unwrap();
    assert_eq!(
        Image::parse(arena.image_bytes().unwrap())
            .unwrap()
            .header()
            .generation,
        2
    );
}

/// Write an image built by `edit` from a valid one into general memory,
/// inside a folio its MEMMAP preserves, and publish it.
fn commit_built(arena: &mut Arena, edit: impl FnOnce(ImageBuilder) -> ImageBuilder) {
    let layout = *arena.layout();
    let head = layout.general.start;
    let order = Order::new(2).unwrap();
    let mut map = PreservedMap::new(Pfn(layout.pages));
    map.preserve(head, order).unwrap();
    let builder = ImageBuilder::new(layout.size())
        .generation(arena.generation() + 1)
        .memmap(&map)
        .scratch(vec![layout.bytes_of(Region::Scratch)])
        .kfence(vec![layout.bytes_of(Region::Kfence)]);
    let bytes = edit(builder).build().unwrap();
    assert!(bytes.len() as u64 <= order.bytes());
    let at = head.addr().unwrap();
    arena.write(at, &bytes).unwrap();
    arena
        .commit_image(kho_alloc::ImageLocation {
            offset: at.0,
            len: bytes.len() as u64,
            crc: crc32fast::hash(&bytes),
        })
        .unwrap();
}

/// A change to a valid image.
type Edit = Box<dyn FnOnce(ImageBuilder) -> ImageBuilder>;

#[test]
fn restore_checks_generation_and_regions_against_the_arena() {
    // The unedited image restores.
    let mut arena = Arena::heap(&cfg()).unwrap();
    commit_built(&mut arena, |b| b);
    Heap::restore(arena).unwrap();

    let layout = *Arena::heap(&cfg()).unwrap().layout();
    let scratch = layout.bytes_of(Region::Scratch);
    let kfence = layout.bytes_of(Region::Kfence);
    let cases: [(&str, Edit); 5] = [
        ("generation", Box::new(|b| b.generation(7))),
        ("no scratch", Box::new(|b| b.scratch(Vec::new()))),
        (
            "moved scratch",
            Box::new(move |b| {
                b.scratch(vec![PhysRange::new(
                    PhysAddr(scratch.start + PAGE_SIZE),
                    scratch.len - PAGE_SIZE,
                )])
            }),
        ),
        (
            "kfence beyond its region",
            Box::new(move |b| {
                b.kfence(vec![PhysRange::new(
                    PhysAddr(kfence.start),
                    kfence.len + PAGE_SIZE,
                )])
            }),
        ),
        (
            "kfence in general memory",
            Box::new(move |b| {
                let general = layout.bytes_of(Region::General);
                let last = PhysAddr(general.start + general.len - PAGE_SIZE);
                b.kfence(vec![PhysRange::new(last, PAGE_SIZE)])
            }),
        ),
    ];
    for (what, edit) in cases {
        let mut arena = Arena::heap(&cfg()).unwrap();
        commit_built(&mut arena, edit);
        match Heap::restore(arena) {
            Err(Error::Inconsistent {
                what: w,
                expected: 2,
                found: 7,
                ..
            }) if what == "generation" => {
                assert!(w.contains("generation"), "{w}");
            }
            Err(Error::GeometryMismatch { what: w, .. }) if what != "generation" => {
                assert!(
                    w.contains(if what.contains("kfence") {
                        "KFENCE"
                    } else {
                        "SCRATCH"
                    }),
                    "{what}: {w}"
                );
            }
            other => panic!("{what}: {:?}", other.map(|_| ())),
        }
    }
}

/// A refused restore writes nothing: the arena file is byte for byte what
/// it was, and a reopen restores once the cause is gone.
#[test]
#[cfg_attr(miri, ignore = "files and mmap")]
fn a_refused_restore_leaves_the_file_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("arena");
    {
        let mut arena = Arena::create_file(&path, &cfg()).unwrap();
        commit_built(&mut arena, |b| b.generation(9));
    }
    let before = std::fs::read(&path).unwrap();
    assert!(Heap::restore(Arena::open(&path).unwrap()).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
}
