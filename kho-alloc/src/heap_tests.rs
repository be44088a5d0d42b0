//! Tests of the heap that look at its internal state.

use super::*;
use crate::layout::ArenaConfig;

fn heap(size: u64) -> Heap {
    Heap::new(Arena::heap(&ArenaConfig::with_size(size)).unwrap()).unwrap()
}

#[test]
fn is_preserved_answers_without_waiting_for_a_busy_map() {
    let heap = heap(8 << 20);
    let l = *heap.layout();
    let p = heap.alloc_pages(Order::ZERO, GfpFlags::NONE).unwrap();
    let pfn = p.folio().pfn;
    // Held by "a freeze": nothing preserved yet, so no lock is needed.
    let busy = lock(&heap.shared.preserved);
    assert_eq!(heap.try_is_preserved(pfn), Some(false));
    assert!(!heap.is_preserved(pfn));
    drop(busy);
    heap.preserve_pages(&p).unwrap();
    let busy = lock(&heap.shared.preserved);
    assert_eq!(heap.try_is_preserved(pfn), None);
    // Regions that preserve_* refuses, and the pool, need no lock either.
    assert_eq!(heap.try_is_preserved(l.kfence.start), Some(false));
    assert_eq!(heap.try_is_preserved(l.scratch.start), Some(false));
    assert_eq!(heap.try_is_preserved(l.preservable.start), Some(true));
    assert_eq!(heap.try_is_preserved(Pfn(u64::MAX)), Some(false));
    drop(busy);
    assert_eq!(heap.try_is_preserved(pfn), Some(true));
    assert_eq!(heap.try_is_preserved(Pfn(pfn.0 + 1)), Some(false));
    heap.free_pages(p).unwrap();
}

/// A sampled allocation while the map is held (as a freeze holds it)
/// completes: the sampler's query never takes the lock blocking. Run on
/// one thread, a blocking query would deadlock here.
#[cfg(not(miri))]
#[test]
fn sampling_never_waits_for_the_preserved_map() {
    let heap = Heap::new(Arena::anonymous(&ArenaConfig::with_size(16 << 20)).unwrap()).unwrap();
    let p = heap.alloc_pages(Order::ZERO, GfpFlags::NONE).unwrap();
    heap.preserve_pages(&p).unwrap();
    let busy = lock(&heap.shared.preserved);
    heap.enable_kfence(kfence::SampleMode::Count(1), PoolConfig::default())
        .unwrap();
    // (`NOWAIT` requests are never sampled, so these wait-allowed ones
    // are what reaches the query.)
    let objs: Vec<Obj> = (0..8)
        .map(|_| heap.alloc(64, GfpFlags::NONE).unwrap())
        .collect();
    assert!(objs
        .iter()
        .any(|o| heap.region_of(o.addr().pfn()) == Some(Region::Kfence)));
    drop(busy);
    for o in objs {
        heap.free(o).unwrap();
    }
    heap.free_pages(p).unwrap();
}

/// Sampled objects are aligned as the size class that would have served
/// them, so `view::<T>` works whether or not a request was sampled.
#[cfg(not(miri))]
#[test]
fn sampled_objects_keep_their_size_class_alignment() {
    #[derive(zerocopy::FromBytes, zerocopy::KnownLayout, zerocopy::Immutable)]
    #[repr(C, align(64))]
    struct Line([u8; 64]);

    let heap = Heap::new(Arena::anonymous(&ArenaConfig::with_size(16 << 20)).unwrap()).unwrap();
    heap.enable_kfence(kfence::SampleMode::Count(1), PoolConfig::default())
        .unwrap();
    let mut sampled = 0;
    for size in [1usize, 8, 16, 24, 33, 64, 100, 128, 1000, 4096] {
        let want = class_align(SIZE_CLASSES[class_of(size)]) as u64;
        for _ in 0..4 {
            let o = heap.alloc(size, GfpFlags::NONE).unwrap();
            if heap.region_of(o.addr().pfn()) == Some(Region::Kfence) {
                sampled += 1;
            }
            assert_eq!(o.addr().0 % want, 0, "{size} B at {:?}", o.addr());
            if size >= 64 && want == 64 {
                heap.view::<Line>(&o).unwrap();
            }
            heap.free(o).unwrap();
        }
    }
    assert!(sampled >= 10, "{sampled} sampled");
}

mod census {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::buddy::BlockKind;

    /// Every page of both zones is in exactly one state, and the states
    /// agree with who holds what: a free block; a folio block with exactly
    /// one owner among `owned` (or the heap's image); a slab block in
    /// exactly one cache's slab table, of the cache's order, in the cache's
    /// zone. Preserved folios lie only inside folio blocks, each inside one,
    /// and the lock-free count matches the map.
    pub(super) fn check(heap: &Heap, owned: &[Folio]) -> std::result::Result<(), String> {
        let s = &heap.shared;
        let mut slabs: BTreeMap<u64, u16> = BTreeMap::new();
        for c in s.caches.iter().filter_map(OnceLock::get) {
            for pfn in c.slab_pfns() {
                if let Some(other) = slabs.insert(pfn, c.index) {
                    return Err(format!("slab {pfn:#x} in caches {other} and {}", c.index));
                }
                if !s.zone_for(c).contains(Pfn(pfn)) {
                    return Err(format!("slab {pfn:#x} of {} in the wrong zone", c.name));
                }
            }
        }
        let mut owners: BTreeMap<u64, Order> = BTreeMap::new();
        for f in owned.iter().copied().chain(*lock(&s.image)) {
            if owners.insert(f.pfn.0, f.order).is_some() {
                return Err(format!("two owners of {:#x}", f.pfn.0));
            }
        }
        let map = lock(&s.preserved).clone();
        if s.preserved_count.load(Ordering::Acquire) != map.folio_count() {
            return Err("preserved count out of step with the map".into());
        }
        let mut preserved_inside = 0;
        for zone in [&s.general, &s.preservable] {
            zone.check()?;
            let mut pages = 0;
            for (pfn, order, kind) in zone.blocks() {
                let end = Pfn(pfn.0 + order.pages());
                pages += order.pages();
                match kind {
                    BlockKind::Free => {}
                    BlockKind::Folio => {
                        if owners.remove(&pfn.0) != Some(order) {
                            return Err(format!("folio {pfn:?} order {order:?} has no owner"));
                        }
                        let mut at = pfn;
                        while let Some(f) = map.first_overlap(at, end) {
                            if f.pfn < pfn || f.end_pfn() > end {
                                return Err(format!("preserved {f:?} straddles {pfn:?}"));
                            }
                            preserved_inside += 1;
                            at = f.end_pfn();
                        }
                        continue;
                    }
                    BlockKind::Slab => match slabs.remove(&pfn.0) {
                        Some(i) if s.cache(i).map(|c| c.order) == Some(order) => {}
                        other => {
                            return Err(format!("slab block {pfn:?} owned by cache {other:?}"))
                        }
                    },
                    BlockKind::Reserved | BlockKind::Tail => {
                        return Err(format!("page {pfn:?} is {kind:?}"))
                    }
                }
                if let Some(f) = map.first_overlap(pfn, end) {
                    return Err(format!("preserved {f:?} in a {kind:?} block"));
                }
            }
            if pages != zone.stats().total_pages {
                return Err(format!("{} pages walked of {}", pages, zone.name()));
            }
        }
        if let Some((pfn, order)) = owners.into_iter().next() {
            return Err(format!("owned folio {pfn:#x} order {order} is not a block"));
        }
        if let Some((pfn, i)) = slabs.into_iter().next() {
            return Err(format!("slab {pfn:#x} of cache {i} is not a slab block"));
        }
        if preserved_inside != map.folio_count() {
            return Err("preserved folios outside the zones".into());
        }
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// `alloc(size)`, with `PRESERVE` if set.
        Alloc(usize, bool),
        /// An object of named cache `i`.
        Cache(usize),
        /// A folio of `order`, with `PRESERVE` if set.
        Pages(u8, bool),
        /// Free live item `i`.
        Free(usize),
        /// Preserve live item `i` through its handle.
        Preserve(usize),
        /// Preserve page `j` of live item `i` with `preserve_range`.
        PreservePage(usize, u64),
        /// `preserve_folio` of an arbitrary page of a zone.
        PreserveRaw(u64),
        /// Unpreserve live item `i` through its handle.
        Unpreserve(usize),
        /// Freeze and commit (a new image folio, the old one freed).
        Commit,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                4 => (prop_oneof![1usize..600, 4000usize..20000], any::<bool>())
                    .prop_map(|(s, p)| Op::Alloc(s, p)),
                2 => (0usize..3).prop_map(Op::Cache),
                2 => (0u8..=3, any::<bool>()).prop_map(|(o, p)| Op::Pages(o, p)),
                4 => any::<usize>().prop_map(Op::Free),
                2 => any::<usize>().prop_map(Op::Preserve),
                1 => (any::<usize>(), 0u64..8).prop_map(|(i, j)| Op::PreservePage(i, j)),
                1 => any::<u64>().prop_map(Op::PreserveRaw),
                1 => any::<usize>().prop_map(Op::Unpreserve),
                1 => Just(Op::Commit),
            ],
            1..if cfg!(miri) { 40 } else { 200 },
        )
    }

    enum Live {
        Obj(Obj, Option<usize>),
        Pages(Pages),
    }

    impl Live {
        /// The folio the handle owns (pages, objects above 4 KiB).
        fn folio(&self) -> Option<Folio> {
            match self {
                Live::Pages(p) => Some(p.folio()),
                Live::Obj(o, _) if o.kind() == KIND_LARGE => Some(Folio {
                    pfn: o.addr().pfn(),
                    order: Order::new(o.order()).unwrap_or(Order::ZERO),
                }),
                Live::Obj(..) => None,
            }
        }
    }

    proptest! {
        #![proptest_config(if cfg!(miri) {
        // Under Miri: few cases, and no failure file (no file system).
        ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(2) }
    } else {
        ProptestConfig::with_cases(48)
    })]

        #[test]
        fn every_page_is_in_exactly_one_state(ops in ops()) {
            // Under Miri a smaller arena: every page is checked.
            let heap = heap(if cfg!(miri) { 2 << 20 } else { 8 << 20 });
            let caches = [
                heap.cache("a", 24, 8).unwrap(),
                heap.cache("b", 200, 64).unwrap(),
                heap.cache("c", 4096, 4096).unwrap(),
            ];
            let l = *heap.layout();
            let zones = [l.general.start.0..l.general.end.0, l.preservable.start.0..l.preservable.end.0];
            let mut live: Vec<Live> = Vec::new();
            let pick = |live: &Vec<Live>, i: usize| (!live.is_empty()).then(|| i % live.len());
            for op in ops {
                let got = match op {
                    Op::Alloc(size, p) => {
                        let flags = if p { GfpFlags::PRESERVE } else { GfpFlags::NONE };
                        heap.alloc(size, flags).map(|o| Some(Live::Obj(o, None)))
                    }
                    Op::Cache(i) => caches[i].alloc(GfpFlags::NONE).map(|o| Some(Live::Obj(o, Some(i)))),
                    Op::Pages(o, p) => {
                        let flags = if p { GfpFlags::PRESERVE } else { GfpFlags::NONE };
                        heap.alloc_pages(Order::new(o).unwrap(), flags).map(|p| Some(Live::Pages(p)))
                    }
                    Op::Free(i) => {
                        if let Some(i) = pick(&live, i) {
                            match live.swap_remove(i) {
                                Live::Obj(o, None) => heap.free(o).unwrap(),
                                Live::Obj(o, Some(c)) => caches[c].free(o).unwrap(),
                                Live::Pages(p) => heap.free_pages(p).unwrap(),
                            }
                        }
                        Ok(None)
                    }
                    Op::Preserve(i) | Op::Unpreserve(i) => {
                        if let Some(i) = pick(&live, i) {
                            let preserve = matches!(op, Op::Preserve(_));
                            let r = match (&live[i], preserve) {
                                (Live::Pages(p), true) => heap.preserve_pages(p),
                                (Live::Pages(p), false) => heap.unpreserve_folio(p.folio()),
                                (Live::Obj(o, _), true) => heap.preserve_obj(o),
                                (Live::Obj(o, _), false) => heap.unpreserve_obj(o),
                            };
                            match r {
                                Ok(()) | Err(Error::Map(_)) | Err(Error::NotPreservable { .. }) => {}
                                Err(e) => return Err(TestCaseError::fail(e.to_string())),
                            }
                        }
                        Ok(None)
                    }
                    Op::PreservePage(i, j) => {
                        if let Some(f) = pick(&live, i).and_then(|i| live[i].folio()) {
                            let pfn = Pfn(f.pfn.0 + j % f.order.pages());
                            let r = heap.preserve_range(PhysRange::new(pfn.addr().unwrap(), PAGE_SIZE));
                            prop_assert!(matches!(r, Ok(()) | Err(Error::Map(_))), "{r:?}");
                        }
                        Ok(None)
                    }
                    Op::PreserveRaw(x) => {
                        let z = &zones[(x & 1) as usize];
                        let pfn = Pfn(z.start + (x >> 1) % (z.end - z.start));
                        let owner = live.iter().filter_map(Live::folio)
                            .any(|f| f.pfn <= pfn && pfn < f.end_pfn());
                        match heap.preserve_folio(Folio { pfn, order: Order::ZERO }) {
                            Ok(()) => prop_assert!(owner, "preserved unowned {pfn:?}"),
                            Err(Error::NotPreservable { .. }) => prop_assert!(!owner, "refused owned {pfn:?}"),
                            Err(Error::Map(_)) => prop_assert!(owner),
                            Err(e) => return Err(TestCaseError::fail(e.to_string())),
                        }
                        Ok(None)
                    }
                    Op::Commit => heap.freeze_and_commit(None).map(|_| None),
                };
                match got {
                    Ok(Some(l)) => live.push(l),
                    Ok(None) | Err(Error::OutOfMemory { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
                if !cfg!(miri) {
                    let owned: Vec<Folio> = live.iter().filter_map(Live::folio).collect();
                    check(&heap, &owned).map_err(TestCaseError::fail)?;
                }
            }
            let owned: Vec<Folio> = live.iter().filter_map(Live::folio).collect();
            check(&heap, &owned).map_err(TestCaseError::fail)?;
            for l in live {
                match l {
                    Live::Obj(o, None) => heap.free(o).unwrap(),
                    Live::Obj(o, Some(c)) => caches[c].free(o).unwrap(),
                    Live::Pages(p) => heap.free_pages(p).unwrap(),
                }
            }
            check(&heap, &[]).map_err(TestCaseError::fail)?;
            prop_assert_eq!(lock(&heap.shared.preserved).folio_count(), 0);
        }
    }
}
