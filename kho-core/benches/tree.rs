//! Encode and decode of a 1000-node metadata tree, against a baseline that
//! decodes the same bytes with plain postcard and no validation.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kho_core::{Node, PhysAddr, PhysRange, Tree, TreeLimits};
use serde::Deserialize;

/// The wire form of a tree, as a postcard derive reads it without checks.
#[derive(Deserialize)]
#[allow(dead_code)]
struct FlatTree {
    version: u8,
    nodes: Vec<FlatNode>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct FlatNode {
    parent: u32,
    name: String,
    compatible: String,
    props: Vec<FlatProp>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct FlatProp {
    name: String,
    value: FlatValue,
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum FlatValue {
    U64(u64),
    Bytes(Vec<u8>),
    Str(String),
    Range(PhysRange),
}

/// Root, 9 subsystems, 110 objects each: 1000 nodes, 3 properties each.
fn thousand_nodes() -> Tree {
    let mut root = Node::root("kho-root-v1")
        .with_u64("generation", 1)
        .with_str("agent", "bench")
        .with_bytes("uuid", vec![0xab; 16]);
    for s in 0..9u64 {
        let mut sub = Node::new(format!("subsys{s}"), "kv-store-v1")
            .with_u64("entries", 110)
            .with_range("index", PhysRange::new(PhysAddr(s << 24), 1 << 16))
            .with_str("label", format!("store {s}"));
        for o in 0..110u64 {
            sub.push_child(
                Node::new(format!("obj{o}"), "kv-object-v1")
                    .with_u64("key", o)
                    .with_range(
                        "data",
                        PhysRange::new(PhysAddr((s << 24) + (o << 12)), 4096),
                    )
                    .with_bytes("tag", o.to_le_bytes().to_vec()),
            );
        }
        root.push_child(sub);
    }
    Tree::new(root)
}

fn bench_tree(c: &mut Criterion) {
    let tree = thousand_nodes();
    assert_eq!(tree.node_count(), 1000);
    let bytes = match tree.encode() {
        Ok(b) => b,
        Err(e) => panic!("bench tree does not encode: {e}"),
    };
    let limits = TreeLimits::default();

    let mut g = c.benchmark_group("tree_1000_nodes");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function(BenchmarkId::new("encode", bytes.len()), |b| {
        b.iter(|| black_box(&tree).encode())
    });
    g.bench_function(BenchmarkId::new("decode_validated", bytes.len()), |b| {
        b.iter(|| Tree::decode(black_box(&bytes), &limits))
    });
    g.bench_function(
        BenchmarkId::new("postcard_unvalidated_baseline", bytes.len()),
        |b| b.iter(|| postcard::from_bytes::<FlatTree>(black_box(&bytes)).is_ok()),
    );
    g.finish();
}

criterion_group!(benches, bench_tree);
criterion_main!(benches);
