//! `kho inspect`: everything an image (and its arena) says.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use kho_alloc::check::{self, InputKind};
use kho_alloc::superblock::{ImageLocation, Superblock, FLAG_RESTORED};
use kho_alloc::SlotError;
use kho_core::image::layout::{ENTRY_SIZE, MAGIC, SECTION_REQUIRED};
use kho_core::PAGE_SIZE;
use serde_json::json;

use crate::fmt::{hex, size, Align, Style, Table};
use crate::input::Input;
use crate::json;
use crate::raw::{self, Crc};

/// Show header, sections, preserved memory, scratch, KFENCE pool, slab
/// caches, extents and the metadata tree.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Each section's CRC is computed and shown as ok or BAD. An input that does
not validate gets what can be read of it (superblock slots, the image
header and section table with CRC status), then its error: exit code 2.

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

/// Run `kho inspect`. An input that does not validate still gets what can
/// be read of it (superblock slots, the image header and section table with
/// CRC status) on stdout, then its error (exit 2).
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let input = Input::open(&args.path)?;
    let loaded = match input.load() {
        Ok(l) => l,
        Err(e) => {
            let partial = Partial::read(&input);
            if args.json {
                crate::print_json(&partial.json(&input, &e))?;
            } else {
                crate::print(&partial.text(Style::stdout()))?;
            }
            return Err(e);
        }
    };
    let image = &loaded.image;
    let raw = raw::read(image.bytes());
    if args.json {
        let arena = loaded
            .arena
            .as_ref()
            .map(|(slots, loc)| json::arena(slots, loc, image_crc(&input, loc)));
        crate::print_json(&json!({
            "kind": input.kind().name(),
            "valid": true,
            "error": null,
            "arena": arena,
            "image": json::image(image, raw.as_ref()),
            "raw": null,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let st = Style::stdout();
    let mut out = String::new();
    if let Some((slots, loc)) = &loaded.arena {
        let crc = image_crc(&input, loc);
        arena_text(
            &mut out,
            st,
            &slots.slots,
            Some(slots.current),
            Some((loc, crc)),
        );
    }
    if let Some(v) = &raw {
        header_text(&mut out, st, v);
    }
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
                "{}  {} nodes, depth {}, {}",
                st.bold("metadata tree"),
                tree.node_count(),
                tree.depth(),
                size(image.tree_bytes().len() as u64)
            );
            for line in tree.to_string().lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
    }
    crate::print(&out)?;
    Ok(ExitCode::SUCCESS)
}

/// The image bytes of an arena against the CRC its slot records.
fn image_crc(input: &Input, loc: &ImageLocation) -> Crc {
    let bytes = usize::try_from(loc.offset)
        .ok()
        .zip(usize::try_from(loc.offset.saturating_add(loc.len)).ok())
        .and_then(|(s, e)| input.bytes().get(s..e));
    match bytes.map(check::crc32) {
        Some(c) if c == loc.crc => Crc::Ok,
        Some(c) => Crc::Bad(c),
        None => Crc::OutOfBounds,
    }
}

/// The superblock slots, the regions (when a slot was selected) and where
/// the image lies.
fn arena_text(
    out: &mut String,
    st: Style,
    slots: &[Result<Superblock, SlotError>; 2],
    current: Option<usize>,
    image: Option<(&ImageLocation, Crc)>,
) {
    let selected = current.and_then(|i| slots[i].as_ref().ok());
    match selected {
        Some(sb) => {
            let _ = writeln!(
                out,
                "{}  {} ({}), max order {}",
                st.bold("arena"),
                hex(sb.layout.size()),
                size(sb.layout.size()),
                sb.layout.max_order.get()
            );
        }
        None if slots.iter().all(Result::is_ok) => {
            let _ = writeln!(
                out,
                "{}  no usable superblock slot: both are valid but describe different geometry",
                st.bold("arena")
            );
        }
        None => {
            let _ = writeln!(out, "{}  no usable superblock slot", st.bold("arena"));
        }
    }
    let mut t = Table::new(&[
        ("SLOT", Align::Right),
        ("STATE", Align::Left),
        ("GENERATION", Align::Right),
        ("NOTE", Align::Left),
    ]);
    for (i, s) in slots.iter().enumerate() {
        match s {
            Ok(s) => t.row(vec![
                i.to_string(),
                if Some(i) == current {
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
            Err(e) => t.row(vec![
                i.to_string(),
                st.red("BAD"),
                "-".into(),
                e.to_string(),
            ]),
        }
    }
    out.push_str(&t.render(2, st));
    let Some(sb) = selected else { return };
    let mut t = Table::new(&[
        ("REGION", Align::Left),
        ("START", Align::Right),
        ("END", Align::Right),
        ("SIZE", Align::Right),
    ]);
    for (r, _) in sb.layout.regions() {
        let b = sb.layout.bytes_of(r);
        t.row(vec![
            r.name().into(),
            hex(b.start),
            hex(b.start + b.len),
            size(b.len),
        ]);
    }
    out.push_str(&t.render(2, st));
    match image {
        Some((loc, crc)) => {
            let status = match crc {
                Crc::Ok => st.green("ok"),
                Crc::Bad(c) => st.red(&format!("BAD: the image bytes have {c:#010x}")),
                Crc::OutOfBounds => st.red("out of bounds"),
            };
            let _ = writeln!(
                out,
                "{}  at {} len {} ({}), crc32 {:#010x} {status}",
                st.bold("image"),
                hex(loc.offset),
                hex(loc.len),
                size(loc.len),
                loc.crc
            );
        }
        None => {
            let _ = writeln!(
                out,
                "{}  none recorded (slot {})",
                st.bold("image"),
                current.unwrap_or(0)
            );
        }
    }
}

fn crc_text(st: Style, crc: Crc) -> String {
    if crc.is_ok() {
        crc.text()
    } else {
        st.red(&crc.text())
    }
}

/// The header fields and the section table, as stored, with CRC status.
fn header_text(out: &mut String, st: Style, v: &raw::View) {
    let h = &v.header;
    let pad = " ".repeat("header".len());
    if !v.magic_ok {
        let _ = writeln!(
            out,
            "{}  magic {:02x?}: {}",
            st.bold("header"),
            h.magic,
            st.red(&format!("BAD (expected {MAGIC:02x?})"))
        );
    }
    let _ = writeln!(
        out,
        "{}  v{}.{}, header {}, page shift {}, flags {:#x}, generation {}",
        if v.magic_ok {
            st.bold("header")
        } else {
            pad.clone()
        },
        h.version_major.get(),
        h.version_minor.get(),
        size(u64::from(h.header_size.get())),
        h.page_shift.get(),
        h.flags.get(),
        h.generation.get()
    );
    let _ = writeln!(
        out,
        "{pad}  arena {} ({}), image {} ({}), {} sections of {} at {}",
        hex(h.arena_size.get()),
        size(h.arena_size.get()),
        hex(h.image_len.get()),
        size(h.image_len.get()),
        h.section_count.get(),
        size(u64::from(h.entry_size.get())),
        hex(h.table_offset.get())
    );
    let _ = writeln!(
        out,
        "{pad}  header crc32 {:#010x} {}, section table crc32 {:#010x} {}",
        h.header_crc32.get(),
        crc_text(st, v.header_crc),
        h.table_crc32.get(),
        crc_text(st, v.table_crc)
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
    for s in &v.sections {
        t.row(vec![
            s.kind.to_string(),
            match s.flags {
                0 => "optional".into(),
                SECTION_REQUIRED => "required".into(),
                f => format!("{f:#x}"),
            },
            hex(s.offset),
            size(s.len),
            format!("{:#010x}", s.crc32),
            crc_text(st, s.crc),
        ]);
    }
    out.push_str(&t.render(2, st));
    if v.missing > 0 {
        let _ = writeln!(
            out,
            "  {} more table entries cannot be read (outside the image, or entries under {} bytes)",
            v.missing, ENTRY_SIZE
        );
    }
}

/// What can be shown of an input that does not validate.
#[derive(Debug)]
struct Partial {
    /// Both slots, decoded on their own (arenas of at least two pages).
    slots: Option<[Result<Superblock, SlotError>; 2]>,
    /// The slot `Arena::open` would use.
    current: Option<usize>,
    /// The image its slot records, with the CRC status of its bytes.
    image: Option<(ImageLocation, Crc)>,
    /// The image's header and table.
    raw: Option<raw::View>,
}

impl Partial {
    fn read(input: &Input) -> Partial {
        let bytes = input.bytes();
        let mut p = Partial {
            slots: None,
            current: None,
            image: None,
            raw: None,
        };
        if input.kind() == InputKind::Image {
            p.raw = raw::read(bytes);
            return p;
        }
        let len = bytes.len() as u64;
        let page = |i: u64| {
            usize::try_from(i * PAGE_SIZE)
                .ok()
                .and_then(|s| bytes.get(s..s + PAGE_SIZE as usize))
        };
        let (Some(p0), Some(p1)) = (page(0), page(1)) else {
            return p;
        };
        p.slots = Some([
            Superblock::decode(p0, 0, len),
            Superblock::decode(p1, PAGE_SIZE, len),
        ]);
        let Ok(slots) = check::read_slots(bytes) else {
            return p;
        };
        p.current = Some(slots.current);
        if let Some(loc) = slots.superblock.image {
            p.image = Some((loc, image_crc(input, &loc)));
            p.raw = usize::try_from(loc.offset)
                .ok()
                .and_then(|s| bytes.get(s..))
                .and_then(raw::read);
        }
        p
    }

    fn text(&self, st: Style) -> String {
        let mut out = String::new();
        if let Some(slots) = &self.slots {
            let image = self.image.as_ref().map(|(l, c)| (l, *c));
            arena_text(&mut out, st, slots, self.current, image);
        }
        if let Some(v) = &self.raw {
            header_text(&mut out, st, v);
        }
        if !out.is_empty() {
            let _ = writeln!(
                out,
                "{}: preserved memory, scratch, KFENCE pool, slab caches, extents and tree not shown",
                st.red("invalid")
            );
        }
        out
    }

    fn json(&self, input: &Input, err: &anyhow::Error) -> serde_json::Value {
        let arena = self.slots.as_ref().map(|slots| {
            json::arena_partial(
                input.bytes().len() as u64,
                slots,
                self.current,
                self.image.as_ref().map(|(l, c)| (l, *c)),
            )
        });
        let raw = self.raw.as_ref().map(|v| {
            json!({
                "header": v.header_json(),
                "sections": v.sections_json(),
                "missing_entries": v.missing,
            })
        });
        json!({
            "kind": input.kind().name(),
            "valid": false,
            "error": crate::one_line(err),
            "arena": arena,
            "image": null,
            "raw": raw,
        })
    }
}
