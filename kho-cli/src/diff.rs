//! `kho diff`: what changed between two handovers.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use kho_core::{Folio, Image, Node, Order, PfnRange, PhysRange, Ranges, Value, PAGE_SHIFT};
use serde_json::{json, Value as Json};

use crate::fmt::{hex, size, Align, Style, Table};
use crate::input::Input;
use crate::json::{self as j, CacheUse};

/// Ranges listed per order and direction in human output.
const SHOW_RANGES: usize = 16;

/// Compare two arenas or images: preserved memory added and removed per
/// order, scratch and KFENCE ranges, slab caches, extents and the
/// metadata tree. The generation is shown but not compared.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
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

/// Run `kho diff`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let ia = Input::open(&args.a)?;
    let ib = Input::open(&args.b)?;
    let la = ia.load()?;
    let lb = ib.load()?;
    let (a, b) = (&la.image, &lb.image);

    let mut orders = Vec::new();
    for o in Order::all() {
        let d = merge_diff(&folios_of(a, o), &folios_of(b, o));
        if !d.added.is_empty() || !d.removed.is_empty() {
            orders.push((o, d));
        }
    }
    let (sa, sb): (Vec<_>, Vec<_>) = (a.scratch().collect(), b.scratch().collect());
    let (ka, kb): (Vec<_>, Vec<_>) = (a.kfence().collect(), b.kfence().collect());
    let ca: BTreeMap<String, CacheUse> = j::cache_use(a)
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    let cb: BTreeMap<String, CacheUse> = j::cache_use(b)
        .into_iter()
        .map(|c| (c.name.clone(), c))
        .collect();
    let mut cache_changes: Vec<(String, &'static str, String, String)> = Vec::new();
    for (name, x) in &ca {
        match cb.get(name) {
            None => cache_changes.push((name.clone(), "removed", String::new(), String::new())),
            Some(y) => {
                let fields: [(&'static str, u64, u64); 7] = [
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
                        cache_changes.push((name.clone(), f, va.to_string(), vb.to_string()));
                    }
                }
            }
        }
    }
    for name in cb.keys() {
        if !ca.contains_key(name) {
            cache_changes.push((name.clone(), "added", String::new(), String::new()));
        }
    }
    let ea: Vec<_> = a.extents().collect();
    let eb: Vec<_> = b.extents().collect();
    let ext_added: Vec<_> = eb.iter().filter(|e| !ea.contains(e)).copied().collect();
    let ext_removed: Vec<_> = ea.iter().filter(|e| !eb.contains(e)).copied().collect();
    let tree = tree_diff(a.tree(), b.tree());
    let arena_differs = a.arena_size() != b.arena_size();
    let same = orders.is_empty()
        && sa == sb
        && ka == kb
        && cache_changes.is_empty()
        && ext_added.is_empty()
        && ext_removed.is_empty()
        && tree.is_empty()
        && !arena_differs;

    if args.json {
        let side = |l: &Image<'_>| {
            json!({
                "arena_size": l.arena_size(),
                "generation": l.header().generation,
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
        let orders_json: Vec<_> = orders
            .iter()
            .map(|(o, d)| json!({ "order": o.get(), "added": list(&d.added), "removed": list(&d.removed) }))
            .collect();
        let ranges_pair = |x: &[PhysRange], y: &[PhysRange]| -> Json {
            if x == y {
                Json::Null
            } else {
                json!({ "a": x.iter().map(|r| j::range(*r)).collect::<Vec<_>>(),
                        "b": y.iter().map(|r| j::range(*r)).collect::<Vec<_>>() })
            }
        };
        let ext = |e: &[kho_core::Extent]| -> Vec<Json> {
            e.iter()
                .map(|e| json!({ "start": e.range.start, "len": e.range.len, "tag": e.tag }))
                .collect()
        };
        let tree_json: Vec<_> = tree
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
        let slab_json: Vec<_> = cache_changes
            .iter()
            .map(|(n, f, x, y)| match *f {
                "added" | "removed" => json!({ "cache": n, "change": f }),
                _ => json!({ "cache": n, "change": "field", "field": f, "a": x.parse::<u64>().ok(), "b": y.parse::<u64>().ok() }),
            })
            .collect();
        crate::print_json(&json!({
            "same": same,
            "a": side(a),
            "b": side(b),
            "preserved": orders_json,
            "scratch": ranges_pair(&sa, &sb),
            "kfence": ranges_pair(&ka, &kb),
            "slab": slab_json,
            "extents": { "added": ext(&ext_added), "removed": ext(&ext_removed) },
            "tree": tree_json,
        }))?;
    } else {
        let st = Style::stdout();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "a: {} preserved in {} folios, generation {}, arena {}",
            size(a.preserved_bytes()),
            a.folio_count(),
            a.header().generation,
            hex(a.arena_size())
        );
        let _ = writeln!(
            out,
            "b: {} preserved in {} folios, generation {}, arena {}",
            size(b.preserved_bytes()),
            b.folio_count(),
            b.header().generation,
            hex(b.arena_size())
        );
        if !orders.is_empty() {
            let _ = writeln!(out, "{}", st.bold("preserved memory"));
            let mut t = Table::new(&[
                ("ORDER", Align::Right),
                ("ADDED", Align::Right),
                ("ADDED SIZE", Align::Right),
                ("REMOVED", Align::Right),
                ("REMOVED SIZE", Align::Right),
            ]);
            for (o, d) in &orders {
                t.row(vec![
                    o.get().to_string(),
                    d.added.len().to_string(),
                    size(bytes_of(&d.added)),
                    d.removed.len().to_string(),
                    size(bytes_of(&d.removed)),
                ]);
            }
            out.push_str(&t.render(2, st));
            for (o, d) in &orders {
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
            x.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if arena_differs {
            let _ = writeln!(
                out,
                "arena size: {} -> {}",
                hex(a.arena_size()),
                hex(b.arena_size())
            );
        }
        if sa != sb {
            let _ = writeln!(out, "scratch: {} -> {}", show(&sa), show(&sb));
        }
        if ka != kb {
            let _ = writeln!(out, "kfence pool: {} -> {}", show(&ka), show(&kb));
        }
        if !cache_changes.is_empty() {
            let _ = writeln!(out, "{}", st.bold("slab caches"));
            for (n, f, x, y) in &cache_changes {
                let _ = match *f {
                    "added" => writeln!(out, "  + {n}"),
                    "removed" => writeln!(out, "  - {n}"),
                    _ => writeln!(out, "  ~ {n}: {f} {x} -> {y}"),
                };
            }
        }
        if !ext_added.is_empty() || !ext_removed.is_empty() {
            let _ = writeln!(out, "{}", st.bold("extents"));
            for (sign, list) in [("+", &ext_added), ("-", &ext_removed)] {
                for e in list.iter() {
                    let _ = writeln!(out, "  {sign} {} tag {}", e.range, e.tag);
                }
            }
        }
        if !tree.is_empty() {
            let _ = writeln!(out, "{}", st.bold("metadata tree"));
            for c in &tree {
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
            if same {
                st.green("same")
            } else {
                st.yellow("different")
            }
        );
        crate::print(&out)?;
    }
    Ok(if same {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
