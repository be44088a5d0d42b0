//! `kho diff` on pairs of images that differ in one way each: the clean
//! fixture's image taken apart, edited, and rebuilt.

use std::path::Path;

use kho_core::image::layout::SECTION_REQUIRED;
use kho_core::image::testing::{RawImage, RawSectionSpec};
use kho_core::{
    Extent, Image, ImageBuilder, Node, PhysAddr, PhysRange, PreservedMap, SlabCacheInfo,
    SlabPageInfo, Tree, Value,
};
use serde_json::Value as Json;

use crate::common::{fixtures, kho, kho_in};

/// An image's contents, editable.
struct Parts {
    arena_size: u64,
    generation: u64,
    map: PreservedMap,
    scratch: Vec<PhysRange>,
    kfence: Vec<PhysRange>,
    caches: Vec<SlabCacheInfo>,
    pages: Vec<SlabPageInfo>,
    extents: Vec<Extent>,
    tree: Option<Tree>,
}

impl Parts {
    fn of(image: &Image<'_>) -> Parts {
        Parts {
            arena_size: image.arena_size(),
            generation: image.header().generation,
            map: image.to_map(),
            scratch: image.scratch().collect(),
            kfence: image.kfence().collect(),
            caches: image
                .slab_caches()
                .map(|c| SlabCacheInfo {
                    id: c.id(),
                    name: c.name().to_owned(),
                    object_size: c.object_size(),
                    align: c.align(),
                    objects_per_slab: c.objects_per_slab(),
                    order: c.order(),
                })
                .collect(),
            pages: image
                .slab_pages()
                .map(|p| SlabPageInfo {
                    pfn: p.pfn(),
                    cache_id: p.cache_id(),
                    order: p.order(),
                    object_size: p.object_size(),
                    object_count: p.object_count(),
                    first_offset: p.first_offset(),
                    bitmap: p.bitmap_words().collect(),
                })
                .collect(),
            extents: image.extents().collect(),
            tree: image.tree().cloned(),
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut b = ImageBuilder::new(self.arena_size)
            .generation(self.generation)
            .memmap(&self.map)
            .scratch(self.scratch.clone())
            .kfence(self.kfence.clone())
            .slab(self.caches.clone(), self.pages.clone())
            .extents(self.extents.clone());
        if let Some(t) = &self.tree {
            b = b.tree(t);
        }
        b.build().expect("a valid edit")
    }

    fn root(&mut self) -> &mut Node {
        self.tree
            .as_mut()
            .expect("the clean image has a tree")
            .root_mut()
    }
}

fn clean() -> Vec<u8> {
    std::fs::read(fixtures().join("clean.img")).unwrap()
}

fn edit(f: impl FnOnce(&mut Parts)) -> Vec<u8> {
    let bytes = clean();
    let mut parts = Parts::of(&Image::parse(&bytes).unwrap());
    f(&mut parts);
    parts.build()
}

fn raw_edit(f: impl FnOnce(&mut RawImage)) -> Vec<u8> {
    let bytes = clean();
    let mut raw = RawImage::from_image(&Image::parse(&bytes).unwrap());
    f(&mut raw);
    raw.to_bytes()
}

/// One edit per kind of difference `kho diff` reports: name, the edited
/// image (compared against clean.img).
pub fn cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("unchanged", edit(|_| {})),
        // Only the generation differs: not compared.
        ("generation", edit(|p| p.generation = 9)),
        ("minor-version", raw_edit(|r| r.version_minor = 1)),
        ("header-size", raw_edit(|r| r.header_tail = vec![0; 8])),
        (
            "section-added",
            raw_edit(|r| r.sections.push(RawSectionSpec::new(0x77, 0, vec![1; 8]))),
        ),
        (
            "section-required",
            raw_edit(|r| {
                if let Some(s) = r.section_mut(kho_core::SectionKind::Extents) {
                    s.flags = SECTION_REQUIRED;
                }
            }),
        ),
        // No EXTENTS section: a checker then makes no claim about the
        // bytes of plain folios.
        ("extents-section-removed", edit(|p| p.extents.clear())),
        (
            "extent-added",
            edit(|p| {
                p.extents.push(Extent {
                    range: PhysRange::new(PhysAddr(0x18000 + 0x1000), 64),
                    tag: 2,
                });
            }),
        ),
        ("extent-retagged", edit(|p| p.extents[0].tag = 7)),
        (
            "cache-added",
            edit(|p| {
                p.caches.push(SlabCacheInfo {
                    id: 2,
                    name: "spare".into(),
                    object_size: 32,
                    align: 8,
                    objects_per_slab: 128,
                    order: kho_core::Order::ZERO,
                });
            }),
        ),
        ("cache-align", edit(|p| p.caches[0].align = 16)),
        (
            "cache-removed",
            edit(|p| {
                p.caches.retain(|c| c.name != "conns");
                p.pages.retain(|s| s.cache_id != 1);
            }),
        ),
        // One object freed and another allocated: the same totals, a
        // different page.
        (
            "slab-object-moved",
            edit(|p| {
                let w = &mut p.pages[0].bitmap[0];
                *w &= !(1 << 1);
                *w |= 1 << 2;
            }),
        ),
        ("slab-first-offset", edit(|p| p.pages[1].first_offset = 16)),
        (
            "slab-page-removed",
            edit(|p| {
                p.pages.remove(1);
            }),
        ),
        (
            "tree-node-added",
            edit(|p| {
                p.root()
                    .push_child(Node::new("extra", "extra-v1").with_u64("n", 1));
            }),
        ),
        (
            "tree-node-removed",
            edit(|p| p.root().children.retain(|c| c.name != "kv")),
        ),
        (
            "tree-compatible",
            edit(|p| {
                if let Some(kv) = p.root().child_mut("kv") {
                    kv.compatible = "kv-store-v2".into();
                }
            }),
        ),
        (
            "tree-prop-removed",
            edit(|p| {
                if let Some(kv) = p.root().child_mut("kv") {
                    kv.remove_prop("format");
                }
            }),
        ),
        (
            "tree-prop-changed",
            edit(|p| {
                if let Some(s) = p.root().child_mut("sessions") {
                    s.set_prop("count", Value::U64(4));
                }
            }),
        ),
    ]
}

/// Pairs of fixtures that differ in preserved memory, slab pages, regions
/// or arena: golden name, a, b.
pub const FIXTURE_PAIRS: &[(&str, &str, &str)] = &[
    ("clean-kfence-slab", "clean.arena", "kfence-slab.arena"),
    ("clean-dangling", "clean.img", "dangling.img"),
    (
        "clean-preserved-in-scratch",
        "clean.arena",
        "preserved-in-scratch.arena",
    ),
    (
        "clean-kfence-preserved",
        "clean.arena",
        "kfence-preserved.arena",
    ),
    (
        "clean-wrong-arena",
        "clean.arena",
        "image-wrong-arena.arena",
    ),
    // The same image over different memory contents.
    (
        "clean-stale-free-slot",
        "clean.arena",
        "stale-free-slot.arena",
    ),
];

/// Write every case as `<name>.img` next to `clean.img` in `dir`.
pub fn write_cases(dir: &Path) -> Vec<&'static str> {
    std::fs::write(dir.join("clean.img"), clean()).unwrap();
    cases()
        .into_iter()
        .map(|(name, bytes)| {
            std::fs::write(dir.join(format!("{name}.img")), bytes).unwrap();
            name
        })
        .collect()
}

fn diff_json(dir: &Path, name: &str) -> (i32, Json) {
    let b = format!("{name}.img");
    let r = kho_in(dir, &["diff", "clean.img", &b, "--json"]);
    assert!(r.stderr.is_empty(), "{name}: {}", r.stderr);
    (r.code, serde_json::from_str(&r.stdout).unwrap())
}

fn only(doc: &Json, key: &str) -> Vec<Json> {
    let lists = [
        "header",
        "sections",
        "preserved",
        "slab",
        "slab_pages",
        "tree",
    ];
    for k in lists {
        if k != key {
            assert_eq!(doc[k], Json::Array(Vec::new()), "{key}: {k} also differs");
        }
    }
    doc[key].as_array().cloned().unwrap_or_default()
}

#[test]
fn every_kind_of_difference_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_cases(dir.path());
    let d = dir.path();
    for name in ["unchanged", "generation"] {
        let (code, doc) = diff_json(d, name);
        assert_eq!((code, &doc["same"]), (0, &Json::Bool(true)), "{name}");
    }
    let (code, doc) = diff_json(d, "minor-version");
    assert_eq!(code, 1);
    let h = only(&doc, "header");
    assert_eq!(
        (h.len(), &h[0]["field"], &h[0]["b"]),
        (1, &"version".into(), &"1.1".into())
    );
    let (_, doc) = diff_json(d, "header-size");
    assert_eq!(only(&doc, "header")[0]["b"], "80");
    let (_, doc) = diff_json(d, "section-added");
    let s = only(&doc, "sections");
    assert_eq!(
        (&s[0]["kind"], &s[0]["a"], &s[0]["b"]),
        (&"UNKNOWN(0x77)".into(), &Json::Null, &"optional".into())
    );
    let (_, doc) = diff_json(d, "section-required");
    assert_eq!(only(&doc, "sections")[0]["b"], "required");
    let (_, doc) = diff_json(d, "extents-section-removed");
    assert_eq!(doc["sections"][0]["kind"], "EXTENTS");
    assert!(doc["sections"][0]["b"].is_null());
    assert_eq!(doc["extents"]["removed"].as_array().unwrap().len(), 1);
    let (_, doc) = diff_json(d, "extent-added");
    assert_eq!(doc["extents"]["added"][0]["tag"], 2);
    only(&doc, "extents");
    let (_, doc) = diff_json(d, "extent-retagged");
    assert_eq!(doc["extents"]["added"][0]["tag"], 7);
    assert_eq!(doc["extents"]["removed"][0]["tag"], 1);
    let (_, doc) = diff_json(d, "cache-added");
    let c = only(&doc, "slab");
    assert_eq!(
        (&c[0]["cache"], &c[0]["change"]),
        (&"spare".into(), &"added".into())
    );
    let (_, doc) = diff_json(d, "cache-align");
    let c = only(&doc, "slab");
    assert_eq!(
        (&c[0]["field"], &c[0]["a"], &c[0]["b"]),
        (&"align".into(), &8.into(), &16.into())
    );
    let (_, doc) = diff_json(d, "cache-removed");
    assert_eq!(doc["slab"][0]["change"], "removed");
    assert_eq!(doc["slab_pages"][0]["change"], "removed");
    assert_eq!(doc["slab_pages"][0]["cache"], "conns");
    // The totals stay (3 live, 61 free); the page does not.
    let (code, doc) = diff_json(d, "slab-object-moved");
    assert_eq!(code, 1);
    let p = only(&doc, "slab_pages");
    assert_eq!(p.len(), 1);
    assert_eq!(
        (&p[0]["change"], &p[0]["pfn"]),
        (&"changed".into(), &8.into())
    );
    assert_eq!(p[0]["allocated"], serde_json::json!([2]));
    assert_eq!(p[0]["freed"], serde_json::json!([1]));
    assert_eq!(p[0]["fields"], serde_json::json!([]));
    let (_, doc) = diff_json(d, "slab-first-offset");
    let p = only(&doc, "slab_pages");
    assert_eq!(
        p[0]["fields"],
        serde_json::json!([{ "field": "first_offset", "a": "0", "b": "16" }])
    );
    let (_, doc) = diff_json(d, "slab-page-removed");
    assert_eq!(doc["slab_pages"][0]["change"], "removed");
    assert_eq!(doc["slab_pages"][0]["live"], 5);
    for (name, change) in [
        ("tree-node-added", "node-added"),
        ("tree-node-removed", "node-removed"),
        ("tree-compatible", "compatible"),
        ("tree-prop-removed", "prop-removed"),
        ("tree-prop-changed", "prop-changed"),
    ] {
        let (code, doc) = diff_json(d, name);
        assert_eq!(code, 1, "{name}");
        let t = only(&doc, "tree");
        assert!(!t.is_empty(), "{name}");
        assert!(t.iter().all(|c| c["change"] == change), "{name}: {t:?}");
    }
    let (_, doc) = diff_json(d, "tree-node-removed");
    assert_eq!(doc["tree"][0]["path"], "/kv");
}

#[test]
fn fixture_pairs_differ_where_expected() {
    let r = kho(&[
        "diff",
        "clean.arena",
        "preserved-in-scratch.arena",
        "--json",
    ]);
    let doc: Json = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(r.code, 1);
    assert_eq!(doc["preserved"][0]["added"]["ranges"][0]["start"], 0x2000);
    assert_eq!(doc["scratch"]["b"][0]["start"], 0x3000);
    let r = kho(&["diff", "clean.arena", "kfence-preserved.arena", "--json"]);
    let doc: Json = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["kfence"]["b"][0]["start"], 0x5000);
    let r = kho(&["diff", "clean.arena", "image-wrong-arena.arena"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("arena size: 0x40000 -> 0x80000"),
        "{}",
        r.stdout
    );
    // Memory contents are not part of the image: the same handover.
    assert_eq!(
        kho(&["diff", "clean.arena", "stale-free-slot.arena"]).code,
        0
    );
}
