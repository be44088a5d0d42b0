//! The cross-order overlap check against a brute-force reference, on
//! MEMMAP sections written block by block (so overlapping folios, which
//! `PreservedMap` refuses, can be expressed).

use std::collections::BTreeMap;

use kho_core::image::testing::RawImage;
use kho_core::{Image, ParseError, SectionKind};
use proptest::prelude::*;

/// Arena: 2^21 pages (8 GiB), room for a few order-18 folios.
const PAGES: u64 = 1 << 21;

/// Orders on both sides of the block-span boundaries (12 is where one
/// block of order o spans one folio of order o + 12).
const ORDERS: [u8; 9] = [0, 1, 2, 9, 11, 12, 13, 14, 18];

fn arb_folios() -> impl Strategy<Value = Vec<(u64, u8)>> {
    // PFNs near a few cluster centres, so folios of different orders land
    // on, next to and far from each other.
    let centres = [0u64, 0x1000, 0x4_0000, 0x10_0000, PAGES - 0x4_0000];
    let folio = (0..centres.len(), 0u64..0x2_0000, 0..ORDERS.len()).prop_map(move |(c, off, k)| {
        let order = ORDERS[k];
        let pfn = (centres[c] + off) % PAGES;
        (pfn & !((1u64 << order) - 1), order)
    });
    prop::collection::vec(folio, 1..24)
}

/// The MEMMAP payload for a set of folios (duplicates within an order
/// collapse to one bit), blocks sorted by order then base.
fn memmap(folios: &[(u64, u8)]) -> Vec<u8> {
    let mut blocks: BTreeMap<(u8, u64), [u64; 64]> = BTreeMap::new();
    for &(pfn, order) in folios {
        let idx = pfn >> order;
        let base = (idx & !4095) << order;
        let bit = idx & 4095;
        blocks.entry((order, base)).or_insert([0; 64])[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    blocks
        .iter()
        .flat_map(|(&(order, base), bits)| RawImage::block(base, order, bits))
        .collect()
}

fn meets(a: (u64, u8), b: (u64, u8)) -> bool {
    let (a_end, b_end) = (a.0 + (1 << a.1), b.0 + (1 << b.1));
    a.0 < b_end && b.0 < a_end
}

/// Some pair of folios of different orders that share a page.
fn any_overlap(folios: &[(u64, u8)]) -> bool {
    folios
        .iter()
        .any(|&a| folios.iter().any(|&b| a.1 < b.1 && meets(a, b)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn overlap_found_exactly_when_two_orders_share_a_page(folios in arb_folios()) {
        let mut raw = RawImage::new(PAGES << 12);
        raw.set_payload(SectionKind::Memmap, memmap(&folios));
        let bytes = raw.to_bytes();
        match Image::parse(&bytes) {
            Ok(image) => {
                prop_assert!(!any_overlap(&folios), "missed an overlap in {folios:?}");
                for &(pfn, order) in &folios {
                    let found = image.is_preserved(kho_core::Pfn(pfn));
                    prop_assert_eq!(found.map(|(p, o)| (p.0, o.get())), Some((pfn, order)));
                }
            }
            Err(ParseError::FolioOverlap { pfn, order, other_pfn, other_order, .. }) => {
                prop_assert!(order < other_order);
                prop_assert!(folios.contains(&(pfn, order)), "reported {pfn:#x}/{order}");
                prop_assert!(folios.contains(&(other_pfn, other_order)));
                prop_assert!(meets((pfn, order), (other_pfn, other_order)));
            }
            Err(e) => prop_assert!(false, "unexpected error {e} for {folios:?}"),
        }
    }
}
