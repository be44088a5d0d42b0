//! `kho diff`: what changed between two handovers.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use kho_core::image::layout::SECTION_REQUIRED;
use kho_core::{
    Extent, Folio, Image, Node, Order, PfnRange, PhysRange, Ranges, SectionKind, Value, PAGE_SHIFT,
};
use serde_json::{json, Value as Json};

use crate::fmt::{hex, size, Align, Style, Table};
use crate::input::Input;
use crate::json::{self as j, CacheUse};

/// Ranges listed per order and direction in human output.
const SHOW_RANGES: usize = 16;
/// Slab pages listed in human output.
const SHOW_PAGES: usize = 32;
/// Object indices listed per changed slab page in human output.
const SHOW_OBJECTS: usize = 8;

/// Compare two arenas or images: header and sections, preserved memory
/// added and removed per order, scratch and KFENCE ranges, slab caches and
/// slab pages, extents and the metadata tree. The generation is shown but
/// not compared.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Slab pages are compared by PFN: cache, order, object size and count,
first offset and the allocation bitmap (objects allocated and freed).

Exit codes: 0 same, 1 different, 2 error.

Examples:
  kho diff before.arena after.arena     what the last handover changed
  kho diff a.img b.img --json           the same as one JSON document")]
pub struct Args {
    /// The old arena or image.
    pub a: PathBuf,
    /// The new arena or image.
    pub b: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Folios of one order present in only one side.
#[derive(Debug, Default)]
struct OrderDiff {
    added: Vec<Folio>,
    removed: Vec<Folio>,
}

fn folios_of(image: &Image<'_>, order: Order) -> Vec<Folio> {
    image
        .blocks_of(order)
        .flat_map(kho_core::BlockFolios::new)
        .collect()
}

fn merge_diff(a: &[Folio], b: &[Folio]) -> OrderDiff {
    let mut d = OrderDiff::default();
    let (mut i, mut k) = (0, 0);
    while i < a.len() || k < b.len() {
        match (a.get(i), b.get(k)) {
            (Some(x), Some(y)) if x.pfn == y.pfn => {
                i += 1;
                k += 1;
            }
            (Some(x), Some(y)) if x.pfn < y.pfn => {
                d.removed.push(*x);
                i += 1;
            }
            (Some(x), None) => {
                d.removed.push(*x);
                i += 1;
            }
            (_, Some(y)) => {
                d.added.push(*y);
                k += 1;
            }
            (None, None) => break,
        }
    }
    d
}

fn coalesce(folios: &[Folio]) -> Vec<PfnRange> {
    Ranges::new(folios.iter().copied()).collect()
}

fn bytes_of(folios: &[Folio]) -> u64 {
    folios.iter().map(|f| f.bytes()).sum()
}

fn pfn_range(r: PfnRange) -> PhysRange {
    PhysRange::new(kho_core::PhysAddr(r.start.0 << PAGE_SHIFT), r.bytes())
}

fn value_str(v: &Value) -> String {
    match v {
        Value::U64(x) => format!("u64 {x:#x}"),
        Value::Str(s) => format!("string {s:?}"),
        Value::Bytes(b) => format!("bytes[{}]", b.len()),
        Value::Range(r) => format!("range {r}"),
    }
}

/// One change of the metadata tree.
#[derive(Debug)]
enum TreeChange {
    NodeAdded(String),
    NodeRemoved(String),
    Compatible(String, String, String),
    PropAdded(String, String, String),
    PropRemoved(String, String, String),
    PropChanged(String, String, String, String),
}

fn tree_diff(a: Option<&kho_core::Tree>, b: Option<&kho_core::Tree>) -> Vec<TreeChange> {
    let nodes = |t: Option<&kho_core::Tree>| -> Vec<(String, Node)> {
        t.map(|t| t.walk().map(|(p, n)| (p, shallow(n))).collect())
            .unwrap_or_default()
    };
    let a: BTreeMap<String, Node> = nodes(a).into_iter().collect();
    let b: BTreeMap<String, Node> = nodes(b).into_iter().collect();
    let mut out = Vec::new();
    for (path, na) in &a {
        let Some(nb) = b.get(path) else {
            out.push(TreeChange::NodeRemoved(path.clone()));
            continue;
        };
        if na.compatible != nb.compatible {
            out.push(TreeChange::Compatible(
                path.clone(),
                na.compatible.clone(),
                nb.compatible.clone(),
            ));
        }
        for p in &na.props {
            match nb.value(&p.name) {
                None => out.push(TreeChange::PropRemoved(
                    path.clone(),
                    p.name.clone(),
                    value_str(&p.value),
                )),
                Some(v) if *v != p.value => out.push(TreeChange::PropChanged(
                    path.clone(),
                    p.name.clone(),
                    value_str(&p.value),
                    value_str(v),
                )),
                Some(_) => {}
            }
        }
        for p in &nb.props {
            if na.value(&p.name).is_none() {
                out.push(TreeChange::PropAdded(
                    path.clone(),
                    p.name.clone(),
                    value_str(&p.value),
                ));
            }
        }
    }
    for path in b.keys() {
        if !a.contains_key(path) {
            out.push(TreeChange::NodeAdded(path.clone()));
        }
    }
    out
}

/// A node without its children (the walk visits them separately).
fn shallow(n: &Node) -> Node {
    Node {
        name: n.name.clone(),
        compatible: n.compatible.clone(),
        props: n.props.clone(),
        children: Vec::new(),
    }
}

/// A header field that differs: name, a, b.
type FieldChange = (&'static str, String, String);

/// Header fields compared (not the generation, lengths, offsets or CRCs,
/// which differ between any two handovers).
fn header_diff(a: &Image<'_>, b: &Image<'_>) -> Vec<FieldChange> {
    let (x, y) = (a.header(), b.header());
    let fields: [(&'static str, String, String); 4] = [
        (
            "version",
            format!("{}.{}", x.version_major, x.version_minor),
            format!("{}.{}", y.version_major, y.version_minor),
        ),
        (
            "header_size",
            x.header_size.to_string(),
            y.header_size.to_string(),
        ),
        (
            "page_shift",
            x.page_shift.to_string(),
            y.page_shift.to_string(),
        ),
        (
            "flags",
            format!("{:#x}", x.flags),
            format!("{:#x}", y.flags),
        ),
    ];
    fields.into_iter().filter(|(_, a, b)| a != b).collect()
}

/// How a section is present: `None` when absent.
fn presence(flags: u32) -> String {
    match flags {
        0 => "optional".into(),
        SECTION_REQUIRED => "required".into(),
        f => format!("flags {f:#x}"),
    }
}

/// Sections by kind whose presence or flags differ: kind, a, b.
fn section_diff(a: &Image<'_>, b: &Image<'_>) -> Vec<(String, Option<String>, Option<String>)> {
    let of = |i: &Image<'_>| -> BTreeMap<u32, u32> {
        i.sections().map(|s| (s.kind.raw(), s.flags)).collect()
    };
    let (x, y) = (of(a), of(b));
    let kinds: BTreeSet<u32> = x.keys().chain(y.keys()).copied().collect();
    kinds
        .into_iter()
        .filter_map(|k| {
            let (p, q) = (
                x.get(&k).map(|f| presence(*f)),
                y.get(&k).map(|f| presence(*f)),
            );
            (p != q).then(|| (SectionKind::from_raw(k).to_string(), p, q))
        })
        .collect()
}

/// One preserved slab page, as compared.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Page {
    cache: String,
    order: u8,
    object_size: u32,
    object_count: u32,
    first_offset: u32,
    bitmap: Vec<u64>,
}

impl Page {
    fn live(&self) -> u32 {
        self.bitmap.iter().map(|w| w.count_ones()).sum()
    }

    fn is_allocated(&self, i: u32) -> bool {
        self.bitmap
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Slab pages by PFN, each named by its cache (`#id` for an id without a
/// cache record).
fn pages_of(image: &Image<'_>) -> BTreeMap<u64, Page> {
    image
        .slab_pages()
        .map(|p| {
            let cache = image
                .slab_cache(p.cache_id())
                .map_or_else(|| format!("#{}", p.cache_id()), |c| c.name().to_owned());
            (
                p.pfn().0,
                Page {
                    cache,
                    order: p.order().get(),
                    object_size: p.object_size(),
                    object_count: p.object_count(),
                    first_offset: p.first_offset(),
                    bitmap: p.bitmap_words().collect(),
                },
            )
        })
        .collect()
}

/// A slab page present in one side only, or changed.
#[derive(Debug)]
enum PageChange {
    Added(u64, Page),
    Removed(u64, Page),
    Changed {
        pfn: u64,
        cache: String,
        fields: Vec<FieldChange>,
        /// Objects allocated in b and not in a.
        allocated: Vec<u32>,
        /// Objects allocated in a and not in b.
        freed: Vec<u32>,
    },
}

fn page_diff(a: &Image<'_>, b: &Image<'_>) -> Vec<PageChange> {
    let (x, y) = (pages_of(a), pages_of(b));
    let mut out = Vec::new();
    let pfns: BTreeSet<u64> = x.keys().chain(y.keys()).copied().collect();
    for pfn in pfns {
        match (x.get(&pfn), y.get(&pfn)) {
            (Some(p), None) => out.push(PageChange::Removed(pfn, p.clone())),
            (None, Some(q)) => out.push(PageChange::Added(pfn, q.clone())),
            (Some(p), Some(q)) if p != q => {
                let fields: Vec<FieldChange> = [
                    ("cache", p.cache.clone(), q.cache.clone()),
                    ("order", p.order.to_string(), q.order.to_string()),
                    (
                        "object_size",
                        p.object_size.to_string(),
                        q.object_size.to_string(),
                    ),
                    (
                        "object_count",
                        p.object_count.to_string(),
                        q.object_count.to_string(),
                    ),
                    (
                        "first_offset",
                        p.first_offset.to_string(),
                        q.first_offset.to_string(),
                    ),
                ]
                .into_iter()
                .filter(|(_, a, b)| a != b)
                .collect();
                let n = p.object_count.max(q.object_count);
                let allocated = (0..n)
                    .filter(|&i| !p.is_allocated(i) && q.is_allocated(i))
                    .collect();
                let freed = (0..n)
                    .filter(|&i| p.is_allocated(i) && !q.is_allocated(i))
                    .collect();
                out.push(PageChange::Changed {
                    pfn,
                    cache: q.cache.clone(),
                    fields,
                    allocated,
                    freed,
                });
            }
            _ => {}
        }
    }
    out
}

/// Cache records by name: added, removed, or a field (definition or usage)
/// that differs.
fn cache_diff(a: &Image<'_>, b: &Image<'_>) -> Vec<(String, &'static str, String, String)> {
    let by_name = |i: &Image<'_>| -> BTreeMap<String, CacheUse> {
        j::cache_use(i)
            .into_iter()
            .map(|c| (c.name.clone(), c))
            .collect()
    };
    let (ca, cb) = (by_name(a), by_name(b));
    let mut out = Vec::new();
    for (name, x) in &ca {
        match cb.get(name) {
            None => out.push((name.clone(), "removed", String::new(), String::new())),
            Some(y) => {
                let fields: [(&'static str, u64, u64); 8] = [
                    ("id", x.id.into(), y.id.into()),
                    ("object_size", x.object_size.into(), y.object_size.into()),
                    ("align", x.align.into(), y.align.into()),
                    (
                        "objects_per_slab",
                        x.objects_per_slab.into(),
                        y.objects_per_slab.into(),
                    ),
                    ("order", x.order.into(), y.order.into()),
                    ("pages", x.pages, y.pages),
                    ("live", x.live, y.live),
                    ("free", x.free, y.free),
                ];
                for (f, va, vb) in fields {
                    if va != vb {
                        out.push((name.clone(), f, va.to_string(), vb.to_string()));
                    }
                }
            }
        }
    }
    for name in cb.keys() {
        if !ca.contains_key(name) {
            out.push((name.clone(), "added", String::new(), String::new()));
        }
    }
    out
}

/// Everything that differs between two images.
#[derive(Debug)]
struct Diff {
    header: Vec<FieldChange>,
    sections: Vec<(String, Option<String>, Option<String>)>,
    orders: Vec<(Order, OrderDiff)>,
    scratch: (Vec<PhysRange>, Vec<PhysRange>),
    kfence: (Vec<PhysRange>, Vec<PhysRange>),
    caches: Vec<(String, &'static str, String, String)>,
    pages: Vec<PageChange>,
    ext_added: Vec<Extent>,
    ext_removed: Vec<Extent>,
    tree: Vec<TreeChange>,
    arena_differs: bool,
}

impl Diff {
    fn new(a: &Image<'_>, b: &Image<'_>) -> Diff {
        let mut orders = Vec::new();
        for o in Order::all() {
            let d = merge_diff(&folios_of(a, o), &folios_of(b, o));
            if !d.added.is_empty() || !d.removed.is_empty() {
                orders.push((o, d));
            }
        }
        let ea: BTreeSet<Extent> = a.extents().collect();
        let eb: BTreeSet<Extent> = b.extents().collect();
        Diff {
            header: header_diff(a, b),
            sections: section_diff(a, b),
            orders,
            scratch: (a.scratch().collect(), b.scratch().collect()),
            kfence: (a.kfence().collect(), b.kfence().collect()),
            caches: cache_diff(a, b),
            pages: page_diff(a, b),
            ext_added: eb.difference(&ea).copied().collect(),
            ext_removed: ea.difference(&eb).copied().collect(),
            tree: tree_diff(a.tree(), b.tree()),
            arena_differs: a.arena_size() != b.arena_size(),
        }
    }

    fn same(&self) -> bool {
        self.header.is_empty()
            && self.sections.is_empty()
            && self.orders.is_empty()
            && self.scratch.0 == self.scratch.1
            && self.kfence.0 == self.kfence.1
            && self.caches.is_empty()
            && self.pages.is_empty()
            && self.ext_added.is_empty()
            && self.ext_removed.is_empty()
            && self.tree.is_empty()
            && !self.arena_differs
    }
}

/// Run `kho diff`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let ia = Input::open(&args.a)?;
    let ib = Input::open(&args.b)?;
    let la = ia.load()?;
    let lb = ib.load()?;
    let (a, b) = (&la.image, &lb.image);
    let d = Diff::new(a, b);
    let same = d.same();
    if args.json {
        crate::print_json(&to_json(a, b, &d))?;
    } else {
        crate::print(&human(a, b, &d, Style::stdout()))?;
    }
    Ok(if same {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn field_json(f: &[FieldChange]) -> Json {
    f.iter()
        .map(|(n, x, y)| json!({ "field": n, "a": x, "b": y }))
        .collect()
}

fn page_json(pfn: u64, p: &Page) -> Json {
    json!({
        "pfn": pfn, "cache": p.cache, "order": p.order,
        "object_size": p.object_size, "object_count": p.object_count,
        "first_offset": p.first_offset, "live": p.live(),
    })
}

fn to_json(a: &Image<'_>, b: &Image<'_>, d: &Diff) -> Json {
    let side = |l: &Image<'_>| {
        let h = l.header();
        json!({
            "arena_size": l.arena_size(),
            "version": format!("{}.{}", h.version_major, h.version_minor),
            "generation": h.generation,
            "preserved_bytes": l.preserved_bytes(),
            "folios": l.folio_count(),
        })
    };
    let list = |f: &[Folio]| -> Json {
        json!({
            "folios": f.len(),
            "bytes": bytes_of(f),
            "ranges": coalesce(f).into_iter().map(|r| j::range(pfn_range(r))).collect::<Vec<_>>(),
        })
    };
    let orders_json: Vec<_> = d
        .orders
        .iter()
        .map(|(o, d)| json!({ "order": o.get(), "added": list(&d.added), "removed": list(&d.removed) }))
        .collect();
    let ranges_pair = |(x, y): &(Vec<PhysRange>, Vec<PhysRange>)| -> Json {
        if x == y {
            Json::Null
        } else {
            json!({ "a": x.iter().map(|r| j::range(*r)).collect::<Vec<_>>(),
                    "b": y.iter().map(|r| j::range(*r)).collect::<Vec<_>>() })
        }
    };
    let ext = |e: &[Extent]| -> Vec<Json> {
        e.iter()
            .map(|e| json!({ "start": e.range.start, "len": e.range.len, "tag": e.tag }))
            .collect()
    };
    let tree_json: Vec<_> = d
        .tree
        .iter()
        .map(|c| match c {
            TreeChange::NodeAdded(p) => json!({ "change": "node-added", "path": p }),
            TreeChange::NodeRemoved(p) => json!({ "change": "node-removed", "path": p }),
            TreeChange::Compatible(p, x, y) => {
                json!({ "change": "compatible", "path": p, "a": x, "b": y })
            }
            TreeChange::PropAdded(p, n, v) => {
                json!({ "change": "prop-added", "path": p, "name": n, "b": v })
            }
            TreeChange::PropRemoved(p, n, v) => {
                json!({ "change": "prop-removed", "path": p, "name": n, "a": v })
            }
            TreeChange::PropChanged(p, n, x, y) => {
                json!({ "change": "prop-changed", "path": p, "name": n, "a": x, "b": y })
            }
        })
        .collect();
    let slab_json: Vec<_> = d
        .caches
        .iter()
        .map(|(n, f, x, y)| match *f {
            "added" | "removed" => json!({ "cache": n, "change": f }),
            _ => json!({ "cache": n, "change": "field", "field": f, "a": x.parse::<u64>().ok(), "b": y.parse::<u64>().ok() }),
        })
        .collect();
    let pages_json: Vec<_> = d
        .pages
        .iter()
        .map(|c| match c {
            PageChange::Added(pfn, p) => {
                let mut v = page_json(*pfn, p);
                v["change"] = "added".into();
                v
            }
            PageChange::Removed(pfn, p) => {
                let mut v = page_json(*pfn, p);
                v["change"] = "removed".into();
                v
            }
            PageChange::Changed {
                pfn,
                cache,
                fields,
                allocated,
                freed,
            } => json!({
                "pfn": pfn, "change": "changed", "cache": cache,
                "fields": field_json(fields), "allocated": allocated, "freed": freed,
            }),
        })
        .collect();
    let sections_json: Vec<_> = d
        .sections
        .iter()
        .map(|(k, x, y)| json!({ "kind": k, "a": x, "b": y }))
        .collect();
    json!({
        "same": d.same(),
        "a": side(a),
        "b": side(b),
        "header": field_json(&d.header),
        "sections": sections_json,
        "preserved": orders_json,
        "scratch": ranges_pair(&d.scratch),
        "kfence": ranges_pair(&d.kfence),
        "slab": slab_json,
        "slab_pages": pages_json,
        "extents": { "added": ext(&d.ext_added), "removed": ext(&d.ext_removed) },
        "tree": tree_json,
    })
}

/// At most [`SHOW_OBJECTS`] object indices, `"2, 5, ..."`.
fn objects(list: &[u32]) -> String {
    let mut s = list
        .iter()
        .take(SHOW_OBJECTS)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if list.len() > SHOW_OBJECTS {
        s.push_str(", ...");
    }
    s
}

fn human(a: &Image<'_>, b: &Image<'_>, d: &Diff, st: Style) -> String {
    let mut out = String::new();
    for (name, i) in [("a", a), ("b", b)] {
        let h = i.header();
        let _ = writeln!(
            out,
            "{name}: {} preserved in {} folios, v{}.{}, generation {}, arena {}",
            size(i.preserved_bytes()),
            i.folio_count(),
            h.version_major,
            h.version_minor,
            h.generation,
            hex(i.arena_size())
        );
    }
    for (f, x, y) in &d.header {
        let _ = writeln!(out, "header {f}: {x} -> {y}");
    }
    if !d.sections.is_empty() {
        let _ = writeln!(out, "{}", st.bold("sections"));
        for (k, x, y) in &d.sections {
            let _ = match (x, y) {
                (None, Some(y)) => writeln!(out, "  + {k} ({y})"),
                (Some(x), None) => writeln!(out, "  - {k} ({x})"),
                (x, y) => writeln!(
                    out,
                    "  ~ {k}: {} -> {}",
                    x.as_deref().unwrap_or("absent"),
                    y.as_deref().unwrap_or("absent")
                ),
            };
        }
    }
    if !d.orders.is_empty() {
        let _ = writeln!(out, "{}", st.bold("preserved memory"));
        let mut t = Table::new(&[
            ("ORDER", Align::Right),
            ("ADDED", Align::Right),
            ("ADDED SIZE", Align::Right),
            ("REMOVED", Align::Right),
            ("REMOVED SIZE", Align::Right),
        ]);
        for (o, d) in &d.orders {
            t.row(vec![
                o.get().to_string(),
                d.added.len().to_string(),
                size(bytes_of(&d.added)),
                d.removed.len().to_string(),
                size(bytes_of(&d.removed)),
            ]);
        }
        out.push_str(&t.render(2, st));
        for (o, d) in &d.orders {
            for (sign, f) in [("+", &d.added), ("-", &d.removed)] {
                let rs = coalesce(f);
                for r in rs.iter().take(SHOW_RANGES) {
                    let _ = writeln!(
                        out,
                        "  {sign} order {} {} {}",
                        o.get(),
                        pfn_range(*r),
                        size(r.bytes())
                    );
                }
                if rs.len() > SHOW_RANGES {
                    let _ = writeln!(
                        out,
                        "  {sign} order {} ... {} more ranges",
                        o.get(),
                        rs.len() - SHOW_RANGES
                    );
                }
            }
        }
    }
    let show = |x: &[PhysRange]| {
        if x.is_empty() {
            return "none".to_owned();
        }
        x.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if d.arena_differs {
        let _ = writeln!(
            out,
            "arena size: {} -> {}",
            hex(a.arena_size()),
            hex(b.arena_size())
        );
    }
    if d.scratch.0 != d.scratch.1 {
        let _ = writeln!(
            out,
            "scratch: {} -> {}",
            show(&d.scratch.0),
            show(&d.scratch.1)
        );
    }
    if d.kfence.0 != d.kfence.1 {
        let _ = writeln!(
            out,
            "kfence pool: {} -> {}",
            show(&d.kfence.0),
            show(&d.kfence.1)
        );
    }
    if !d.caches.is_empty() {
        let _ = writeln!(out, "{}", st.bold("slab caches"));
        for (n, f, x, y) in &d.caches {
            let _ = match *f {
                "added" => writeln!(out, "  + {n}"),
                "removed" => writeln!(out, "  - {n}"),
                _ => writeln!(out, "  ~ {n}: {f} {x} -> {y}"),
            };
        }
    }
    if !d.pages.is_empty() {
        let _ = writeln!(out, "{}", st.bold("slab pages"));
        for c in d.pages.iter().take(SHOW_PAGES) {
            let _ = match c {
                PageChange::Added(pfn, p) | PageChange::Removed(pfn, p) => writeln!(
                    out,
                    "  {} pfn {} {}: order {}, {} x {} B from +{}, {} live",
                    if matches!(c, PageChange::Added(..)) {
                        "+"
                    } else {
                        "-"
                    },
                    hex(*pfn),
                    p.cache,
                    p.order,
                    p.object_count,
                    p.object_size,
                    p.first_offset,
                    p.live()
                ),
                PageChange::Changed {
                    pfn,
                    cache,
                    fields,
                    allocated,
                    freed,
                } => {
                    let mut parts: Vec<String> = fields
                        .iter()
                        .map(|(f, x, y)| format!("{f} {x} -> {y}"))
                        .collect();
                    if !allocated.is_empty() {
                        parts.push(format!(
                            "{} allocated (objects {})",
                            allocated.len(),
                            objects(allocated)
                        ));
                    }
                    if !freed.is_empty() {
                        parts.push(format!(
                            "{} freed (objects {})",
                            freed.len(),
                            objects(freed)
                        ));
                    }
                    writeln!(out, "  ~ pfn {} {cache}: {}", hex(*pfn), parts.join("; "))
                }
            };
        }
        if d.pages.len() > SHOW_PAGES {
            let _ = writeln!(out, "  ... {} more slab pages", d.pages.len() - SHOW_PAGES);
        }
    }
    if !d.ext_added.is_empty() || !d.ext_removed.is_empty() {
        let _ = writeln!(out, "{}", st.bold("extents"));
        for (sign, list) in [("+", &d.ext_added), ("-", &d.ext_removed)] {
            for e in list.iter() {
                let _ = writeln!(out, "  {sign} {} tag {}", e.range, e.tag);
            }
        }
    }
    if !d.tree.is_empty() {
        let _ = writeln!(out, "{}", st.bold("metadata tree"));
        for c in &d.tree {
            let _ = match c {
                TreeChange::NodeAdded(p) => writeln!(out, "  + {p}"),
                TreeChange::NodeRemoved(p) => writeln!(out, "  - {p}"),
                TreeChange::Compatible(p, x, y) => {
                    writeln!(out, "  ~ {p}: compatible {x:?} -> {y:?}")
                }
                TreeChange::PropAdded(p, n, v) => writeln!(out, "  + {p} {n} = {v}"),
                TreeChange::PropRemoved(p, n, v) => writeln!(out, "  - {p} {n} = {v}"),
                TreeChange::PropChanged(p, n, x, y) => writeln!(out, "  ~ {p} {n}: {x} -> {y}"),
            };
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if d.same() {
            st.green("same")
        } else {
            st.yellow("different")
        }
    );
    out
}
