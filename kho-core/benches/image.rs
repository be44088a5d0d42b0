//! Handover image throughput on three maps:
//!
//! - `dense0`: 48 GiB preserved as order-0 folios (12.6 M folios);
//! - `mixed`: 48 GiB interleaved as 1 GiB runs of orders 18, 9 and 0;
//! - `sparse`: 1,000,000 isolated order-0 folios scattered over 1 TiB.
//!
//! For each: building the map with the bulk APIs and one folio per call,
//! serializing, parsing with full validation (CRCs included) against a
//! `memcpy` and a bare CRC32 of the same bytes in the same run, walking
//! every folio (by internal iteration and by `next()`) and every range
//! against a bare read of the image's bytes, bulk restore and point
//! queries. The
//! image-size figures are printed on stderr.

use std::hint::black_box;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use kho_core::{Image, ImageBuilder, Order, ParseError, Pfn, PreservedMap, Restorer, SectionKind};

const GIB_PAGES: u64 = 1 << 18;

/// A map and how to build it: with the bulk APIs, or one `preserve` call
/// per folio.
struct Scenario {
    name: &'static str,
    bulk: fn() -> (u64, PreservedMap),
    per_folio: fn() -> (u64, PreservedMap),
}

fn dense0() -> (u64, PreservedMap) {
    let arena = 64 << 30;
    let mut map = PreservedMap::new(Pfn(arena >> 12));
    map.preserve_folios(Pfn(0), Order::ZERO, 48 * GIB_PAGES)
        .unwrap();
    (arena, map)
}

fn dense0_per_folio() -> (u64, PreservedMap) {
    let arena = 64 << 30;
    let mut map = PreservedMap::new(Pfn(arena >> 12));
    for p in 0..48 * GIB_PAGES {
        map.preserve(Pfn(p), Order::ZERO).unwrap();
    }
    (arena, map)
}

/// The runs of the mixed map: `(first pfn, order, folios)`, 1 GiB each.
fn mixed_runs() -> impl Iterator<Item = (Pfn, Order, u64)> {
    (0..16u64).flat_map(|chunk| {
        let base = chunk * 3 * GIB_PAGES;
        [18u8, 9, 0].into_iter().enumerate().map(move |(k, o)| {
            let order = Order::new(o).unwrap();
            (
                Pfn(base + k as u64 * GIB_PAGES),
                order,
                GIB_PAGES >> order.get(),
            )
        })
    })
}

fn mixed() -> (u64, PreservedMap) {
    let arena = 64 << 30;
    let mut map = PreservedMap::new(Pfn(arena >> 12));
    for (start, order, count) in mixed_runs() {
        map.preserve_folios(start, order, count).unwrap();
    }
    (arena, map)
}

fn mixed_per_folio() -> (u64, PreservedMap) {
    let arena = 64 << 30;
    let mut map = PreservedMap::new(Pfn(arena >> 12));
    for (start, order, count) in mixed_runs() {
        for i in 0..count {
            map.preserve(Pfn(start.0 + (i << order.get())), order)
                .unwrap();
        }
    }
    (arena, map)
}

/// PFNs of the sparse map: one per 268-page slot, jittered by a fixed LCG
/// inside the slot so no two are adjacent.
fn sparse_pfns() -> impl Iterator<Item = Pfn> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..1_000_000u64).map(move |i| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Pfn(i * 268 + (x >> 33) % 200)
    })
}

fn sparse() -> (u64, PreservedMap) {
    let arena = 1 << 40;
    let mut map = PreservedMap::new(Pfn(arena >> 12));
    for pfn in sparse_pfns() {
        map.preserve(pfn, Order::ZERO).unwrap();
    }
    (arena, map)
}

/// Isolated folios have no larger bulk form: the bulk API on one page each
/// (its decomposition cost on the smallest input).
fn sparse_bulk() -> (u64, PreservedMap) {
    let arena = 1 << 40;
    let mut map = PreservedMap::new(Pfn(arena >> 12));
    for pfn in sparse_pfns() {
        map.preserve_range(pfn.addr().unwrap(), 4096).unwrap();
    }
    (arena, map)
}

fn config(group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
}

fn report(name: &str, map: &PreservedMap, bytes: &[u8]) {
    let gib = map.total_bytes() as f64 / (1u64 << 30) as f64;
    eprintln!(
        "[image-size] {name}: {} folios, {:.3} GiB preserved, image {} bytes = {:.1} bytes/GiB preserved, {:.2} bytes/folio",
        map.folio_count(),
        gib,
        bytes.len(),
        bytes.len() as f64 / gib,
        bytes.len() as f64 / map.folio_count() as f64,
    );
}

fn scenario(c: &mut Criterion, s: &Scenario) {
    let name = s.name;
    let (arena, map) = (s.bulk)();
    assert_eq!((s.per_folio)().1, map, "{name}: both builds agree");
    let bytes = ImageBuilder::new(arena).memmap(&map).build().unwrap();
    report(name, &map, &bytes);
    // parse_validate must cover every byte with its CRC: the last MEMMAP
    // byte changed is a section CRC error.
    let memmap = Image::parse(&bytes)
        .unwrap()
        .section(SectionKind::Memmap)
        .unwrap();
    let mut bad = bytes.clone();
    bad[(memmap.offset + memmap.len - 1) as usize] ^= 1;
    assert!(matches!(
        Image::parse(&bad),
        Err(ParseError::SectionCrc { .. })
    ));
    let folios = map.folio_count();
    let ranges = map.ranges().count() as u64;

    // Builds take up to a second per iteration: one iteration per sample.
    let mut g = c.benchmark_group(format!("image/{name}/build"));
    config(&mut g);
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(folios));
    let (bulk, per_folio) = (s.bulk, s.per_folio);
    g.bench_function("build_map_bulk", |b| {
        b.iter(|| black_box(bulk()).1.folio_count())
    });
    g.bench_function("build_map_per_folio", |b| {
        b.iter(|| black_box(per_folio()).1.folio_count())
    });
    g.finish();

    let mut g = c.benchmark_group(format!("image/{name}"));
    config(&mut g);

    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("serialize", |b| {
        let mut out = Vec::with_capacity(bytes.len());
        b.iter(|| {
            ImageBuilder::new(arena)
                .memmap(black_box(&map))
                .build_into(&mut out)
                .unwrap();
            out.len()
        })
    });
    g.bench_function("memcpy_baseline", |b| {
        let mut dst = vec![0u8; bytes.len()];
        b.iter(|| {
            dst.copy_from_slice(black_box(&bytes));
            black_box(&dst);
        })
    });
    // The least any walk of the image costs: reading each of its bytes
    // once. The sparse image outgrows the caches, so this is memory speed.
    g.bench_function("read_baseline", |b| {
        b.iter(|| {
            black_box(&bytes)
                .chunks_exact(8)
                .fold(0u64, |a, w| a ^ u64::from_le_bytes(w.try_into().unwrap()))
        })
    });
    g.bench_function("crc32_baseline", |b| {
        b.iter(|| crc32fast::hash(black_box(&bytes)))
    });
    g.bench_function("parse_validate", |b| {
        b.iter(|| Image::parse(black_box(&bytes)).unwrap().block_count())
    });

    let img = Image::parse(&bytes).unwrap();
    g.throughput(Throughput::Elements(folios));
    g.bench_function("walk_folios", |b| {
        b.iter(|| img.folios().map(black_box).count())
    });
    // The same walk driven by `next()`, as a `for` loop does.
    g.bench_function("walk_folios_next", |b| {
        b.iter(|| {
            let mut n = 0u64;
            for f in img.folios() {
                black_box(f);
                n += 1;
            }
            n
        })
    });
    g.bench_function("restore_all", |b| {
        b.iter(|| {
            let mut r = Restorer::new(&img);
            r.restore_all().map(black_box).count()
        })
    });
    g.throughput(Throughput::Elements(ranges));
    g.bench_function("walk_ranges", |b| {
        b.iter(|| img.ranges().map(black_box).count())
    });
    g.throughput(Throughput::Elements(1024));
    g.bench_function("is_preserved_x1024", |b| {
        let limit = arena >> 12;
        b.iter(|| {
            (0..1024u64)
                .filter(|i| {
                    img.is_preserved(Pfn(i.wrapping_mul(0x9e37_79b9) % limit))
                        .is_some()
                })
                .count()
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let scenarios = [
        Scenario {
            name: "dense0",
            bulk: dense0,
            per_folio: dense0_per_folio,
        },
        Scenario {
            name: "mixed",
            bulk: mixed,
            per_folio: mixed_per_folio,
        },
        Scenario {
            name: "sparse",
            bulk: sparse_bulk,
            per_folio: sparse,
        },
    ];
    for s in &scenarios {
        scenario(c, s);
    }
}

criterion_group!(image, benches);
criterion_main!(image);
