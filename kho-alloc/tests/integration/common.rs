//! Helpers shared by the integration tests.

use kho_alloc::{GfpFlags, Heap, Obj, PreservableCache};

/// Size of the objects of the test cache.
pub const OBJ: u32 = 64;

/// Fill `obj` with bytes derived from `seed`.
pub fn fill(heap: &Heap, obj: &mut Obj, seed: u64) {
    let bytes = heap.bytes_mut(obj).unwrap();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in bytes.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// FNV-1a over `(address, bytes)` of every object, in address order.
pub fn checksum<'a>(items: impl Iterator<Item = (u64, &'a [u8])>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    };
    for (addr, bytes) in items {
        addr.to_le_bytes().into_iter().for_each(&mut eat);
        bytes.iter().copied().for_each(&mut eat);
    }
    h
}

/// Allocate `n` objects of `cache`, each filled from its index.
pub fn populate(heap: &Heap, cache: &PreservableCache, n: usize) -> Vec<Obj> {
    (0..n)
        .map(|i| {
            let mut o = cache.alloc(GfpFlags::NONE).unwrap();
            fill(heap, &mut o, i as u64);
            o
        })
        .collect()
}
