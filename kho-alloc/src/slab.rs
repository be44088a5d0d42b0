//! Slab caches: objects of one size carved out of buddy folios.
//!
//! A slab is a folio of the cache's order whose whole byte range holds
//! objects at multiples of the cache's stride from the folio start; nothing
//! else lives in the page, so preserving a slab page preserves only objects
//! (and a tail shorter than one object, scrubbed at freeze). The slab's
//! order, object size, object count and allocation bitmap live in a side
//! table here, and in the image's SLAB section across a handover.
//!
//! Slabs with free slots sit on a partial stack; a slab that becomes empty
//! goes back to the buddy allocator unless it is the cache's one spare.

use std::sync::{Mutex, MutexGuard, PoisonError};

use kho_core::{Order, Pfn, PhysAddr, PhysRange, PAGE_SIZE};

use crate::buddy::Zone;
use crate::error::{Error, Result};

/// Marks a vacant slot of the slab table.
const VACANT: u64 = u64::MAX;
/// Largest object size served by slabs.
pub const MAX_OBJECT_SIZE: u32 = 4096;
/// Fewest objects per slab when the order allows.
const MIN_OBJECTS: u64 = 8;
/// Longest cache name (the image stores 32 bytes).
pub const MAX_NAME_LEN: usize = 32;

/// One slab's side-table entry.
#[derive(Debug)]
pub(crate) struct Slab {
    /// Head PFN, or `VACANT`.
    pub(crate) pfn: u64,
    /// Bit `i` set: object `i` is allocated.
    pub(crate) bitmap: Box<[u64]>,
    /// Free objects.
    pub(crate) free: u32,
    /// Whether the index is on the partial stack.
    in_partial: bool,
}

#[derive(Debug, Default)]
pub(crate) struct SlabInner {
    pub(crate) slabs: Vec<Slab>,
    vacant: Vec<u32>,
    partial: Vec<u32>,
    /// Allocated objects.
    pub(crate) live: u64,
    /// Slabs holding no object, kept instead of freed.
    spare: u32,
}

/// A cache of equally sized objects.
#[derive(Debug)]
pub(crate) struct SlabCache {
    /// Index in the heap's cache table.
    pub(crate) index: u16,
    /// Name (size classes: `kmalloc-<size>`).
    pub(crate) name: String,
    /// Requested object size.
    pub(crate) size: u32,
    /// Distance between objects: `size` rounded up to `align`.
    pub(crate) stride: u32,
    /// Object alignment.
    pub(crate) align: u32,
    /// Order of every slab folio.
    pub(crate) order: Order,
    /// Objects per slab.
    pub(crate) per_slab: u32,
    /// Whether slabs come from the preservable pool and are preserved at
    /// freeze.
    pub(crate) preservable: bool,
    inner: Mutex<SlabInner>,
}

/// Geometry of a cache for `size` and `align`: `(stride, order, per_slab)`.
/// The order is the smallest (at most 3, at most `max_order`) that fits
/// `MIN_OBJECTS` objects.
pub(crate) fn geometry(size: u32, align: u32, max_order: Order) -> Result<(u32, Order, u32)> {
    if size == 0 || size > MAX_OBJECT_SIZE || !align.is_power_of_two() || align > MAX_OBJECT_SIZE {
        return Err(Error::BadSize {
            size: u64::from(size),
            align: u64::from(align),
            max: u64::from(MAX_OBJECT_SIZE),
        });
    }
    let stride = size.next_multiple_of(align);
    let cap = max_order.get().min(3);
    let mut k = 0u8;
    while (PAGE_SIZE << k) / u64::from(stride) < MIN_OBJECTS && k < cap {
        k += 1;
    }
    let order = Order::new(k).unwrap_or(Order::ZERO);
    // stride <= 4096 and order <= 3: at least 1 and at most 4096 objects.
    let per_slab = (order.bytes() / u64::from(stride)) as u32;
    Ok((stride, order, per_slab))
}

impl SlabCache {
    /// A cache; `size`/`align` are checked by [`geometry`].
    pub(crate) fn new(
        index: u16,
        name: String,
        size: u32,
        align: u32,
        max_order: Order,
        preservable: bool,
    ) -> Result<SlabCache> {
        if name.len() > MAX_NAME_LEN || name.as_bytes().contains(&0) {
            return Err(Error::NameTooLong {
                len: name.len(),
                max: MAX_NAME_LEN,
            });
        }
        let (stride, order, per_slab) = geometry(size, align, max_order)?;
        Ok(SlabCache {
            index,
            name,
            size,
            stride,
            align,
            order,
            per_slab,
            preservable,
            inner: Mutex::new(SlabInner::default()),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SlabInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn words(&self) -> usize {
        (self.per_slab as usize).div_ceil(64)
    }

    /// Allocate up to `n` objects into `out` as `(addr, slab)`, taking new
    /// slabs from `zone` as needed. Returns how many were allocated; fails
    /// only if none could be.
    pub(crate) fn alloc_batch(
        &self,
        zone: &Zone,
        nowait: bool,
        n: usize,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<usize> {
        let mut g = if nowait {
            match self.inner.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(Error::WouldBlock { zone: "slab cache" })
                }
            }
        } else {
            self.lock()
        };
        let mut got = 0;
        while got < n {
            let s = match g.partial.last().copied() {
                Some(s) => {
                    let slab = &g.slabs[s as usize];
                    if slab.pfn == VACANT || slab.free == 0 {
                        g.partial.pop();
                        g.slabs[s as usize].in_partial = false;
                        continue;
                    }
                    s
                }
                None => match self.grow(&mut g, zone, nowait) {
                    Ok(s) => s,
                    Err(e) if got == 0 => return Err(e),
                    Err(_) => break,
                },
            };
            got += self.take_from(&mut g, s, n - got, out);
        }
        g.live += got as u64;
        Ok(got)
    }

    /// Take up to `n` free objects of slab `s`.
    fn take_from(&self, g: &mut SlabInner, s: u32, n: usize, out: &mut Vec<(u64, u32)>) -> usize {
        let stride = u64::from(self.stride);
        let per = self.per_slab;
        let slab = &mut g.slabs[s as usize];
        if slab.free == 0 {
            return 0;
        }
        if slab.free == per {
            g.spare -= 1;
        }
        let base = slab.pfn << kho_core::PAGE_SHIFT;
        let mut got = 0;
        for (w, word) in slab.bitmap.iter_mut().enumerate() {
            while got < n && *word != u64::MAX {
                let bit = (!*word).trailing_zeros();
                let i = w as u32 * 64 + bit;
                if i >= per {
                    break;
                }
                *word |= 1 << bit;
                out.push((base + u64::from(i) * stride, s));
                got += 1;
            }
            if got == n {
                break;
            }
        }
        slab.free -= got as u32;
        got
    }

    /// A new empty slab from `zone`, pushed on the partial stack.
    fn grow(&self, g: &mut SlabInner, zone: &Zone, nowait: bool) -> Result<u32> {
        let pfn = zone.alloc_slab(self.order, nowait)?;
        Ok(self.install(
            g,
            pfn.0,
            vec![0; self.words()].into_boxed_slice(),
            self.per_slab,
        ))
    }

    fn install(&self, g: &mut SlabInner, pfn: u64, bitmap: Box<[u64]>, free: u32) -> u32 {
        let slab = Slab {
            pfn,
            bitmap,
            free,
            in_partial: false,
        };
        let s = match g.vacant.pop() {
            Some(s) => {
                let in_partial = g.slabs[s as usize].in_partial;
                g.slabs[s as usize] = Slab { in_partial, ..slab };
                s
            }
            None => {
                g.slabs.push(slab);
                (g.slabs.len() - 1) as u32
            }
        };
        if free == self.per_slab {
            g.spare += 1;
        }
        if free > 0 && !g.slabs[s as usize].in_partial {
            g.slabs[s as usize].in_partial = true;
            g.partial.push(s);
        }
        s
    }

    /// Install a restored slab with its bitmap; its folio is already
    /// claimed in `zone`, and becomes a slab page there.
    pub(crate) fn adopt(&self, zone: &Zone, pfn: Pfn, bitmap: Vec<u64>) -> Result<u32> {
        let words = self.words();
        if bitmap.len() != words {
            return Err(Error::Inconsistent {
                addr: pfn.0 << kho_core::PAGE_SHIFT,
                what: "slab bitmap words",
                expected: words as u64,
                found: bitmap.len() as u64,
            });
        }
        let tail = self.per_slab % 64;
        if tail != 0 && bitmap[words - 1] >> tail != 0 {
            return Err(Error::Inconsistent {
                addr: pfn.0 << kho_core::PAGE_SHIFT,
                what: "slab bitmap bits past the object count",
                expected: 0,
                found: bitmap[words - 1] >> tail,
            });
        }
        let live: u32 = bitmap.iter().map(|w| w.count_ones()).sum();
        zone.mark_slab(pfn, self.order)?;
        let mut g = self.lock();
        g.live += u64::from(live);
        Ok(self.install(
            &mut g,
            pfn.0,
            bitmap.into_boxed_slice(),
            self.per_slab - live,
        ))
    }

    /// Free the object at `addr` of slab `s`. Returns the folio to give
    /// back to the buddy allocator if the slab became surplus.
    pub(crate) fn free(&self, addr: u64, s: u32) -> Result<Option<Pfn>> {
        let mut g = self.lock();
        self.free_locked(&mut g, addr, s)
    }

    /// Free many objects under one lock; surplus slab folios are appended
    /// to `surplus`. Objects that are not allocated are skipped and
    /// counted in the result.
    pub(crate) fn free_batch(&self, objs: &[(u64, u32)], surplus: &mut Vec<Pfn>) -> usize {
        let mut g = self.lock();
        let mut bad = 0;
        for &(addr, s) in objs {
            match self.free_locked(&mut g, addr, s) {
                Ok(Some(pfn)) => surplus.push(pfn),
                Ok(None) => {}
                Err(_) => bad += 1,
            }
        }
        bad
    }

    fn free_locked(&self, g: &mut SlabInner, addr: u64, s: u32) -> Result<Option<Pfn>> {
        let not = Error::NotAllocated {
            addr,
            expected: "an allocated object of this cache",
        };
        let per = self.per_slab;
        let slab = g.slabs.get_mut(s as usize).ok_or(not)?;
        let base = slab.pfn.wrapping_shl(kho_core::PAGE_SHIFT);
        let off = addr.wrapping_sub(base);
        if slab.pfn == VACANT || off >= self.order.bytes() || off % u64::from(self.stride) != 0 {
            return Err(Error::NotAllocated {
                addr,
                expected: "an allocated object of this cache",
            });
        }
        let i = off / u64::from(self.stride);
        if i >= u64::from(per) {
            return Err(Error::NotAllocated {
                addr,
                expected: "an allocated object of this cache",
            });
        }
        let (w, b) = ((i / 64) as usize, i % 64);
        if slab.bitmap[w] & (1 << b) == 0 {
            return Err(Error::NotAllocated {
                addr,
                expected: "an allocated object (double free?)",
            });
        }
        slab.bitmap[w] &= !(1 << b);
        slab.free += 1;
        let free = slab.free;
        let in_partial = slab.in_partial;
        g.live -= 1;
        if free == per {
            if g.spare >= 1 {
                let pfn = g.slabs[s as usize].pfn;
                g.slabs[s as usize].pfn = VACANT;
                g.slabs[s as usize].free = 0;
                g.vacant.push(s);
                return Ok(Some(Pfn(pfn)));
            }
            g.spare += 1;
        }
        if !in_partial {
            g.slabs[s as usize].in_partial = true;
            g.partial.push(s);
        }
        Ok(None)
    }

    /// Whether `(addr, s)` is an allocated object of this cache.
    #[cfg(test)]
    pub(crate) fn is_live(&self, addr: u64, s: u32) -> bool {
        let g = self.lock();
        let Some(slab) = g.slabs.get(s as usize) else {
            return false;
        };
        let off = addr.wrapping_sub(slab.pfn.wrapping_shl(kho_core::PAGE_SHIFT));
        if slab.pfn == VACANT || off % u64::from(self.stride) != 0 {
            return false;
        }
        let i = off / u64::from(self.stride);
        i < u64::from(self.per_slab) && slab.bitmap[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Head PFNs of the slabs in use (tests).
    #[cfg(test)]
    pub(crate) fn slab_pfns(&self) -> Vec<u64> {
        let g = self.lock();
        g.slabs
            .iter()
            .filter(|s| s.pfn != VACANT)
            .map(|s| s.pfn)
            .collect()
    }

    /// Allocated objects.
    pub(crate) fn live(&self) -> u64 {
        self.lock().live
    }

    /// Byte ranges of every free slot and of the tail past the last object
    /// of slab `slab`, coalesced.
    pub(crate) fn dead_ranges(&self, slab: &Slab, mut f: impl FnMut(PhysRange)) {
        let base = slab.pfn << kho_core::PAGE_SHIFT;
        let stride = u64::from(self.stride);
        let mut run: Option<(u64, u64)> = None;
        let mut emit = |s: u64, e: u64, run: &mut Option<(u64, u64)>| match run {
            Some((_, re)) if *re == s => *re = e,
            _ => {
                if let Some((rs, re)) = run.take() {
                    f(PhysRange::new(PhysAddr(rs), re - rs));
                }
                *run = Some((s, e));
            }
        };
        for i in 0..u64::from(self.per_slab) {
            if slab.bitmap[(i / 64) as usize] & (1 << (i % 64)) == 0 {
                emit(base + i * stride, base + (i + 1) * stride, &mut run);
            }
        }
        let used = u64::from(self.per_slab) * stride;
        if used < self.order.bytes() {
            emit(base + used, base + self.order.bytes(), &mut run);
        }
        if let Some((rs, re)) = run {
            f(PhysRange::new(PhysAddr(rs), re - rs));
        }
    }

    /// Whether a slab entry is in use.
    pub(crate) fn is_vacant(slab: &Slab) -> bool {
        slab.pfn == VACANT
    }

    /// Check the side table against the counters (tests).
    #[cfg(test)]
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        let g = self.lock();
        let mut live = 0u64;
        let mut spare = 0u32;
        for (s, slab) in g.slabs.iter().enumerate() {
            if slab.pfn == VACANT {
                continue;
            }
            let used: u32 = slab.bitmap.iter().map(|w| w.count_ones()).sum();
            if used + slab.free != self.per_slab {
                return Err(format!(
                    "slab {s}: {used} used + {} free != {}",
                    slab.free, self.per_slab
                ));
            }
            if slab.free > 0 && !slab.in_partial {
                return Err(format!(
                    "slab {s} has free slots but is not on the partial stack"
                ));
            }
            if slab.free == self.per_slab {
                spare += 1;
            }
            live += u64::from(used);
        }
        if live != g.live || spare != g.spare {
            return Err(format!(
                "live {} spare {} but walk gives {live} {spare}",
                g.live, g.spare
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kho_core::PfnRange;
    use proptest::prelude::*;

    fn zone() -> Zone {
        Zone::new(
            "t",
            PfnRange {
                start: Pfn(0),
                end: Pfn(256),
            },
            Order::new(10).unwrap(),
            true,
        )
        .unwrap()
    }

    #[test]
    fn geometry_keeps_eight_objects() {
        let max = Order::new(10).unwrap();
        assert_eq!(geometry(8, 8, max).unwrap(), (8, Order::ZERO, 512));
        assert_eq!(geometry(64, 8, max).unwrap(), (64, Order::ZERO, 64));
        assert_eq!(geometry(100, 64, max).unwrap(), (128, Order::ZERO, 32));
        assert_eq!(geometry(1024, 8, max).unwrap().1, Order::new(1).unwrap());
        assert_eq!(
            geometry(4096, 8, max).unwrap(),
            (4096, Order::new(3).unwrap(), 8)
        );
        assert!(geometry(0, 8, max).is_err());
        assert!(geometry(4097, 8, max).is_err());
        assert!(geometry(64, 3, max).is_err());
        assert!(SlabCache::new(0, "x".repeat(33), 8, 8, max, false).is_err());
    }

    #[test]
    fn nowait_never_waits_for_the_cache_lock() {
        let c = SlabCache::new(0, "t".into(), 64, 8, Order::new(10).unwrap(), true).unwrap();
        let z = zone();
        let mut out = Vec::new();
        let g = c.lock();
        assert!(matches!(
            c.alloc_batch(&z, true, 1, &mut out),
            Err(Error::WouldBlock { .. })
        ));
        drop(g);
        assert_eq!(c.alloc_batch(&z, true, 1, &mut out).unwrap(), 1);
    }

    #[test]
    fn adopt_checks_the_bitmap_and_the_folio() {
        // 96-byte objects aligned 32: 42 per page, one bitmap word.
        let c = SlabCache::new(0, "t".into(), 96, 32, Order::new(10).unwrap(), true).unwrap();
        let z = zone();
        let pfn = z.alloc(Order::ZERO, false).unwrap();
        let addr = pfn.0 << kho_core::PAGE_SHIFT;
        assert!(matches!(
            c.adopt(&z, pfn, vec![1 << 42]),
            Err(Error::Inconsistent {
                what: "slab bitmap bits past the object count",
                addr: a,
                found: 1,
                ..
            }) if a == addr
        ));
        assert!(matches!(
            c.adopt(&z, pfn, vec![0, 0]),
            Err(Error::Inconsistent {
                what: "slab bitmap words",
                expected: 1,
                found: 2,
                ..
            })
        ));
        // Not an allocated folio of the zone: a free page.
        assert!(matches!(
            c.adopt(&z, Pfn(200), vec![1]),
            Err(Error::NotAllocated { .. })
        ));
        // Refusals leave no trace.
        assert_eq!(c.live(), 0);
        assert!(c.slab_pfns().is_empty());
        assert_eq!(z.stats().slab_pages, 0);
        let s = c.adopt(&z, pfn, vec![0b101]).unwrap();
        assert_eq!(c.live(), 2);
        assert_eq!(c.slab_pfns(), vec![pfn.0]);
        assert_eq!(
            z.owned_folios(pfn, Pfn(pfn.0 + 1)),
            Err((pfn, "a slab page"))
        );
        c.check().unwrap();
        // The free slots are available, the live ones are not handed out.
        let mut out = Vec::new();
        c.alloc_batch(&z, false, 40, &mut out).unwrap();
        assert!(out.iter().all(|&(a, _)| a != addr && a != addr + 192));
        assert!(c.free(addr + 192, s).unwrap().is_none());
    }

    #[test]
    fn dead_ranges_cover_free_slots_and_tail() {
        let c = SlabCache::new(0, "t".into(), 96, 32, Order::new(10).unwrap(), true).unwrap();
        let z = zone();
        let mut out = Vec::new();
        c.alloc_batch(&z, false, 3, &mut out).unwrap();
        c.free(out[1].0, out[1].1).unwrap();
        let g = c.lock();
        let mut ranges = Vec::new();
        c.dead_ranges(&g.slabs[0], |r| ranges.push((r.start - out[0].0, r.len)));
        // Slot 1, then slots 3.. and the tail (42 * 96 = 4032, tail 64).
        assert_eq!(ranges, vec![(96, 96), (288, 4096 - 288)]);
    }

    proptest! {
        #![proptest_config(if cfg!(miri) {
        // Under Miri: few cases, and no failure file (no file system).
        ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(4) }
    } else {
        ProptestConfig::with_cases(128)
    })]

        #[test]
        fn random_alloc_free_keeps_invariants(
            size in prop_oneof![Just(8u32), Just(64), Just(256), Just(4096), 1u32..4096],
            ops in prop::collection::vec(
                (any::<bool>(), any::<usize>()),
                1..if cfg!(miri) { 60 } else { 400 },
            ),
        ) {
            let c = SlabCache::new(1, "p".into(), size, 8, Order::new(10).unwrap(), false).unwrap();
            let z = zone();
            let mut live: Vec<(u64, u32)> = Vec::new();
            for (alloc, pick) in ops {
                if alloc || live.is_empty() {
                    let mut out = Vec::new();
                    match c.alloc_batch(&z, false, 1 + pick % 3, &mut out) {
                        Ok(n) => prop_assert_eq!(n, out.len()),
                        Err(Error::OutOfMemory { .. }) => {}
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                    for &(a, s) in &out {
                        let stride = u64::from(c.stride);
                        prop_assert!(live.iter().all(|&(b, _)| a + stride <= b || b + stride <= a), "overlap at {a:#x}");
                        prop_assert!(c.is_live(a, s));
                    }
                    live.extend(out);
                } else {
                    let (a, s) = live.swap_remove(pick % live.len());
                    if let Some(pfn) = c.free(a, s).unwrap() {
                        z.free(pfn, false).unwrap();
                    }
                    prop_assert!(!c.is_live(a, s));
                    prop_assert!(c.free(a, s).is_err());
                }
                prop_assert_eq!(c.live(), live.len() as u64);
            }
            c.check().map_err(TestCaseError::fail)?;
            z.check().map_err(TestCaseError::fail)?;
        }
    }
}
