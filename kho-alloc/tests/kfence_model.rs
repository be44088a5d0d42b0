//! Property test: random sequences of pool operations against a model.
//!
//! Checks, after every step: allocation succeeds exactly when a slot is free
//! and the request fits a page; objects are aligned, zeroed, one per page and
//! inside the pool ranges; good frees succeed; interior, double and foreign
//! frees are reported with the right kind and change nothing; statistics
//! match the model.
// Under Miri: the pool memory is an mmap with guard pages, unsupported.
#![cfg(not(miri))]

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use kho_alloc::kfence::{AnonMemory, CacheTag, ObjectState, Pool, PoolConfig, Report, ReportKind};
use kho_core::{PhysAddr, PAGE_SIZE};
use proptest::prelude::*;

const PAGE: usize = PAGE_SIZE as usize;
const OBJECTS: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    Alloc { size: usize, align_log: u32 },
    Free { pick: usize },
    FreeInterior { pick: usize, off: usize },
    FreeStale { pick: usize },
    FreeForeign,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..=PAGE + 16, 0u32..14).prop_map(|(size, align_log)| Op::Alloc { size, align_log }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (any::<usize>(), 1..PAGE).prop_map(|(pick, off)| Op::FreeInterior { pick, off }),
        1 => any::<usize>().prop_map(|pick| Op::FreeStale { pick }),
        1 => Just(Op::FreeForeign),
    ]
}

fn page_of(p: usize) -> usize {
    p & !(PAGE - 1)
}

/// Frees through the pool.
fn free(pool: &Pool, p: *const u8) -> Result<(), Report> {
    // SAFETY: the model frees each live object once and never reads it
    // again (`read` is only called on live objects); the other pointers it
    // passes are not live objects, which the pool only compares.
    unsafe { pool.free(p) }
}

fn read(addr: usize) -> u8 {
    // SAFETY: only called on bytes of live objects, whose pages are
    // accessible.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        // SAFETY: sysconf has no memory-safety preconditions.
        if unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != PAGE as libc::c_long {
            // The pool needs 4 KiB host pages.
            return Ok(());
        }
        let memory = AnonMemory::with_phys_base(PoolConfig::pages_for(OBJECTS), PhysAddr(0x4000_0000))
            .unwrap();
        let pool = Pool::new(Box::new(memory), PoolConfig { objects: OBJECTS, seed: 3, ..PoolConfig::default() })
            .unwrap();
        let reports = Arc::new(Mutex::new(Vec::<Report>::new()));
        let sink = Arc::clone(&reports);
        pool.set_sink(Arc::new(move |r: &Report| sink.lock().unwrap().push(r.clone())));
        let range = pool.ranges()[0];
        let mut live: Vec<(NonNull<u8>, usize)> = Vec::new();
        let mut stale: Vec<usize> = Vec::new();
        let (mut allocs, mut frees, mut bugs) = (0u64, 0u64, 0u64);
        let foreign = Box::new(0u64);
        for op in ops {
            match op {
                Op::Alloc { size, align_log } => {
                    let align = 1usize << align_log;
                    let got = pool.alloc(size, align, CacheTag::named("model"));
                    let fits = size <= PAGE && align <= PAGE;
                    prop_assert_eq!(got.is_some(), fits && live.len() < OBJECTS);
                    if let Some(p) = got {
                        let a = p.as_ptr() as usize;
                        prop_assert_eq!(a % align, 0);
                        prop_assert_eq!(pool.usable_size(p.as_ptr()), Some(size));
                        prop_assert!(range.contains(pool.phys_addr(p.as_ptr()).unwrap()));
                        prop_assert!(live.iter().all(|(q, _)| page_of(q.as_ptr() as usize) != page_of(a)));
                        prop_assert!((0..size).all(|i| read(a + i) == 0));
                        stale.retain(|&s| page_of(s) != page_of(a));
                        live.push((p, size));
                        allocs += 1;
                    }
                }
                Op::Free { pick } => {
                    if live.is_empty() {
                        continue;
                    }
                    let (p, _) = live.swap_remove(pick % live.len());
                    prop_assert!(free(&pool, p.as_ptr()).is_ok());
                    prop_assert_eq!(pool.state_of(p.as_ptr()), Some(ObjectState::Freed));
                    stale.push(p.as_ptr() as usize);
                    frees += 1;
                }
                Op::FreeInterior { pick, off } => {
                    if live.is_empty() {
                        continue;
                    }
                    let (p, size) = live[pick % live.len()];
                    if size < 2 {
                        continue;
                    }
                    let inner = p.as_ptr().wrapping_add(1 + off % (size - 1));
                    let r = free(&pool, inner).unwrap_err();
                    prop_assert_eq!(r.kind(), ReportKind::InvalidFree);
                    prop_assert_eq!(pool.state_of(p.as_ptr()), Some(ObjectState::Allocated));
                    bugs += 1;
                }
                Op::FreeStale { pick } => {
                    if stale.is_empty() {
                        continue;
                    }
                    let s = stale[pick % stale.len()];
                    let r = free(&pool, s as *const u8).unwrap_err();
                    prop_assert_eq!(r.kind(), ReportKind::DoubleFree);
                    prop_assert_eq!(r.object().unwrap().addr, s);
                    bugs += 1;
                }
                Op::FreeForeign => {
                    let r = free(&pool, &*foreign as *const u64 as *const u8).unwrap_err();
                    prop_assert_eq!(r.kind(), ReportKind::InvalidFree);
                    prop_assert!(r.object().is_none());
                    bugs += 1;
                }
            }
            let s = pool.stats();
            prop_assert_eq!(s.allocated, live.len() as u64);
            prop_assert_eq!((s.total_allocs, s.total_frees, s.bugs), (allocs, frees, bugs));
            prop_assert_eq!(reports.lock().unwrap().len() as u64, bugs);
        }
        for (p, _) in live {
            prop_assert!(free(&pool, p.as_ptr()).is_ok());
        }
        prop_assert_eq!(pool.stats().allocated, 0);
    }
}
