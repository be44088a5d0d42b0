//! `kho check` throughput: the checker on an in-memory arena against the
//! baseline of reading every byte of that arena once (what `cat` does),
//! in the same run. The ratio check/baseline is the figure to watch; the
//! issue's target for the real command is at most 1.5x `cat`.
//!
//! The arena: 256 MiB, 64 MiB preserved as order-9 folios in general
//! memory, each with a 4 KiB extent of data, so the stale-data check reads
//! the other 2044 KiB of every folio.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kho_alloc::check::{check_arena, CheckOptions};
use kho_alloc::superblock::{ImageLocation, Superblock};
use kho_alloc::{ArenaConfig, Region};
use kho_core::{Extent, ImageBuilder, Order, Pfn, PhysAddr, PhysRange, PreservedMap, PAGE_SIZE};
use zerocopy::IntoBytes;

fn arena(size: u64, preserved: u64) -> Vec<u8> {
    let layout = ArenaConfig::with_size(size).layout().expect("layout");
    let folio = Order::new(9).expect("order");
    let count = preserved / folio.bytes();
    let start = layout.general.start.0.next_multiple_of(folio.pages());
    let mut map = PreservedMap::new(Pfn(layout.pages));
    map.preserve_folios(Pfn(start), folio, count)
        .expect("preserve");
    // Write every page so the arena is backed by real memory, not the
    // shared zero page a fresh allocation reads from.
    let mut bytes = vec![0xffu8; size as usize];
    bytes.fill(0);
    let mut extents = Vec::new();
    for i in 0..count {
        let at = (start + i * folio.pages()) * PAGE_SIZE;
        bytes[at as usize..(at + PAGE_SIZE) as usize].fill(0x5a);
        extents.push(Extent {
            range: PhysRange::new(PhysAddr(at), PAGE_SIZE),
            tag: 1,
        });
    }
    // The image lies in a folio its own MEMMAP preserves, right after the
    // data folios, as the commit protocol places it.
    let image_pfn = start + count * folio.pages();
    let build = |map: &PreservedMap| {
        ImageBuilder::new(size)
            .memmap(map)
            .scratch(vec![layout.bytes_of(Region::Scratch)])
            .kfence(vec![layout.bytes_of(Region::Kfence)])
            .extents(extents.clone())
            .build()
            .expect("image")
    };
    let mut order = Order::covering(build(&map).len() as u64).expect("order");
    let image = loop {
        let mut own = map.clone();
        own.preserve(Pfn(image_pfn), order).expect("preserve image");
        let image = build(&own);
        match Order::covering(image.len() as u64).expect("order") {
            o if o <= order => break image,
            o => order = o,
        }
    };
    let at = image_pfn * PAGE_SIZE;
    bytes[at as usize..at as usize + image.len()].copy_from_slice(&image);
    let sb = Superblock {
        layout,
        generation: 1,
        image: Some(ImageLocation {
            offset: at,
            len: image.len() as u64,
            crc: kho_alloc::check::crc32(&image),
        }),
        flags: 0,
    };
    let raw = sb.encode();
    bytes[..raw.as_bytes().len()].copy_from_slice(raw.as_bytes());
    // Slot 1 as a fresh format leaves it: valid, older, no image.
    let old = Superblock {
        generation: 0,
        image: None,
        ..sb
    }
    .encode();
    let at = PAGE_SIZE as usize;
    bytes[at..at + old.as_bytes().len()].copy_from_slice(old.as_bytes());
    bytes
}

fn bench(c: &mut Criterion) {
    let size = 256u64 << 20;
    let bytes = arena(size, 64 << 20);
    let opts = CheckOptions::default();
    let report = check_arena(&bytes, &opts, &mut |_, _| {}).expect("check");
    assert!(report.is_clean(), "{:?}", report.findings);
    let mut g = c.benchmark_group("check");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(size));
    g.bench_function(BenchmarkId::new("baseline-read-all", "256MiB"), |b| {
        b.iter(|| {
            // Touch every byte once, as `cat` does.
            let x = bytes
                .chunks(1 << 16)
                .fold(0u8, |a, c| a | c.iter().fold(0u8, |x, &y| x | y));
            std::hint::black_box(x)
        })
    });
    g.bench_function(
        BenchmarkId::new("check_arena", "256MiB-64MiB-preserved"),
        |b| {
            b.iter(|| {
                check_arena(std::hint::black_box(&bytes), &opts, &mut |_, _| {})
                    .map(|r| r.findings.len())
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
