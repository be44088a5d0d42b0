//! Property tests over the whole heap: random alloc/free of every kind
//! never hands out overlapping memory, never corrupts live data, and gives
//! every page back.

use kho_alloc::{Arena, ArenaConfig, Error, GfpFlags, Heap, Obj, Pages};
use kho_core::Order;
use proptest::prelude::*;

use crate::common::fill;

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize, bool),
    Cache(usize),
    Pages(u8, bool),
    Free(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            4 => (1usize..6000, any::<bool>()).prop_map(|(s, p)| Op::Alloc(s, p)),
            2 => (0usize..3).prop_map(Op::Cache),
            1 => (0u8..=4, any::<bool>()).prop_map(|(o, p)| Op::Pages(o, p)),
            4 => any::<usize>().prop_map(Op::Free),
        ],
        1..if cfg!(miri) { 25 } else { 250 },
    )
}

enum Live {
    Obj(Obj, Option<usize>),
    Pages(Pages),
}

proptest! {
    #![proptest_config(if cfg!(miri) {
        // Under Miri: few cases, and no failure file (no file system).
        ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(2) }
    } else {
        ProptestConfig::with_cases(64)
    })]

    #[test]
    fn heap_alloc_free_keeps_memory_disjoint_and_intact(ops in ops()) {
        let heap = Heap::new(Arena::heap(&ArenaConfig::with_size(8 << 20)).unwrap()).unwrap();
        let caches = [
            heap.cache("a", 24, 8).unwrap(),
            heap.cache("b", 200, 64).unwrap(),
            heap.cache("c", 4096, 4096).unwrap(),
        ];
        let base = heap.stats();
        let mut live: Vec<(Live, u64)> = Vec::new();
        let mut seed = 0u64;
        for op in ops {
            seed += 1;
            let want_pool = match op {
                Op::Alloc(_, p) | Op::Pages(_, p) => p,
                Op::Cache(_) => true,
                Op::Free(_) => false,
            };
            let item = match op {
                Op::Alloc(size, preserve) => {
                    let flags = if preserve { GfpFlags::PRESERVE } else { GfpFlags::NONE };
                    heap.alloc(size, flags).map(|o| Live::Obj(o, None))
                }
                Op::Cache(i) => caches[i].alloc(GfpFlags::NONE).map(|o| Live::Obj(o, Some(i))),
                Op::Pages(o, preserve) => {
                    let flags = if preserve { GfpFlags::PRESERVE | GfpFlags::ZERO } else { GfpFlags::ZERO };
                    heap.alloc_pages(Order::new(o).unwrap(), flags).map(Live::Pages)
                }
                Op::Free(i) => {
                    if !live.is_empty() {
                        let (l, s) = live.swap_remove(i % live.len());
                        check(&heap, &l, s)?;
                        match l {
                            Live::Obj(o, None) => heap.free(o).unwrap(),
                            Live::Obj(o, Some(c)) => caches[c].free(o).unwrap(),
                            Live::Pages(p) => heap.free_pages(p).unwrap(),
                        }
                    }
                    continue;
                }
            };
            let mut item = match item {
                Ok(i) => i,
                Err(Error::OutOfMemory { .. }) => continue,
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            };
            let r = range(&item);
            for (other, _) in &live {
                prop_assert!(!range(other).overlaps(r), "{r:?} overlaps {:?}", range(other));
            }
            let region = heap.region_of(kho_core::PhysAddr(r.start).pfn());
            // PRESERVE and named caches: the pool only; everything else:
            // general memory only.
            let want = if want_pool { kho_alloc::Region::Preservable } else { kho_alloc::Region::General };
            prop_assert_eq!(region, Some(want));
            match &mut item {
                Live::Obj(o, _) => fill(&heap, o, seed),
                Live::Pages(p) => {
                    prop_assert!(heap.page_bytes(p).unwrap().iter().all(|&b| b == 0));
                    heap.page_bytes_mut(p).unwrap().fill(seed as u8);
                }
            }
            live.push((item, seed));
        }
        for (l, s) in live.drain(..) {
            check(&heap, &l, s)?;
            match l {
                Live::Obj(o, None) => heap.free(o).unwrap(),
                Live::Obj(o, Some(c)) => caches[c].free(o).unwrap(),
                Live::Pages(p) => heap.free_pages(p).unwrap(),
            }
        }
        // Every page is back but slab pages: spare slabs, and (general
        // classes only) slabs of objects parked in this thread's magazines.
        // No folio or large object is left, and a preservable cache, which
        // has no magazines, keeps at most one spare slab of at most 8 pages.
        let end = heap.stats();
        for (now, before) in [(end.general, base.general), (end.preservable, base.preservable)] {
            prop_assert_eq!(before.allocated_pages, 0);
            prop_assert_eq!(now.allocated_pages, now.slab_pages);
            prop_assert_eq!(now.free_pages + now.allocated_pages, before.total_pages);
        }
        let preservable_caches = kho_alloc::SIZE_CLASSES.len() + caches.len();
        prop_assert!(end.preservable.slab_pages <= 8 * preservable_caches as u64);
        prop_assert_eq!(end.preserved_folios, 0);
        for c in &caches {
            prop_assert_eq!(c.live(), 0);
        }
    }
}

fn range(l: &Live) -> kho_core::PhysRange {
    match l {
        Live::Obj(o, _) => o.range(),
        Live::Pages(p) => p.range(),
    }
}

fn check(heap: &Heap, l: &Live, seed: u64) -> Result<(), TestCaseError> {
    match l {
        Live::Obj(o, _) => {
            let mut probe = Vec::new();
            probe.extend_from_slice(heap.bytes(o).unwrap());
            let want = expected(o.len(), seed);
            prop_assert_eq!(probe, want, "object at {:?} corrupted", o.addr());
        }
        Live::Pages(p) => {
            prop_assert!(heap.page_bytes(p).unwrap().iter().all(|&b| b == seed as u8));
        }
    }
    Ok(())
}

fn expected(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    v
}

#[test]
fn heap_is_send_and_sync_and_threads_share_it() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Heap>();
    assert_send_sync::<kho_alloc::PreservableCache>();
    let heap = Heap::new(Arena::heap(&ArenaConfig::with_size(16 << 20)).unwrap()).unwrap();
    let kv = heap.cache("kv", 64, 8).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let heap = heap.clone();
            let kv = kv.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..if cfg!(miri) { 100 } else { 2000u64 } {
                    let mut o = if i % 2 == 0 {
                        heap.alloc(48, GfpFlags::NONE).unwrap()
                    } else {
                        kv.alloc(GfpFlags::NONE).unwrap()
                    };
                    fill(&heap, &mut o, t * 10_000 + i);
                    mine.push((o, t * 10_000 + i));
                    if i % 3 == 0 {
                        let (o, _) = mine.swap_remove(0);
                        if o.len() == 48 {
                            heap.free(o).unwrap();
                        } else {
                            kv.free(o).unwrap();
                        }
                    }
                }
                for (o, s) in mine {
                    assert_eq!(heap.bytes(&o).unwrap(), &expected(o.len(), s)[..]);
                    if o.len() == 48 {
                        heap.free(o).unwrap();
                    } else {
                        kv.free(o).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(kv.live(), 0);
}

proptest! {
    #![proptest_config(if cfg!(miri) {
        // Under Miri: few cases, and no failure file (no file system).
        ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(2) }
    } else {
        ProptestConfig::with_cases(48)
    })]

    /// Any mix of live and freed objects in preservable caches survives a
    /// freeze and restore: the same addresses, the same bytes, and the
    /// restored caches keep allocating without overlap.
    #[test]
    fn freeze_restore_round_trips_any_state(
        ops in prop::collection::vec(
            (0usize..3, any::<bool>(), any::<usize>()),
            1..if cfg!(miri) { 40 } else { 300 },
        ),
    ) {
        let heap = Heap::new(Arena::heap(&ArenaConfig::with_size(if cfg!(miri) { 2 << 20 } else { 8 << 20 })).unwrap()).unwrap();
        let specs = [("small", 24u32, 8u32), ("mid", 200, 64), ("page", 4096, 4096)];
        let caches: Vec<_> = specs.iter().map(|&(n, s, a)| heap.cache(n, s, a).unwrap()).collect();
        let mut live: Vec<(usize, Obj, u64)> = Vec::new();
        for (seed, (c, alloc, pick)) in ops.into_iter().enumerate() {
            if alloc || live.is_empty() {
                match caches[c].alloc(GfpFlags::NONE) {
                    Ok(mut o) => {
                        fill(&heap, &mut o, seed as u64);
                        live.push((c, o, seed as u64));
                    }
                    Err(Error::OutOfMemory { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            } else {
                let (c, o, _) = live.swap_remove(pick % live.len());
                caches[c].free(o).unwrap();
            }
        }
        let mut want: Vec<(String, u64, Vec<u8>)> = live
            .iter()
            .map(|(c, o, _)| (specs[*c].0.to_owned(), o.addr().0, heap.bytes(o).unwrap().to_vec()))
            .collect();
        want.sort();
        for (_, o, _) in live.drain(..) {
            o.leak();
        }
        heap.freeze_and_commit(None).unwrap();
        drop(caches);
        let (heap, restored) = Heap::restore(heap.into_arena().unwrap()).unwrap();
        let mut got = Vec::new();
        let mut objs = Vec::new();
        for rc in restored.caches {
            let name = rc.name.clone();
            let Some(spec) = specs.iter().find(|x| x.0 == name) else {
                // The preservable size classes, unused here.
                prop_assert!(rc.is_empty(), "{name}");
                continue;
            };
            let size = spec.1 as usize;
            for o in rc.into_objects() {
                // The image records the stride: a restored handle spans the
                // whole slot, whose slack past the object was zeroed.
                let bytes = heap.bytes(&o).unwrap();
                prop_assert!(bytes[size..].iter().all(|&b| b == 0), "stale slack");
                got.push((name.clone(), o.addr().0, bytes[..size].to_vec()));
                objs.push((name.clone(), o));
            }
        }
        got.sort();
        prop_assert_eq!(&got, &want);
        // The caches go on: fresh objects never overlap restored ones.
        for &(n, s, a) in &specs {
            let c = heap.cache(n, s, a).unwrap();
            if let Ok(f) = c.alloc(GfpFlags::NONE) {
                prop_assert!(objs.iter().all(|(_, o)| !o.range().overlaps(f.range())));
                c.free(f).unwrap();
            }
        }
        for (n, o) in objs {
            let &(_, s, a) = specs.iter().find(|x| x.0 == n).unwrap();
            heap.cache(&n, s, a).unwrap().free(o).unwrap();
        }
    }
}

/// Threads asking at once for a new named cache all get the same one.
#[test]
fn concurrent_cache_creation_makes_one_cache() {
    let heap = Heap::new(Arena::heap(&ArenaConfig::with_size(8 << 20)).unwrap()).unwrap();
    for round in 0..if cfg!(miri) { 2 } else { 8 } {
        let name = format!("shared-{round}");
        let barrier = std::sync::Barrier::new(4);
        let objs: Vec<Obj> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let c = heap.cache(&name, 64, 8).unwrap();
                        c.alloc(GfpFlags::NONE).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let c = heap.cache(&name, 64, 8).unwrap();
        assert_eq!(c.live(), 4, "{name}: objects spread over several caches");
        for o in objs {
            c.free(o).unwrap();
        }
    }
    let frozen = heap.freeze(None).unwrap();
    let image = kho_core::Image::parse(heap.frozen_bytes(&frozen).unwrap()).unwrap();
    let mut names: Vec<&str> = image.slab_caches().map(|c| c.name()).collect();
    let all = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all, "duplicate cache names in the image");
    heap.discard(frozen).unwrap();
}
