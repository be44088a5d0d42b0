//! Buddy page allocator: alloc+free of one folio of order 0, 4 and 9 on a
//! 1 GiB arena, through the public `Heap::alloc_pages`/`free_pages`.
//! Throughput is folio alloc+free pairs per second (target: 10 M/s).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kho_alloc::{Arena, ArenaConfig, GfpFlags, Heap};
use kho_core::Order;

fn buddy(c: &mut Criterion) {
    let heap = Heap::new(Arena::anonymous(&ArenaConfig::default()).expect("arena")).expect("heap");
    let mut g = c.benchmark_group("buddy_alloc_free");
    g.throughput(Throughput::Elements(1));
    for order in [0u8, 4, 9] {
        let o = Order::new(order).expect("order");
        g.bench_with_input(BenchmarkId::new("order", order), &o, |b, &o| {
            b.iter(|| {
                let p = heap.alloc_pages(o, GfpFlags::NONE).expect("alloc");
                black_box(p.addr());
                heap.free_pages(p).expect("free");
            })
        });
    }
    // A working set: 32 folios held, the oldest freed each step, so blocks
    // really split and merge rather than bouncing through one hot slot.
    for order in [0u8, 4, 9] {
        let o = Order::new(order).expect("order");
        let mut ring: std::collections::VecDeque<_> = (0..32)
            .map(|_| heap.alloc_pages(o, GfpFlags::NONE).expect("alloc"))
            .collect();
        g.bench_with_input(BenchmarkId::new("ring32_order", order), &o, |b, &o| {
            b.iter(|| {
                ring.push_back(heap.alloc_pages(o, GfpFlags::NONE).expect("alloc"));
                if let Some(p) = ring.pop_front() {
                    heap.free_pages(p).expect("free");
                }
            })
        });
        for p in ring {
            heap.free_pages(p).expect("free");
        }
    }
    g.finish();
}

criterion_group!(benches, buddy);
criterion_main!(benches);
