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
    let objs: Vec<Obj> = (0..8)
        .map(|_| heap.alloc(64, GfpFlags::NOWAIT).unwrap())
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
