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
