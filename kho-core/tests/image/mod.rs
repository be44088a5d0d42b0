//! Handover image: malformed inputs, round trips, restore, golden bytes.

mod errors;
mod full;
mod golden;
mod long_runs;
mod overlap;
mod restore;
mod roundtrip;

use kho_core::image::testing::RawImage;
use kho_core::tree::{Node, Tree};
use kho_core::{
    Extent, Image, ImageBuilder, Order, ParseError, Pfn, PhysAddr, PhysRange, PreservedMap,
    SlabCacheInfo, SlabPageInfo,
};

/// Arena of the sample image: 64 MiB.
pub const ARENA: u64 = 64 << 20;

pub fn o(n: u8) -> Order {
    Order::new(n).unwrap()
}

/// Folios: 0x100 (order 1), 0x102 (order 0), 0x200 (order 9), 0x1000
/// (order 0, a slab page), 0x2000..0x2020 (eight of order 2).
pub fn sample_map() -> PreservedMap {
    let mut map = PreservedMap::new(Pfn(ARENA >> 12));
    map.preserve(Pfn(0x200), o(9)).unwrap();
    map.preserve_range(PhysAddr(0x100 << 12), 0x3000).unwrap();
    map.preserve(Pfn(0x1000), o(0)).unwrap();
    map.preserve_folios(Pfn(0x2000), o(2), 8).unwrap();
    map
}

pub fn sample_cache() -> SlabCacheInfo {
    SlabCacheInfo {
        id: 1,
        name: "kv-node".into(),
        object_size: 64,
        align: 8,
        objects_per_slab: 64,
        order: Order::ZERO,
    }
}

pub fn sample_page() -> SlabPageInfo {
    SlabPageInfo {
        pfn: Pfn(0x1000),
        cache_id: 1,
        order: Order::ZERO,
        object_size: 64,
        object_count: 64,
        first_offset: 0,
        bitmap: vec![0b1011],
    }
}

/// A builder exercising every section except TREE.
pub fn sample_builder() -> ImageBuilder {
    ImageBuilder::new(ARENA)
        .generation(7)
        .memmap(&sample_map())
        .scratch(vec![PhysRange::new(PhysAddr(0), 0x10_0000)])
        .kfence(vec![PhysRange::new(PhysAddr(0x300_0000), 0x1_0000)])
        .slab(vec![sample_cache()], vec![sample_page()])
        .extents(vec![
            Extent {
                range: PhysRange::new(PhysAddr(0x20_0000), 0x1000),
                tag: 7,
            },
            Extent {
                range: PhysRange::new(PhysAddr(0x10_0010), 0x2000),
                tag: 8,
            },
        ])
}

pub fn sample_tree() -> Tree {
    Tree::new(
        Node::root("kho-root-v1").with_child(
            Node::new("kv", "kv-v1")
                .with_u64("n", 1)
                .with_str("note", "ab"),
        ),
    )
}

/// The sample with a metadata tree: every section present.
pub fn sample_image() -> Vec<u8> {
    sample_builder().tree(&sample_tree()).build().unwrap()
}

pub fn sample_raw() -> RawImage {
    RawImage::from_image(&Image::parse(&sample_image()).unwrap())
}

pub fn parse_err(bytes: &[u8]) -> ParseError {
    match Image::parse(bytes) {
        Ok(img) => panic!("parsed a malformed image: {img:?}"),
        Err(e) => e,
    }
}
