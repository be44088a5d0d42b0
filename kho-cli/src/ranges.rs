//! `kho ranges`: preserved memory as coalesced ranges or folios.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use kho_core::{Folio, Order, Ranges, PAGE_SHIFT};
use serde_json::json;

use crate::fmt::{hex, size, Align, Style, Table};
use crate::input::Input;

/// List preserved memory in address order.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  kho ranges kv.arena                    coalesced runs of preserved pages
  kho ranges kv.arena --folios           every preserved folio with its order
  kho ranges kv.img --order 9 --json     order-9 folios only, coalesced, as JSON")]
pub struct Args {
    /// An arena file or a bare image.
    pub path: PathBuf,
    /// Only folios of this order (0..=18).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=i64::from(kho_core::MAX_MAP_ORDER)))]
    pub order: Option<u8>,
    /// List folios instead of coalesced ranges.
    #[arg(long)]
    pub folios: bool,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Run `kho ranges`.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    let input = Input::open(&args.path)?;
    let loaded = input.load()?;
    let image = &loaded.image;
    let order = args.order.and_then(Order::new);
    let folios = || {
        image
            .folios()
            .filter(move |f| order.is_none_or(|o| f.order == o))
    };
    let st = Style::stdout();
    if args.folios {
        if args.json {
            let list: Vec<_> = folios()
                .map(|f: Folio| {
                    json!({ "pfn": f.pfn.0, "start": f.addr().0, "len": f.bytes(), "order": f.order.get() })
                })
                .collect();
            crate::print_json(&json!({ "order": args.order, "folios": list }))?;
            return Ok(ExitCode::SUCCESS);
        }
        let mut t = Table::new(&[
            ("PFN", Align::Right),
            ("START", Align::Right),
            ("END", Align::Right),
            ("ORDER", Align::Right),
            ("SIZE", Align::Right),
        ]);
        let (mut n, mut bytes) = (0u64, 0u64);
        for f in folios() {
            n += 1;
            bytes += f.bytes();
            t.row(vec![
                hex(f.pfn.0),
                hex(f.addr().0),
                hex(f.addr().0 + f.bytes()),
                f.order.get().to_string(),
                size(f.bytes()),
            ]);
        }
        let mut out = t.render(0, st);
        let _ = writeln!(out, "{n} folios, {}", size(bytes));
        crate::print(&out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let ranges = Ranges::new(folios());
    if args.json {
        let list: Vec<_> = ranges
            .map(|r| json!({ "start": r.start.0 << PAGE_SHIFT, "len": r.bytes(), "pages": r.pages() }))
            .collect();
        crate::print_json(&json!({ "order": args.order, "ranges": list }))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        ("START", Align::Right),
        ("END", Align::Right),
        ("PAGES", Align::Right),
        ("SIZE", Align::Right),
    ]);
    let (mut n, mut bytes) = (0u64, 0u64);
    for r in ranges {
        n += 1;
        bytes += r.bytes();
        t.row(vec![
            hex(r.start.0 << PAGE_SHIFT),
            hex(r.end.0 << PAGE_SHIFT),
            r.pages().to_string(),
            size(r.bytes()),
        ]);
    }
    let mut out = t.render(0, st);
    let _ = writeln!(out, "{n} ranges, {}", size(bytes));
    crate::print(&out)?;
    Ok(ExitCode::SUCCESS)
}
