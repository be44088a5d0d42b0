//! Restore semantics: once per folio, heads only.

use std::collections::BTreeSet;

use kho_core::{Image, ImageBuilder, Pfn, PreservedMap, RestoreError, Restorer};
use proptest::prelude::*;

use super::{o, sample_image};

#[test]
fn restore_folio_once_per_head() {
    let bytes = sample_image();
    let img = Image::parse(&bytes).unwrap();
    let mut r = Restorer::new(&img);
    assert_eq!(r.remaining(), 12);
    assert_eq!(
        r.restore_folio(Pfn(0x5)),
        Err(RestoreError::NotPreserved { pfn: 0x5 })
    );
    assert_eq!(
        r.restore_folio(Pfn(0x2ff)),
        Err(RestoreError::NotHead {
            pfn: 0x2ff,
            head: 0x200,
            order: 9
        })
    );
    assert_eq!(r.restore_folio(Pfn(0x200)), Ok(o(9)));
    assert!(r.is_restored(Pfn(0x200)));
    assert_eq!(
        r.restore_folio(Pfn(0x200)),
        Err(RestoreError::AlreadyRestored {
            pfn: 0x200,
            order: 9
        })
    );
    assert_eq!(
        r.restore_folio(Pfn(0x101)).unwrap_err(),
        RestoreError::NotHead {
            pfn: 0x101,
            head: 0x100,
            order: 1
        }
    );
    assert_eq!(r.restore_folio(Pfn(0x100)), Ok(o(1)));
    assert_eq!(r.remaining(), 10);

    // Bulk restore yields the rest in address order and marks them.
    let rest: Vec<_> = r.restore_all().map(|f| (f.pfn.0, f.order.get())).collect();
    let mut want = vec![(0x102, 0), (0x1000, 0)];
    want.extend((0..8).map(|i| (0x2000 + 4 * i, 2)));
    assert_eq!(rest, want);
    assert_eq!(r.remaining(), 0);
    assert_eq!(r.restore_all().count(), 0);
    assert!(matches!(
        r.restore_folio(Pfn(0x2004)),
        Err(RestoreError::AlreadyRestored { .. })
    ));
}

#[test]
fn restore_all_can_stop_early() {
    let bytes = sample_image();
    let img = Image::parse(&bytes).unwrap();
    let mut r = Restorer::new(&img);
    let first: Vec<_> = r.restore_all().take(3).collect();
    assert_eq!(first.len(), 3);
    assert_eq!(r.remaining(), 9);
    assert!(r.restore_folio(first[2].pfn).is_err());
    assert_eq!(r.restore_all().count(), 9);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn restore_matches_a_model(
        folios in prop::collection::vec((0u64..1 << 15, prop_oneof![Just(0u8), Just(2), Just(9)]), 1..60),
        picks in prop::collection::vec(0u64..1 << 15, 0..80),
    ) {
        let mut map = PreservedMap::new(Pfn(1 << 15));
        for (p, ord) in folios {
            let _ = map.preserve(Pfn(p).align_down(o(ord)), o(ord));
        }
        let bytes = ImageBuilder::new(1 << 27).memmap(&map).build().unwrap();
        let img = Image::parse(&bytes).unwrap();
        let mut r = Restorer::new(&img);
        let mut done = BTreeSet::new();
        for p in picks {
            let got = r.restore_folio(Pfn(p));
            match map.is_preserved(Pfn(p)) {
                None => prop_assert_eq!(got, Err(RestoreError::NotPreserved { pfn: p })),
                Some((head, order)) if head.0 != p => prop_assert_eq!(
                    got,
                    Err(RestoreError::NotHead { pfn: p, head: head.0, order: order.get() })
                ),
                Some((_, order)) if !done.insert(p) => prop_assert_eq!(
                    got,
                    Err(RestoreError::AlreadyRestored { pfn: p, order: order.get() })
                ),
                Some((_, order)) => prop_assert_eq!(got, Ok(order)),
            }
        }
        prop_assert_eq!(r.remaining(), map.folio_count() - done.len() as u64);
        let rest: Vec<_> = r.restore_all().collect();
        let want: Vec<_> = map.folios().filter(|f| !done.contains(&f.pfn.0)).collect();
        prop_assert_eq!(rest, want);
        prop_assert_eq!(r.remaining(), 0);
    }
}
