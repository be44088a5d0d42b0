//! JSON views of images and arenas, shared by the subcommands. The schema
//! is documented in `docs/CLI.md`; numbers are plain integers.

use kho_alloc::check::Slots;
use kho_alloc::superblock::{ImageLocation, Superblock};
use kho_alloc::SlotError;
use kho_core::{Image, Order, PhysRange, NR_ORDERS};
use serde_json::{json, Value};

use crate::raw::{Crc, View};

/// `{"start": .., "len": ..}`.
pub fn range(r: PhysRange) -> Value {
    json!({ "start": r.start, "len": r.len })
}

/// Per slab cache: pages, live and free objects, in cache-id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUse {
    /// Cache id.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Object size.
    pub object_size: u32,
    /// Alignment.
    pub align: u32,
    /// Objects per slab.
    pub objects_per_slab: u32,
    /// Slab folio order.
    pub order: u8,
    /// Preserved slab pages.
    pub pages: u64,
    /// Live objects.
    pub live: u64,
    /// Free object slots in preserved pages.
    pub free: u64,
}

/// Slab caches with their usage.
pub fn cache_use(image: &Image<'_>) -> Vec<CacheUse> {
    let mut out: Vec<CacheUse> = image
        .slab_caches()
        .map(|c| CacheUse {
            id: c.id(),
            name: c.name().to_owned(),
            object_size: c.object_size(),
            align: c.align(),
            objects_per_slab: c.objects_per_slab(),
            order: c.order().get(),
            pages: 0,
            live: 0,
            free: 0,
        })
        .collect();
    for p in image.slab_pages() {
        // Caches are sorted by id (the parser checks it).
        if let Ok(i) = out.binary_search_by_key(&p.cache_id(), |c| c.id) {
            let live = u64::from(p.allocated_count());
            out[i].pages += 1;
            out[i].live += live;
            out[i].free += u64::from(p.object_count()).saturating_sub(live);
        }
    }
    out
}

/// Preserved folios and bytes per order (orders with folios only).
pub fn per_order(image: &Image<'_>) -> Vec<(Order, u64, u64)> {
    let bytes = image.bytes_per_order();
    let mut out = Vec::new();
    for o in Order::all() {
        let n = image.folios_of(o);
        if n > 0 {
            out.push((o, n, bytes[o.index()]));
        }
    }
    debug_assert!(out.len() <= NR_ORDERS);
    out
}

/// The whole image, as `kho inspect --json` prints it under `"image"`;
/// `raw` (its header and table as stored) gives the CRC status.
pub fn image(image: &Image<'_>, raw: Option<&View>) -> Value {
    let h = image.header();
    let sections = raw.map(View::sections_json).unwrap_or_default();
    let orders: Vec<Value> = per_order(image)
        .into_iter()
        .map(|(o, n, b)| json!({ "order": o.get(), "folios": n, "bytes": b }))
        .collect();
    let caches: Vec<Value> = cache_use(image)
        .into_iter()
        .map(|c| {
            json!({
                "id": c.id, "name": c.name, "object_size": c.object_size,
                "align": c.align, "objects_per_slab": c.objects_per_slab,
                "order": c.order, "pages": c.pages, "live": c.live, "free": c.free,
            })
        })
        .collect();
    let extents: Vec<Value> = image
        .extents()
        .map(|e| json!({ "start": e.range.start, "len": e.range.len, "tag": e.tag }))
        .collect();
    let tree = image.tree().map(|t| {
        json!({
            "nodes": t.node_count(),
            "depth": t.depth(),
            "bytes": image.tree_bytes().len(),
            "root": serde_json::to_value(t.root()).unwrap_or(Value::Null),
        })
    });
    json!({
        "header": {
            "header_size": h.header_size,
            "version": format!("{}.{}", h.version_major, h.version_minor),
            "version_major": h.version_major,
            "version_minor": h.version_minor,
            "page_shift": h.page_shift,
            "flags": h.flags,
            "arena_size": h.arena_size,
            "image_len": h.image_len,
            "generation": h.generation,
            "section_count": h.section_count,
            "header_crc32": h.header_crc32,
            "header_crc_ok": raw.is_some_and(|v| v.header_crc.is_ok()),
            "table_crc32": h.table_crc32,
            "table_crc_ok": raw.is_some_and(|v| v.table_crc.is_ok()),
        },
        "sections": sections,
        "preserved": {
            "orders": orders,
            "folios": image.folio_count(),
            "bytes": image.preserved_bytes(),
            "ranges": image.ranges().count(),
        },
        "scratch": image.scratch().map(range).collect::<Vec<_>>(),
        "kfence": image.kfence().map(range).collect::<Vec<_>>(),
        "slab": { "caches": caches, "pages": image.slab_pages().len() },
        "extents": extents,
        "tree": tree,
    })
}

/// Both slots, as `kho inspect --json` lists them under `"slots"`.
fn slot_list(slots: &[Result<Superblock, SlotError>; 2], current: Option<usize>) -> Vec<Value> {
    slots
        .iter()
        .enumerate()
        .map(|(i, s)| match s {
            Ok(s) => json!({
                "slot": i, "valid": true, "current": Some(i) == current,
                "generation": s.generation, "flags": s.flags, "error": null,
            }),
            Err(e) => json!({
                "slot": i, "valid": false, "current": false,
                "generation": null, "flags": null, "error": e.to_string(),
            }),
        })
        .collect()
}

fn image_location(loc: &ImageLocation, crc: Crc) -> Value {
    json!({
        "offset": loc.offset, "len": loc.len, "crc32": loc.crc,
        "crc_ok": crc.is_ok(), "computed_crc32": crc.computed(loc.crc),
    })
}

/// The arena part of `kho inspect --json`; `crc` is the status of the
/// image bytes against the slot's CRC.
pub fn arena(slots: &Slots, loc: &ImageLocation, crc: Crc) -> Value {
    arena_partial(
        slots.superblock.layout.size(),
        &slots.slots,
        Some(slots.current),
        Some((loc, crc)),
    )
}

/// The arena part for an arena of `size` bytes whose slots may not allow
/// opening it: `current` is the slot in use, if any, and `image` what it
/// records. Fields that need a usable slot are `null` without one.
pub fn arena_partial(
    size: u64,
    slots: &[Result<Superblock, SlotError>; 2],
    current: Option<usize>,
    image: Option<(&ImageLocation, Crc)>,
) -> Value {
    let sb = current.and_then(|i| slots[i].as_ref().ok());
    let regions: Vec<Value> = sb
        .map(|sb| {
            sb.layout
                .regions()
                .iter()
                .map(|(r, _)| {
                    let b = sb.layout.bytes_of(*r);
                    json!({ "name": r.name(), "start": b.start, "len": b.len })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "size": sb.map_or(size, |sb| sb.layout.size()),
        "max_order": sb.map(|sb| sb.layout.max_order.get()),
        "slots": slot_list(slots, current),
        "current_slot": current,
        "generation": sb.map(|sb| sb.generation),
        "restored": sb.map(|sb| sb.flags & kho_alloc::superblock::FLAG_RESTORED != 0),
        "regions": regions,
        "image": image.map(|(l, c)| image_location(l, c)),
    })
}
