//! `kho inspect`: everything an image (and its arena) says.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use kho_alloc::superblock::FLAG_RESTORED;
use serde_json::json;

use crate::fmt::{hex, size, Align, Style, Table};
use crate::input::Input;
use crate::json;

/// Show header, sections, preserved memory, scratch, KFENCE pool, slab
/// caches, extents and the metadata tree.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kho inspect kv.arena           the current image of an arena, with its superblocks and regions
  kho inspect kv.img --json      a bare image as one JSON document (schema: docs/CLI.md)")]
pub struct Args {
    /// An arena file or a bare image.
    pub path: PathBuf,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Run `kho inspect`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let input = Input::open(&args.path)?;
    let loaded = input.load()?;
    let image = &loaded.image;
    if args.json {
        let arena = loaded
            .arena
            .as_ref()
            .map(|(slots, loc)| json::arena(slots, loc));
        crate::print_json(&json!({
            "kind": input.kind().name(),
            "arena": arena,
            "image": json::image(image),
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let st = Style::stdout();
    let mut out = String::new();
    if let Some((slots, loc)) = &loaded.arena {
        let sb = &slots.superblock;
        let _ = writeln!(
            out,
            "{}  {} ({}), max order {}",
            st.bold("arena"),
            hex(sb.layout.size()),
            size(sb.layout.size()),
            sb.layout.max_order.get()
        );
        let mut t = Table::new(&[
            ("SLOT", Align::Right),
            ("STATE", Align::Left),
            ("GENERATION", Align::Right),
            ("NOTE", Align::Left),
        ]);
        for (i, s) in slots.slots.iter().enumerate() {
            match s {
                Ok(s) => t.row(vec![
                    i.to_string(),
                    if i == slots.current {
                        "current"
                    } else {
                        "valid"
                    }
                    .into(),
                    s.generation.to_string(),
                    if s.flags & FLAG_RESTORED != 0 {
                        "image restored".into()
                    } else {
                        String::new()
                    },
                ]),
                Err(e) => t.row(vec![i.to_string(), "BAD".into(), "-".into(), e.to_string()]),
            }
        }
        out.push_str(&t.render(2, st));
        let mut t = Table::new(&[
            ("REGION", Align::Left),
            ("START", Align::Right),
            ("END", Align::Right),
            ("SIZE", Align::Right),
        ]);
        for (r, b) in json::region_rows(slots) {
            t.row(vec![
                r.name().into(),
                hex(b.start),
                hex(b.start + b.len),
                size(b.len),
            ]);
        }
        out.push_str(&t.render(2, st));
        let _ = writeln!(
            out,
            "{}  at {} len {} ({}), crc32 {:#010x}",
            st.bold("image"),
            hex(loc.offset),
            hex(loc.len),
            size(loc.len),
            loc.crc
        );
    }
    let h = image.header();
    let _ = writeln!(
        out,
        "{} v{}.{}, header {} bytes, page shift {}, arena {} ({}), image {} bytes, generation {}",
        st.bold("header"),
        h.version_major,
        h.version_minor,
        h.header_size,
        h.page_shift,
        hex(h.arena_size),
        size(h.arena_size),
        h.image_len,
        h.generation
    );
    let _ = writeln!(out, "{}", st.bold("sections"));
    let mut t = Table::new(&[
        ("KIND", Align::Left),
        ("FLAGS", Align::Left),
        ("OFFSET", Align::Right),
        ("LENGTH", Align::Right),
        ("CRC32", Align::Left),
        ("STATUS", Align::Left),
    ]);
    for s in image.sections() {
        t.row(vec![
            s.kind.to_string(),
            if s.is_required() {
                "required"
            } else {
                "optional"
            }
            .into(),
            hex(s.offset),
            s.len.to_string(),
            format!("{:#010x}", s.crc32),
            "ok".into(),
        ]);
    }
    out.push_str(&t.render(2, st));
    let _ = writeln!(out, "{}", st.bold("preserved memory"));
    let mut t = Table::new(&[
        ("ORDER", Align::Right),
        ("FOLIOS", Align::Right),
        ("BYTES", Align::Right),
        ("SIZE", Align::Right),
    ]);
    for (o, n, b) in json::per_order(image) {
        t.row(vec![
            o.get().to_string(),
            n.to_string(),
            b.to_string(),
            size(b),
        ]);
    }
    t.row(vec![
        "total".into(),
        image.folio_count().to_string(),
        image.preserved_bytes().to_string(),
        size(image.preserved_bytes()),
    ]);
    out.push_str(&t.render(2, st));
    for (name, ranges) in [
        ("scratch", image.scratch().collect::<Vec<_>>()),
        ("kfence pool", image.kfence().collect::<Vec<_>>()),
    ] {
        if ranges.is_empty() {
            let _ = writeln!(out, "{}  none", st.bold(name));
        }
        for r in ranges {
            let _ = writeln!(out, "{}  {r} {}", st.bold(name), size(r.len));
        }
    }
    let caches = json::cache_use(image);
    if caches.is_empty() {
        let _ = writeln!(out, "{}  none", st.bold("slab caches"));
    } else {
        let _ = writeln!(out, "{}", st.bold("slab caches"));
        let mut t = Table::new(&[
            ("ID", Align::Right),
            ("NAME", Align::Left),
            ("OBJSIZE", Align::Right),
            ("ORDER", Align::Right),
            ("PER SLAB", Align::Right),
            ("PAGES", Align::Right),
            ("LIVE", Align::Right),
            ("FREE", Align::Right),
        ]);
        for c in caches {
            t.row(vec![
                c.id.to_string(),
                c.name,
                c.object_size.to_string(),
                c.order.to_string(),
                c.objects_per_slab.to_string(),
                c.pages.to_string(),
                c.live.to_string(),
                c.free.to_string(),
            ]);
        }
        out.push_str(&t.render(2, st));
    }
    let extents: Vec<_> = image.extents().collect();
    if extents.is_empty() {
        let _ = writeln!(out, "{}  none", st.bold("extents"));
    } else {
        let _ = writeln!(out, "{}", st.bold("extents"));
        let mut t = Table::new(&[
            ("START", Align::Right),
            ("END", Align::Right),
            ("SIZE", Align::Right),
            ("TAG", Align::Right),
        ]);
        for e in extents {
            t.row(vec![
                hex(e.range.start),
                hex(e.range.start.saturating_add(e.range.len)),
                size(e.range.len),
                e.tag.to_string(),
            ]);
        }
        out.push_str(&t.render(2, st));
    }
    match image.tree() {
        None => {
            let _ = writeln!(out, "{}  none", st.bold("metadata tree"));
        }
        Some(tree) => {
            let _ = writeln!(
                out,
                "{}  {} nodes, depth {}, {} bytes",
                st.bold("metadata tree"),
                tree.node_count(),
                tree.depth(),
                image.tree_bytes().len()
            );
            for line in tree.to_string().lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    crate::print(&out)?;
    Ok(ExitCode::SUCCESS)
}
