//! Writes the committed seed corpora under `fuzz/seeds/<target>/`.
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds -- fuzz/seeds
//! ```
//!
//! Every seed is valid input that exercises every section, so a fuzzer
//! starts from deep inside the parsers; `scripts/fuzz-smoke` adds the files
//! under `fixtures/` on top.

use std::fs;
use std::path::{Path, PathBuf};

use kho_alloc::layout::ArenaConfig;
use kho_alloc::superblock::{ImageLocation, Superblock};
use kho_core::{
    Extent, ImageBuilder, Node, Order, Pfn, PhysAddr, PhysRange, PreservedMap, SlabCacheInfo,
    SlabPageInfo, Tree,
};
use zerocopy::IntoBytes;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn order(n: u8) -> Order {
    Order::new(n).unwrap_or(Order::ZERO)
}

fn tree() -> Tree {
    Tree::new(
        Node::root("kho-root-v1")
            .with_child(
                Node::new("kv", "kv-store-v1")
                    .with_u64("entries", 3)
                    .with_range("table", PhysRange::new(PhysAddr(0x10_0000), 0x2000))
                    .with_str("owner", "kvd")
                    .with_bytes("salt", vec![1, 2, 3, 4]),
            )
            .with_child(Node::new("vm", "vmm-v2").with_child(Node::new("cpu0", "vcpu-v1"))),
    )
}

/// An image of a `size`-byte arena with every section, its folios above
/// `first_pfn`.
fn full_image(size: u64, first_pfn: u64, with_tree: bool) -> Result<Vec<u8>> {
    let mut map = PreservedMap::new(Pfn(size >> 12));
    map.preserve_range(PhysAddr(first_pfn << 12), 0x3000)?;
    map.preserve(Pfn(first_pfn + 0x10), order(0))?;
    map.preserve(Pfn(first_pfn + 0x20), order(4))?;
    map.preserve_folios(Pfn(first_pfn + 0x40), order(1), 8)?;
    let cache = SlabCacheInfo {
        id: 1,
        name: "sessions".into(),
        object_size: 64,
        align: 8,
        objects_per_slab: 64,
        order: Order::ZERO,
    };
    let page = SlabPageInfo {
        pfn: Pfn(first_pfn + 0x10),
        cache_id: 1,
        order: Order::ZERO,
        object_size: 64,
        object_count: 64,
        first_offset: 0,
        bitmap: vec![0b1011],
    };
    let mut b = ImageBuilder::new(size)
        .generation(3)
        .memmap(&map)
        .scratch(vec![PhysRange::new(PhysAddr(0x2000), 0x4000)])
        .kfence(vec![PhysRange::new(PhysAddr(0x6000), 0x2000)])
        .slab(vec![cache], vec![page])
        .extents(vec![Extent {
            range: PhysRange::new(PhysAddr((first_pfn + 0x20) << 12), 0x100),
            tag: 1,
        }]);
    if with_tree {
        b = b.tree(&tree());
    }
    Ok(b.build()?)
}

fn write(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let d = dir.join(target);
    fs::create_dir_all(&d)?;
    fs::write(d.join(name), bytes)?;
    Ok(())
}

/// The first bytes of an arena whose slots point at `image`, placed at page
/// 2; `slots` says which slots are written and their generations.
fn arena_head(size: u64, image: &[u8], slots: [Option<u64>; 2]) -> Result<Vec<u8>> {
    let layout = ArenaConfig::with_size(size).layout()?;
    let mut out = vec![0u8; 0x2000];
    out.extend_from_slice(image);
    for (i, generation) in slots.iter().enumerate() {
        let Some(generation) = *generation else {
            continue;
        };
        let sb = Superblock {
            layout,
            generation,
            image: Some(ImageLocation {
                offset: 0x2000,
                len: image.len() as u64,
                crc: crc32fast::hash(image),
            }),
            flags: 0,
        };
        let raw = sb.encode();
        out[i * 0x1000..i * 0x1000 + raw.as_bytes().len()].copy_from_slice(raw.as_bytes());
    }
    Ok(out)
}

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "seeds".into()));
    let small = 1u64 << 20;

    let with_tree = full_image(small, 0x80, true)?;
    let without_tree = full_image(small, 0x80, false)?;
    let empty = ImageBuilder::new(small).build()?;
    write(&dir, "image_parse", "full", &with_tree)?;
    write(&dir, "image_parse", "no-tree", &without_tree)?;
    write(&dir, "image_parse", "empty", &empty)?;

    let encoded = tree().encode()?;
    write(&dir, "tree_decode", "sample", &encoded)?;
    write(
        &dir,
        "tree_decode",
        "root-only",
        &Tree::new(Node::root("x")).encode()?,
    )?;

    // An arena of 1 MiB whose image sits at page 2 (inside what the layout
    // calls scratch: the slot checks do not care, the checker does).
    for (name, slots) in [
        ("both-slots", [Some(1), Some(2)]),
        ("slot0-only", [Some(5), None]),
        ("slot1-only", [None, Some(9)]),
    ] {
        let head = arena_head(small, &with_tree, slots)?;
        let mut input = small.to_le_bytes().to_vec();
        input.extend_from_slice(&head);
        write(&dir, "arena_open", name, &input)?;
        // The check target reduces the length modulo its range; this
        // encodes exactly 1 MiB.
        let mut input = (small - kho_alloc::layout::MIN_ARENA_SIZE)
            .to_le_bytes()
            .to_vec();
        input.extend_from_slice(&head);
        write(&dir, "check", name, &input)?;
    }
    write(&dir, "check", "bare-image", &with_tree)?;

    // Unstructured bytes for `roundtrip`: any bytes decode to some input.
    for (i, len) in [64usize, 512, 2048].into_iter().enumerate() {
        let bytes: Vec<u8> = (0..len).map(|j| (j * 131 + i * 17) as u8).collect();
        write(&dir, "roundtrip", &format!("pattern-{len}"), &bytes)?;
    }
    Ok(())
}
