//! Generate `fixtures/`: small arenas and bare images, good and
//! deliberately bad, for the `kho` CLI tests and the fuzz seeds.
//!
//! Deterministic: the same build writes the same bytes (a test regenerates
//! into a temporary directory and compares). Usage:
//!
//! ```text
//! cargo run -p kho-cli --bin gen-fixtures -- [OUT_DIR]   # default: fixtures
//! gen-fixtures --bench-arena PATH SIZE PRESERVED [--dense] # for scripts/bench-check.sh
//! ```
//!
//! `SIZE` and `PRESERVED` are GiB, or MiB with an `M` suffix (`300M`).
//! `--dense` writes every preserved byte (zeros past each folio's data),
//! so the preserved folios take disk space and sit in the page cache
//! instead of being holes.
//!
//! Every arena is built directly with [`Arena`] and [`ImageBuilder`]
//! rather than through the heap, so each fixture contains exactly the
//! state its name says and does not change when allocator policy does.
//! `fixtures/README.md` lists each file with its expected exit code and
//! finding codes.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kho_alloc::superblock::{ImageLocation, Superblock};
use kho_alloc::{Arena, ArenaConfig, Layout, Region};
use kho_core::image::layout::SECTION_REQUIRED;
use kho_core::image::testing::{RawImage, RawSectionSpec};
use kho_core::{
    Extent, Image, ImageBuilder, Node, Order, Pfn, PhysAddr, PhysRange, PreservedMap, SectionKind,
    SlabCacheInfo, SlabPageInfo, Tree, TreeLimits, PAGE_SIZE,
};
use zerocopy::IntoBytes;

/// Every arena fixture: 64 pages, the smallest arena.
const ARENA_SIZE: u64 = 256 << 10;

fn o(n: u8) -> Order {
    Order::new(n).unwrap_or(Order::ZERO)
}

fn addr(pfn: Pfn) -> PhysAddr {
    PhysAddr(pfn.0 * PAGE_SIZE)
}

fn page_range(pfn: Pfn, pages: u64) -> PhysRange {
    PhysRange::new(addr(pfn), pages * PAGE_SIZE)
}

/// A deterministic byte pattern for "live data".
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8) | 1)
        .collect()
}

/// One slab page in the making.
struct Slab {
    pfn: Pfn,
    cache_id: u32,
    object_size: u32,
    count: u32,
    live: Vec<u32>,
}

/// The contents of an arena fixture, edited by each variant before
/// [`Fx::write`].
struct Fx {
    layout: Layout,
    map: PreservedMap,
    caches: Vec<SlabCacheInfo>,
    slabs: Vec<Slab>,
    extents: Vec<Extent>,
    tree: Option<Tree>,
    /// Image SCRATCH / KFENCE sections; `None` for the arena's regions.
    scratch: Option<Vec<PhysRange>>,
    kfence: Option<Vec<PhysRange>>,
    /// Bytes written into the arena before the image.
    writes: Vec<(PhysAddr, Vec<u8>)>,
    /// Where the image goes.
    image_at: Pfn,
    /// Arena size written into the image header.
    image_arena_size: u64,
    /// Preserve the image's own folio (at `image_at`, of the least order
    /// covering the image) in its MEMMAP, as the heap's freeze does.
    image_folio: bool,
}

impl Fx {
    fn layout() -> Result<Layout> {
        Ok(ArenaConfig::with_size(ARENA_SIZE).layout()?)
    }

    fn pfn(&self, region: Region, i: u64) -> Pfn {
        Pfn(self.layout.range(region).start.0 + i)
    }

    /// The clean state: two preservable caches with live objects, one
    /// preserved general folio with a declared extent, a metadata tree
    /// pointing into both, and the image in general memory (page 40) in a
    /// folio its own MEMMAP preserves.
    fn clean() -> Result<Fx> {
        let layout = Self::layout()?;
        let mut fx = Fx {
            layout,
            map: PreservedMap::new(Pfn(layout.pages)),
            caches: Vec::new(),
            slabs: Vec::new(),
            extents: Vec::new(),
            tree: None,
            scratch: None,
            kfence: None,
            writes: Vec::new(),
            image_at: Pfn(layout.general.start.0 + 16),
            image_arena_size: ARENA_SIZE,
            image_folio: true,
        };
        fx.caches = vec![
            SlabCacheInfo {
                id: 0,
                name: "sessions".into(),
                object_size: 64,
                align: 8,
                objects_per_slab: 64,
                order: Order::ZERO,
            },
            SlabCacheInfo {
                id: 1,
                name: "conns".into(),
                object_size: 48,
                align: 8,
                objects_per_slab: 85,
                order: Order::ZERO,
            },
        ];
        let sessions = fx.pfn(Region::Preservable, 0);
        let conns = fx.pfn(Region::Preservable, 1);
        fx.slab(sessions, 0, 64, 64, &[0, 1, 3]);
        fx.slab(conns, 1, 48, 85, &[0, 1, 2, 3, 4]);
        // A subsystem's own pages: 200 valid bytes in an order-1 folio.
        let kv = fx.pfn(Region::General, 0);
        fx.map.preserve(kv, o(1))?;
        fx.writes.push((addr(kv), pattern(7, 200)));
        fx.extents.push(Extent {
            range: PhysRange::new(addr(kv), 200),
            tag: 1,
        });
        fx.tree = Some(Tree::new(
            Node::root("kho-fixture-v1")
                .with_child(
                    Node::new("sessions", "sessions-v1")
                        .with_range("first", PhysRange::new(addr(sessions), 64))
                        .with_u64("count", 3),
                )
                .with_child(
                    Node::new("kv", "kv-store-v1")
                        .with_range("data", PhysRange::new(addr(kv), 200))
                        .with_str("format", "log"),
                ),
        ));
        Ok(fx)
    }

    /// A slab page of `cache_id` at `pfn`, preserved, with `live` objects
    /// holding data.
    fn slab(&mut self, pfn: Pfn, cache_id: u32, object_size: u32, count: u32, live: &[u32]) {
        let _ = self.map.preserve(pfn, Order::ZERO);
        for &i in live {
            let at = PhysAddr(addr(pfn).0 + u64::from(i * object_size));
            self.writes
                .push((at, pattern((cache_id * 16 + i) as u8, object_size as usize)));
        }
        self.slabs.push(Slab {
            pfn,
            cache_id,
            object_size,
            count,
            live: live.to_vec(),
        });
    }

    /// The image, with its own folio preserved when `image_folio`.
    fn image(&self) -> Result<Vec<u8>> {
        if self.image_folio {
            with_image_folio(&self.map, self.image_at, |m| self.image_with(m))
        } else {
            self.image_with(&self.map)
        }
    }

    fn image_with(&self, map: &PreservedMap) -> Result<Vec<u8>> {
        let pages: Vec<SlabPageInfo> = self
            .slabs
            .iter()
            .map(|s| {
                let mut bitmap = vec![0u64; s.count.div_ceil(64) as usize];
                for &i in &s.live {
                    bitmap[(i / 64) as usize] |= 1 << (i % 64);
                }
                SlabPageInfo {
                    pfn: s.pfn,
                    cache_id: s.cache_id,
                    order: Order::ZERO,
                    object_size: s.object_size,
                    object_count: s.count,
                    first_offset: 0,
                    bitmap,
                }
            })
            .collect();
        let mut b = ImageBuilder::new(self.image_arena_size)
            .generation(2)
            .memmap(map)
            .scratch(
                self.scratch
                    .clone()
                    .unwrap_or_else(|| vec![self.layout.bytes_of(Region::Scratch)]),
            )
            .kfence(
                self.kfence
                    .clone()
                    .unwrap_or_else(|| vec![self.layout.bytes_of(Region::Kfence)]),
            )
            .slab(self.caches.clone(), pages)
            .extents(self.extents.clone());
        if let Some(t) = &self.tree {
            b = b.tree(t);
        }
        Ok(b.build()?)
    }

    /// Create the arena file, write the data and the image, publish.
    fn write(&self, path: &Path) -> Result<()> {
        let image = self.image()?;
        self.write_with_image(path, &image)
    }

    fn write_with_image(&self, path: &Path, image: &[u8]) -> Result<()> {
        let mut arena = Arena::create_file(path, &ArenaConfig::with_size(ARENA_SIZE))?;
        for (at, bytes) in &self.writes {
            arena.write(*at, bytes)?;
        }
        let at = addr(self.image_at);
        arena.write(at, image)?;
        arena.commit_image(ImageLocation {
            offset: at.0,
            len: image.len() as u64,
            crc: crc32(image),
        })?;
        Ok(())
    }
}

/// The least order whose folio holds `len` bytes.
fn order_for(len: u64) -> Result<Order> {
    Order::covering(len).with_context(|| format!("no folio order holds {len} bytes"))
}

/// Build an image whose MEMMAP is `map` plus the image's own folio at
/// `at`, of the least order that covers the image it is listed in (the
/// folio is grown until it does, as listing it can lengthen the image).
fn with_image_folio(
    map: &PreservedMap,
    at: Pfn,
    build: impl Fn(&PreservedMap) -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    let mut image = build(map)?;
    loop {
        let order = order_for(image.len() as u64)?;
        let mut own = map.clone();
        own.preserve(at, order)?;
        image = build(&own)?;
        if image.len() as u64 <= order.bytes() {
            return Ok(image);
        }
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    kho_alloc::check::crc32(bytes)
}

/// Overwrite bytes of a file.
fn patch(path: &Path, at: u64, bytes: &[u8]) -> Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(bytes, at)?;
    Ok(())
}

/// Read superblock slot `slot` of an arena file.
fn read_slot(path: &Path, slot: u64) -> Result<Superblock> {
    let bytes = std::fs::read(path)?;
    let page = &bytes[(slot * PAGE_SIZE) as usize..((slot + 1) * PAGE_SIZE) as usize];
    Ok(Superblock::decode(
        page,
        slot * PAGE_SIZE,
        bytes.len() as u64,
    )?)
}

fn write_slot(path: &Path, slot: u64, sb: &Superblock) -> Result<()> {
    patch(path, slot * PAGE_SIZE, sb.encode().as_bytes())
}

/// The writer of one fixture.
type Gen = fn(&Path) -> Result<()>;

fn arena_variant(path: &Path, edit: impl FnOnce(&mut Fx) -> Result<()>) -> Result<()> {
    let mut fx = Fx::clean()?;
    edit(&mut fx)?;
    fx.write(path)
}

fn clean_image() -> Result<Vec<u8>> {
    Fx::clean()?.image()
}

fn raw_clean() -> Result<RawImage> {
    let bytes = clean_image()?;
    let image = Image::parse(&bytes)?;
    Ok(RawImage::from_image(&image))
}

fn block(base: u64, order: u8, bits: &[(usize, u64)]) -> Vec<u8> {
    let mut words = [0u64; 64];
    for &(w, v) in bits {
        words[w] = v;
    }
    RawImage::block(base, order, &words)
}

/// Every fixture: file name and generator.
const FIXTURES: &[(&str, Gen)] = &[
    ("clean.arena", |p| arena_variant(p, |_| Ok(()))),
    ("clean.img", |p| Ok(std::fs::write(p, clean_image()?)?)),
    // KHO-S001: a free slot of a preserved slab page (sessions, slot 2)
    // still holds the previous owner's bytes.
    ("stale-free-slot.arena", |p| {
        arena_variant(p, |fx| {
            let at = PhysAddr(addr(fx.pfn(Region::Preservable, 0)).0 + 2 * 64);
            fx.writes
                .push((at, b"previous owner: secret-token-42\0".to_vec()));
            Ok(())
        })
    }),
    // KHO-S002: the 16-byte tail after the 85 48-byte slots of the conns
    // page.
    ("stale-slab-tail.arena", |p| {
        arena_variant(p, |fx| {
            let at = PhysAddr(addr(fx.pfn(Region::Preservable, 1)).0 + 85 * 48);
            fx.writes.push((at, vec![0xa5; 16]));
            Ok(())
        })
    }),
    // KHO-S003: bytes past the 200-byte extent of the kv folio.
    ("stale-outside-extent.arena", |p| {
        arena_variant(p, |fx| {
            let at = PhysAddr(addr(fx.pfn(Region::General, 0)).0 + 0x1800);
            fx.writes.push((at, b"old log record".to_vec()));
            Ok(())
        })
    }),
    // KHO-P001 (and P002): a folio preserved inside the arena's scratch
    // region, hidden from the parser by an image whose SCRATCH section
    // omits that page.
    ("preserved-in-scratch.arena", |p| {
        arena_variant(p, |fx| {
            let s = fx.layout.scratch;
            fx.map.preserve(s.start, Order::ZERO)?;
            fx.scratch = Some(vec![page_range(Pfn(s.start.0 + 1), s.pages() - 1)]);
            Ok(())
        })
    }),
    // KHO-K001 (and K004, P002): the image puts its KFENCE pool on the
    // arena's scratch pages and lists no scratch.
    ("kfence-in-scratch.arena", |p| {
        arena_variant(p, |fx| {
            fx.kfence = Some(vec![fx.layout.bytes_of(Region::Scratch)]);
            fx.scratch = Some(Vec::new());
            Ok(())
        })
    }),
    // KHO-K002 (and K004): a plain folio preserved inside the arena's
    // KFENCE pool; the image's KFENCE section omits it.
    ("kfence-preserved.arena", |p| {
        arena_variant(p, |fx| {
            let k = fx.layout.kfence;
            fx.map.preserve(k.start, Order::ZERO)?;
            fx.kfence = Some(vec![page_range(Pfn(k.start.0 + 1), k.pages() - 1)]);
            Ok(())
        })
    }),
    // KHO-K003 (and K004): a preserved slab page with live objects in the
    // KFENCE pool.
    ("kfence-slab.arena", |p| {
        arena_variant(p, |fx| {
            let k = fx.layout.kfence;
            fx.slab(k.start, 0, 64, 64, &[5]);
            fx.kfence = Some(vec![page_range(Pfn(k.start.0 + 1), k.pages() - 1)]);
            Ok(())
        })
    }),
    // KHO-T001: a PhysRange property pointing at general memory that is
    // not preserved.
    ("dangling-range.arena", |p| {
        arena_variant(p, |fx| {
            let at = addr(fx.pfn(Region::General, 4));
            if let Some(t) = &mut fx.tree {
                t.root_mut()
                    .set_prop("orphan", kho_core::Value::Range(PhysRange::new(at, 128)));
            }
            Ok(())
        })
    }),
    // KHO-T002: a PhysRange property past the end of the arena.
    ("range-outside-arena.arena", |p| {
        arena_variant(p, |fx| {
            if let Some(t) = &mut fx.tree {
                t.root_mut().set_prop(
                    "beyond",
                    kho_core::Value::Range(PhysRange::new(PhysAddr(ARENA_SIZE + 0x1000), 64)),
                );
            }
            Ok(())
        })
    }),
    // KHO-I001: the image lies in general memory, but its MEMMAP does not
    // preserve the image's own folio, so a successor may reuse its pages
    // before reading it.
    ("image-not-preserved.arena", |p| {
        arena_variant(p, |fx| {
            fx.image_folio = false;
            Ok(())
        })
    }),
    // KHO-I002: the image (and its preserved folio) lies in the
    // preservable pool instead of general memory.
    ("image-outside-general.arena", |p| {
        arena_variant(p, |fx| {
            fx.image_at = fx.pfn(Region::Preservable, 8);
            Ok(())
        })
    }),
    // KHO-I003: the image header describes a 512 KiB arena.
    ("image-wrong-arena.arena", |p| {
        arena_variant(p, |fx| {
            fx.image_arena_size = 2 * ARENA_SIZE;
            Ok(())
        })
    }),
    // KHO-B001: the older superblock slot (0) has a flipped CRC byte.
    ("bad-slot.arena", |p| {
        arena_variant(p, |_| Ok(()))?;
        patch(p, 0x7c, &[0xff])
    }),
    // KHO-B002: both slots carry the current generation.
    ("same-generation.arena", |p| {
        arena_variant(p, |_| Ok(()))?;
        let current = read_slot(p, 1)?;
        write_slot(p, 0, &current)
    }),
    // KHO-B003: the current slot records a wrong CRC for the image.
    ("image-crc.arena", |p| {
        arena_variant(p, |_| Ok(()))?;
        let mut sb = read_slot(p, 1)?;
        if let Some(img) = &mut sb.image {
            img.crc ^= 0x5a5a_5a5a;
        }
        write_slot(p, 1, &sb)
    }),
    // Exit 2: both superblock slots corrupt.
    ("both-slots-bad.arena", |p| {
        arena_variant(p, |_| Ok(()))?;
        patch(p, 0x7c, &[0xff])?;
        patch(p, PAGE_SIZE + 0x7c, &[0xff])
    }),
    // Exit 2: a formatted arena that never published an image.
    ("no-image.arena", |p| {
        Arena::create_file(p, &ArenaConfig::with_size(ARENA_SIZE))?;
        Ok(())
    }),
    // Exit 2: the arena's image fails its SCRATCH section CRC.
    ("bad-image.arena", |p| {
        let fx = Fx::clean()?;
        let mut raw = raw_clean()?;
        if let Some(s) = raw.section_mut(SectionKind::Scratch) {
            s.crc = Some(0x1234_5678);
        }
        fx.write_with_image(p, &raw.to_bytes())
    }),
    // Exit 2: both slots valid, but the older one puts the boundary
    // between the preservable pool and general memory one page lower.
    ("slots-disagree.arena", |p| {
        arena_variant(p, |_| Ok(()))?;
        let mut old = read_slot(p, 0)?;
        old.layout.preservable.end = Pfn(old.layout.preservable.end.0 - 1);
        old.layout.general.start = Pfn(old.layout.general.start.0 - 1);
        write_slot(p, 0, &old)
    }),
    // Exit 2: an arena cut after 100000 bytes; its slots record 256 KiB.
    ("truncated.arena", |p| {
        arena_variant(p, |_| Ok(()))?;
        let bytes = std::fs::read(p)?;
        Ok(std::fs::write(p, &bytes[..100_000])?)
    }),
    // Exit 2: the first 20 bytes of an arena (its magic and a little).
    ("short.arena", |p| {
        arena_variant(p, |_| Ok(()))?;
        let bytes = std::fs::read(p)?;
        Ok(std::fs::write(p, &bytes[..20])?)
    }),
    // Exit 2: the first 5 bytes of an image, shorter than its magic.
    ("short.img", |p| {
        Ok(std::fs::write(p, &clean_image()?[..5])?)
    }),
    // Exit 2: no bytes at all.
    ("empty.bin", |p| Ok(std::fs::write(p, [])?)),
    // Exit 2: 4 KiB of pseudo-random bytes (xorshift, fixed seed).
    ("random.bin", |p| {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let bytes: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Ok(std::fs::write(p, bytes)?)
    }),
    // KHO-P002 alone: the image's SCRATCH section lists only the second
    // scratch page; nothing is preserved in the first.
    ("scratch-differs.arena", |p| {
        arena_variant(p, |fx| {
            let s = fx.layout.scratch;
            fx.scratch = Some(vec![page_range(Pfn(s.start.0 + 1), s.pages() - 1)]);
            Ok(())
        })
    }),
    // KHO-K004 alone: the image's KFENCE section lists the arena's pool
    // and two unpreserved pages of general memory (pages 30-31).
    ("kfence-outside.arena", |p| {
        arena_variant(p, |fx| {
            fx.kfence = Some(vec![
                fx.layout.bytes_of(Region::Kfence),
                page_range(fx.pfn(Region::General, 6), 2),
            ]);
            Ok(())
        })
    }),
    // KHO-S004: bytes left after the image in its own folio, as a folio
    // reused from an earlier, longer image would hold.
    ("stale-image-folio.arena", |p| {
        let fx = Fx::clean()?;
        let image = fx.image()?;
        let mut fx = fx;
        let at = PhysAddr(addr(fx.image_at).0 + image.len() as u64 + 0x100);
        fx.writes.push((at, b"previous image tail".to_vec()));
        fx.write(p)
    }),
    // KHO-T001 and T002 in a bare image (its other checks are skipped).
    ("dangling.img", |p| {
        let mut fx = Fx::clean()?;
        if let Some(t) = &mut fx.tree {
            let root = t.root_mut();
            root.set_prop(
                "orphan",
                kho_core::Value::Range(PhysRange::new(addr(Pfn(48)), 128)),
            );
            root.set_prop(
                "beyond",
                kho_core::Value::Range(PhysRange::new(PhysAddr(ARENA_SIZE), 64)),
            );
        }
        Ok(std::fs::write(p, fx.image()?)?)
    }),
    // Parser errors, one per class (exit 2).
    ("bad-magic.img", |p| {
        let mut raw = raw_clean()?;
        raw.magic = *b"NOTKHO\r\n";
        Ok(std::fs::write(p, raw.to_bytes())?)
    }),
    ("header-crc.img", |p| {
        let mut raw = raw_clean()?;
        raw.header_crc = Some(0xdead_beef);
        Ok(std::fs::write(p, raw.to_bytes())?)
    }),
    ("truncated.img", |p| {
        let bytes = clean_image()?;
        Ok(std::fs::write(p, &bytes[..bytes.len() / 2])?)
    }),
    ("unknown-major.img", |p| {
        let mut raw = raw_clean()?;
        raw.version_major = 2;
        Ok(std::fs::write(p, raw.to_bytes())?)
    }),
    ("unknown-required-section.img", |p| {
        let mut raw = raw_clean()?;
        raw.sections
            .push(RawSectionSpec::new(0x77, SECTION_REQUIRED, vec![0; 8]));
        Ok(std::fs::write(p, raw.to_bytes())?)
    }),
    ("section-out-of-bounds.img", |p| {
        let mut raw = raw_clean()?;
        if let Some(s) = raw.section_mut(SectionKind::Memmap) {
            s.len = Some(1 << 40);
        }
        Ok(std::fs::write(p, raw.to_bytes())?)
    }),
    // Page 1 preserved twice: as part of an order-1 folio at 0 and as an
    // order-0 folio.
    ("overlapping-folios.img", |p| {
        let mut raw = RawImage::new(ARENA_SIZE);
        let mut memmap = block(0, 0, &[(0, 0b10)]);
        memmap.extend(block(0, 1, &[(0, 0b1)]));
        raw.set_payload(SectionKind::Memmap, memmap);
        Ok(std::fs::write(p, raw.to_bytes())?)
    }),
    ("unsorted-blocks.img", |p| {
        let mut raw = RawImage::new(64 << 20);
        let mut memmap = block(4096, 0, &[(0, 1)]);
        memmap.extend(block(0, 0, &[(0, 1)]));
        raw.set_payload(SectionKind::Memmap, memmap);
        Ok(std::fs::write(p, raw.to_bytes())?)
    }),
    ("tree-too-deep.img", |p| {
        let mut node = Node::new("n20", "deep-v1");
        for i in (1..20).rev() {
            node = Node::new(format!("n{i}"), "deep-v1").with_child(node);
        }
        let tree = Tree::new(Node::root("deep-v1").with_child(node));
        let limits = TreeLimits {
            max_depth: 64,
            ..TreeLimits::DEFAULT
        };
        let mut raw = RawImage::new(ARENA_SIZE);
        raw.set_payload(SectionKind::Tree, tree.encode_with(&limits)?);
        Ok(std::fs::write(p, raw.to_bytes())?)
    }),
];

/// Names of every fixture, in generation order.
fn names() -> impl Iterator<Item = &'static str> {
    FIXTURES.iter().map(|(n, _)| *n)
}

fn main() -> std::process::ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == "--bench-arena") {
        let parse = |i: usize| -> Option<u64> { bytes_arg(args.get(i)?.to_str()?) };
        let dense = match args.get(4).and_then(|a| a.to_str()) {
            None => Some(false),
            Some("--dense") if args.len() == 5 => Some(true),
            Some(_) => None,
        };
        let (Some(path), Some(size), Some(preserved), Some(dense)) =
            (args.get(1), parse(2), parse(3), dense)
        else {
            eprintln!(
                "gen-fixtures: usage: --bench-arena PATH SIZE PRESERVED [--dense] (GiB, or MiB with an M suffix)"
            );
            return std::process::ExitCode::from(2);
        };
        return match bench_arena(Path::new(path), size, preserved, dense) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gen-fixtures: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    let out = args
        .first()
        .map_or_else(|| PathBuf::from("fixtures"), PathBuf::from);
    match generate(&out) {
        Ok(n) => {
            eprintln!("gen-fixtures: wrote {n} files to {}", out.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-fixtures: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn generate(out: &Path) -> Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    for (name, gen) in FIXTURES {
        let path = out.join(name);
        gen(&path).with_context(|| format!("generate {name}"))?;
    }
    Ok(names().count())
}

/// `"8"` is 8 GiB, `"300M"` 300 MiB.
fn bytes_arg(s: &str) -> Option<u64> {
    let (n, shift) = match s.strip_suffix(['M', 'm']) {
        Some(n) => (n, 20),
        None => (s.strip_suffix(['G', 'g']).unwrap_or(s), 30),
    };
    n.parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// A large arena for measuring `kho check`: `preserved` bytes of order-9
/// folios in general memory, each with 4 KiB of data declared by an
/// extent, so the checker must read the other 2044 KiB of every folio.
/// Sparse (only the data pages take disk space) unless `dense`, which
/// writes the zeros too and syncs them.
fn bench_arena(path: &Path, size: u64, preserved: u64, dense: bool) -> Result<()> {
    let cfg = ArenaConfig::with_size(size);
    let mut arena = Arena::create_file(path, &cfg)?;
    let layout = *arena.layout();
    let folio = o(9);
    let count = preserved / folio.bytes();
    let start = layout.general.start.0.next_multiple_of(folio.pages());
    anyhow::ensure!(
        start + (count + 1) * folio.pages() <= layout.pages,
        "{} MiB of folios do not fit in the general region",
        preserved >> 20
    );
    let mut map = PreservedMap::new(Pfn(layout.pages));
    map.preserve_folios(Pfn(start), folio, count)?;
    let data = pattern(3, PAGE_SIZE as usize);
    let mut extents = Vec::new();
    for i in 0..count {
        let at = addr(Pfn(start + i * folio.pages()));
        arena.write(at, &data)?;
        if dense {
            let rest = PhysRange::new(PhysAddr(at.0 + PAGE_SIZE), folio.bytes() - PAGE_SIZE);
            arena.bytes_mut(rest)?.fill(0);
        }
        extents.push(Extent {
            range: PhysRange::new(at, PAGE_SIZE),
            tag: 1,
        });
    }
    // The image goes in its own preserved folio after the data folios.
    let image_pfn = Pfn(start + count * folio.pages());
    let image = with_image_folio(&map, image_pfn, |m| {
        Ok(ImageBuilder::new(layout.size())
            .generation(2)
            .memmap(m)
            .scratch(vec![layout.bytes_of(Region::Scratch)])
            .kfence(vec![layout.bytes_of(Region::Kfence)])
            .extents(extents.clone())
            .build()?)
    })?;
    let at = addr(image_pfn);
    arena.write(at, &image)?;
    if dense {
        arena.sync(PhysRange::new(PhysAddr(0), layout.size()))?;
    }
    arena.commit_image(ImageLocation {
        offset: at.0,
        len: image.len() as u64,
        crc: crc32(&image),
    })?;
    Ok(())
}
