//! Who may preserve what: only memory inside folios handed to owners, each
//! preserved folio inside one of them, unpreserved when its owner frees it;
//! no input makes preservation panic.

use kho_alloc::{Arena, ArenaConfig, Error, GfpFlags, Heap, Pages, Region};
use kho_core::{Folio, Image, Order, Pfn, PhysAddr, PhysRange, PAGE_SIZE};

fn heap() -> Heap {
    Heap::new(Arena::heap(&ArenaConfig::with_size(8 << 20)).unwrap()).unwrap()
}

fn page(pfn: Pfn) -> Folio {
    Folio {
        pfn,
        order: Order::ZERO,
    }
}

fn refused(r: kho_alloc::Result<()>) -> (u64, &'static str) {
    match r {
        Err(Error::NotPreservable { pfn, found, .. }) => (pfn, found),
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_memory_of_allocated_folios_is_preserved() {
    let heap = heap();
    let l = *heap.layout();
    // Free memory.
    let free = Pfn(l.general.end.0 - 1);
    assert_eq!(refused(heap.preserve_folio(page(free))), (free.0, "free"));
    let r = PhysRange::new(free.addr().unwrap(), PAGE_SIZE);
    assert_eq!(refused(heap.preserve_range(r)), (free.0, "free"));

    // A page of general objects, and a page of a preservable cache.
    let obj = heap.alloc(64, GfpFlags::NONE).unwrap();
    let p = obj.addr().pfn();
    assert_eq!(refused(heap.preserve_folio(page(p))), (p.0, "a slab page"));
    assert_eq!(
        refused(heap.preserve_obj(&obj)).1,
        "a slab page of a general size class"
    );
    let cache = heap.cache("c", 64, 8).unwrap();
    let cobj = cache.alloc(GfpFlags::NONE).unwrap();
    let cp = cobj.addr().pfn();
    assert_eq!(heap.region_of(cp), Some(Region::Preservable));
    assert_eq!(
        refused(heap.preserve_folio(page(cp))),
        (cp.0, "a slab page")
    );
    // Its slab pages are preserved at every freeze anyway.
    heap.preserve_obj(&cobj).unwrap();
    assert_eq!(heap.stats().preserved_folios, 0);

    // The heap's own committed image.
    heap.freeze_and_commit(None).unwrap();
    let img = PhysAddr(heap.current_image().unwrap().offset).pfn();
    assert_eq!(
        refused(heap.preserve_folio(page(img))),
        (img.0, "the heap's handover image")
    );

    // A folio spanning two allocations is refused; a range over both is
    // split at their boundary.
    let (a, b) = adjacent_pages(&heap);
    let two = Folio {
        pfn: a.folio().pfn,
        order: Order::new(1).unwrap(),
    };
    assert_eq!(refused(heap.preserve_folio(two)).0, b.folio().pfn.0);
    let both = PhysRange::new(a.addr(), 2 * PAGE_SIZE);
    heap.preserve_range(both).unwrap();
    assert_eq!(heap.stats().preserved_folios, 2);
    // Overlapping an existing preservation: all or nothing.
    assert!(matches!(heap.preserve_range(both), Err(Error::Map(_))));
    heap.unpreserve_range(both).unwrap();
    assert_eq!(heap.stats().preserved_folios, 0);
    assert!(matches!(heap.unpreserve_range(both), Err(Error::Map(_))));
    heap.preserve_range(both).unwrap();
    // Freeing one unpreserves exactly its part.
    let (a_pfn, b_pfn) = (a.folio().pfn, b.folio().pfn);
    heap.free_pages(a).unwrap();
    assert!(!heap.is_preserved(a_pfn));
    assert!(heap.is_preserved(b_pfn));
    assert_eq!(heap.stats().preserved_folios, 1);
    heap.free_pages(b).unwrap();
    assert_eq!(heap.stats().preserved_folios, 0);

    heap.free(obj).unwrap();
    cache.free(cobj).unwrap();
}

/// Two allocated single pages next to each other, the first at an even
/// PFN (so that together they make an aligned order-1 folio).
fn adjacent_pages(heap: &Heap) -> (Pages, Pages) {
    let mut got: Vec<Pages> = (0..16)
        .map(|_| heap.alloc_pages(Order::ZERO, GfpFlags::NONE).unwrap())
        .collect();
    got.sort_by_key(|p| p.folio().pfn);
    let i = (0..got.len() - 1)
        .find(|&i| {
            let p = got[i].folio().pfn.0;
            p % 2 == 0 && got[i + 1].folio().pfn.0 == p + 1
        })
        .expect("two adjacent pages");
    let b = got.remove(i + 1);
    let a = got.remove(i);
    for p in got {
        heap.free_pages(p).unwrap();
    }
    (a, b)
}

/// Preserving part of a folio, then freeing the folio, leaves nothing in
/// the map: the next owner's bytes never reach the successor.
#[test]
fn freeing_unpreserves_and_reuse_is_not_handed_over() {
    let heap = heap();
    let order2 = Order::new(2).unwrap();
    let mut pages = heap.alloc_pages(order2, GfpFlags::NONE).unwrap();
    heap.page_bytes_mut(&mut pages).unwrap().fill(0xa5);
    let second = Pfn(pages.folio().pfn.0 + 1);
    heap.preserve_range(PhysRange::new(second.addr().unwrap(), PAGE_SIZE))
        .unwrap();
    // Inside one allocation, a single folio is fine.
    heap.preserve_folio(page(pages.folio().pfn)).unwrap();
    assert_eq!(heap.stats().preserved_folios, 2);
    heap.free_pages(pages).unwrap();
    assert_eq!(heap.stats().preserved_folios, 0);
    // The memory is reused by someone who never preserved it.
    let mut reuse = heap.alloc_pages(order2, GfpFlags::NONE).unwrap();
    heap.page_bytes_mut(&mut reuse).unwrap().fill(0x5a);
    let frozen = heap.freeze(None).unwrap();
    let image = Image::parse(heap.frozen_bytes(&frozen).unwrap()).unwrap();
    for p in 0..4 {
        assert_eq!(image.is_preserved(Pfn(reuse.folio().pfn.0 + p)), None);
    }
    heap.discard(frozen).unwrap();
    // A preserved large object is unpreserved by its free too.
    let big = heap.alloc(3 * PAGE_SIZE as usize, GfpFlags::NONE).unwrap();
    heap.preserve_obj(&big).unwrap();
    assert_eq!(heap.stats().preserved_folios, 1);
    heap.free(big).unwrap();
    assert_eq!(heap.stats().preserved_folios, 0);
    heap.free_pages(reuse).unwrap();
}

/// `PRESERVE` above 4 KiB: a folio of the pool that crosses the handover
/// when its owner preserves it, and is released in the successor when not.
#[test]
fn large_preserve_objects_cross_when_preserved() {
    let heap = heap();
    let mut kept = heap.alloc(10_000, GfpFlags::PRESERVE).unwrap();
    let dropped = heap.alloc(10_000, GfpFlags::PRESERVE).unwrap();
    for o in [&kept, &dropped] {
        assert_eq!(heap.region_of(o.addr().pfn()), Some(Region::Preservable));
    }
    heap.bytes_mut(&mut kept).unwrap().fill(0x3c);
    heap.preserve_obj(&kept).unwrap();
    heap.unpreserve_obj(&kept).unwrap();
    heap.preserve_obj(&kept).unwrap();
    let (kept_at, dropped_at) = (kept.addr(), dropped.addr());
    let _ = (kept.leak(), dropped.leak());
    heap.freeze_and_commit(None).unwrap();
    let (heap, mut restored) = Heap::restore(heap.into_arena().unwrap()).unwrap();
    let pages = restored
        .take_folio(kept_at.pfn())
        .expect("preserved object");
    // 10,000 bytes round up to an order-2 folio.
    assert_eq!(pages.folio().order, Order::new(2).unwrap());
    assert!(heap.page_bytes(&pages).unwrap()[..10_000]
        .iter()
        .all(|&b| b == 0x3c));
    assert!(restored.take_folio(dropped_at.pfn()).is_none());
    // The unpreserved folio went back to the pool: it can be allocated.
    let again: Vec<Pages> = std::iter::from_fn(|| {
        heap.alloc_pages(Order::new(2).unwrap(), GfpFlags::PRESERVE)
            .ok()
    })
    .collect();
    assert!(again.iter().any(|p| p.addr() == dropped_at));
}

/// Wild folios and ranges are typed errors, never arithmetic overflow.
#[test]
fn no_input_makes_preservation_panic() {
    let heap = heap();
    let oob = |r: kho_alloc::Result<()>| {
        assert!(matches!(r, Err(Error::OutOfBounds { .. })), "{r:?}");
    };
    for pfn in [u64::MAX >> 1, u64::MAX, u64::MAX >> 12, heap.layout().pages] {
        for order in [0, 10] {
            let f = Folio {
                pfn: Pfn(pfn & !((1 << order) - 1)),
                order: Order::new(order).unwrap(),
            };
            oob(heap.preserve_folio(f));
            assert!(heap.unpreserve_folio(f).is_err());
        }
    }
    oob(heap.preserve_range(PhysRange::new(PhysAddr(u64::MAX - 4095), 4096)));
    oob(heap.preserve_range(PhysRange::new(PhysAddr(1 << 62), 1 << 62)));
    assert!(matches!(
        heap.preserve_range(PhysRange::new(PhysAddr(!4095), 8192)),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(heap
        .unpreserve_range(PhysRange::new(PhysAddr(!4095), 8192))
        .is_err());
    let general = heap.layout().general.start;
    assert!(matches!(
        heap.preserve_range(PhysRange::new(general.addr().unwrap(), 100)),
        Err(Error::Map(kho_core::MapError::Unaligned { .. }))
    ));
    assert!(matches!(
        heap.preserve_folio(Folio {
            pfn: Pfn(general.0 + 1),
            order: Order::new(1).unwrap()
        }),
        Err(Error::Map(kho_core::MapError::Misaligned { .. }))
    ));
    for size in [usize::MAX, 1 << 40, (4 << 20) + 1] {
        assert!(matches!(
            heap.alloc(size, GfpFlags::NONE),
            Err(Error::BadSize { .. })
        ));
    }
}
