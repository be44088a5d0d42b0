//! Long runs of blocks, where the parser takes its fast path, broken at any
//! block: the error is the one the full rules give, at that block.

use kho_core::image::testing::RawImage;
use kho_core::{Image, ParseError, SectionKind};
use proptest::prelude::*;

/// 4 GiB: 256 blocks of order 0.
const ARENA: u64 = 1 << 32;
const PAGES: u64 = ARENA >> 12;
const BLOCK: u64 = 520;

/// How block `j` is broken.
#[derive(Debug, Clone, Copy)]
enum Break {
    Empty,
    SameBase,
    Below,
    Misaligned,
    PastArena,
    Overlap(u64),
}

fn arb_break() -> impl Strategy<Value = Break> {
    prop_oneof![
        Just(Break::Empty),
        Just(Break::SameBase),
        Just(Break::Below),
        Just(Break::Misaligned),
        Just(Break::PastArena),
        (0u64..4096).prop_map(Break::Overlap),
    ]
}

/// Block bits: all set, or a single bit (word 0 then often clear).
fn words(full: bool, bit: u64) -> [u64; 64] {
    let mut w = [0u64; 64];
    if full {
        w = [!0; 64];
    } else {
        w[(bit / 64) as usize] = 1 << (bit % 64);
    }
    w
}

fn image(blocks: &[Vec<u8>]) -> Vec<u8> {
    let mut r = RawImage::new(ARENA);
    r.set_payload(SectionKind::Memmap, blocks.concat());
    r.to_bytes()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn a_long_run_broken_anywhere_fails_at_that_block(
        shape in prop::collection::vec((any::<bool>(), 0u64..4096), 2..256),
        pick in any::<prop::sample::Index>(),
        how in arb_break(),
    ) {
        let n = shape.len();
        let mut blocks: Vec<Vec<u8>> = shape
            .iter()
            .enumerate()
            .map(|(i, &(full, bit))| RawImage::block(i as u64 * 4096, 0, &words(full, bit)))
            .collect();
        let good = image(&blocks);
        let img = Image::parse(&good).unwrap();
        prop_assert_eq!(img.block_count(), n);
        let memmap = img.section(SectionKind::Memmap).unwrap().offset;

        let j = 1 + pick.index(n - 1);
        let (base, prev) = (j as u64 * 4096, (j as u64 - 1) * 4096);
        let offset = memmap + j as u64 * BLOCK;
        let unsorted = |base| ParseError::BlockUnsorted {
            offset,
            prev_order: 0,
            prev_base: prev,
            order: 0,
            base,
        };
        let want = match how {
            Break::Empty => {
                blocks[j] = RawImage::block(base, 0, &[0; 64]);
                ParseError::EmptyBlock { offset, order: 0, base, expected: 1, found: 0 }
            }
            Break::SameBase => {
                blocks[j] = RawImage::block(prev, 0, &words(true, 0));
                unsorted(prev)
            }
            Break::Below => {
                blocks[j] = RawImage::block(0, 0, &words(true, 0));
                unsorted(0)
            }
            Break::Misaligned => {
                // Order 1 at an odd multiple of 4096 pages: after an order-0
                // block it is sorted, but not aligned to its 8192-page span.
                let odd = (j as u64 | 1) * 4096;
                blocks[j] = RawImage::block(odd, 1, &words(true, 0));
                blocks.truncate(j + 1);
                ParseError::BlockMisaligned { offset, expected: 8192, found: odd }
            }
            Break::PastArena => {
                // The last block, moved to the arena's end.
                blocks.truncate(j + 1);
                blocks[j] = RawImage::block(PAGES, 0, &words(false, 0));
                ParseError::FolioOutOfArena { offset, pfn: PAGES, order: 0, expected: PAGES }
            }
            Break::Overlap(bit) => {
                // An order-9 folio over a page of block j; the lowest page of
                // block j inside it is the one reported.
                let pfn9 = (base + bit) & !511;
                let mut w9 = [0u64; 64];
                w9[(pfn9 >> 9) as usize / 64] = 1 << ((pfn9 >> 9) % 64);
                blocks[j] = RawImage::block(base, 0, &words(true, 0));
                blocks.push(RawImage::block(0, 9, &w9));
                ParseError::FolioOverlap {
                    offset,
                    pfn: pfn9,
                    order: 0,
                    other_pfn: pfn9,
                    other_order: 9,
                }
            }
        };
        let bad = image(&blocks);
        prop_assert_eq!(Image::parse(&bad).unwrap_err(), want);
    }
}
