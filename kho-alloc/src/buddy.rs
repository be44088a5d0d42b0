//! The buddy page allocator of one zone (general or preservable memory).
//!
//! The zone keeps its bookkeeping in side arrays sized by its page count,
//! never inside the pages it manages, so that a preserved page carries
//! nothing of the allocator across a handover and scrubbing never fights
//! with metadata:
//!
//! - `state[i]`: one byte per page: the head of a free block (in a free
//!   list), the head of a free block parked in the per-order hot cache, the
//!   head of an allocated block — a folio handed to its owner, or a slab
//!   page of a cache — (each with its order), a tail page, or reserved
//!   (not yet handed to the allocator, during restore);
//! - `next[i]`/`prev[i]`: a doubly linked free list per order, threaded
//!   through the heads of free blocks by page index.
//!
//! Blocks are naturally aligned on absolute PFNs and lie wholly inside the
//! zone. Freeing merges a block with its buddy while the buddy is a free
//! head of the same order. To keep alloc+free pairs cheap, a freed block of
//! order `k <= HOT_MAX_ORDER` first goes to a small per-order stack (the
//! kernel's per-CPU page lists, here one per zone under the zone lock); an
//! allocation that finds the free lists empty drains those stacks into the
//! free lists, merging, before it gives up.

use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use kho_core::{decompose, Folio, Order, Pfn, PfnRange, NR_ORDERS};

use crate::error::{Error, Result};

const NIL: u32 = u32::MAX;
const RESERVED: u8 = 0x00;
const TAIL: u8 = 0x20;
const FREE: u8 = 0x40;
const HOT: u8 = 0x80;
/// Allocated to a slab cache: its objects belong to the cache's users, the
/// page to nobody who could preserve it.
const SLAB: u8 = 0xa0;
const ALLOC: u8 = 0xc0;
const KIND: u8 = 0xe0;
const ORDER: u8 = 0x1f;

/// Largest order kept in the hot stacks.
pub const HOT_MAX_ORDER: u8 = 9;
/// Blocks kept per hot stack.
const HOT_HIGH: usize = 32;

/// Counters of one zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuddyStats {
    /// Pages the zone manages.
    pub total_pages: u64,
    /// Pages in free blocks (including hot stacks).
    pub free_pages: u64,
    /// Pages in allocated blocks (folios and slab pages).
    pub allocated_pages: u64,
    /// Of those, pages of slab caches.
    pub slab_pages: u64,
    /// Pages not yet handed to the allocator (only during restore).
    pub reserved_pages: u64,
    /// Free blocks per order (including hot stacks).
    pub free_blocks: [u64; NR_ORDERS],
    /// Allocated blocks per order.
    pub allocated_blocks: [u64; NR_ORDERS],
}

struct Inner {
    state: Vec<u8>,
    next: Vec<u32>,
    prev: Vec<u32>,
    heads: [u32; NR_ORDERS],
    hot: Vec<Vec<u32>>,
    stats: BuddyStats,
}

/// A buddy allocator over the pages `range`, orders `0..=max_order`.
pub(crate) struct Zone {
    name: &'static str,
    start: u64,
    end: u64,
    max_order: Order,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("name", &self.name)
            .field("start", &Pfn(self.start))
            .field("end", &Pfn(self.end))
            .field("max_order", &self.max_order)
            .finish()
    }
}

impl Zone {
    /// A zone over `range`. With `populate` every page starts free;
    /// otherwise every page starts reserved, to be [`claim`](Self::claim)ed
    /// or [`release_reserved`](Self::release_reserved).
    pub(crate) fn new(
        name: &'static str,
        range: PfnRange,
        max_order: Order,
        populate: bool,
    ) -> Result<Zone> {
        let pages = range.end.0.saturating_sub(range.start.0);
        if pages >= u64::from(NIL) {
            return Err(Error::InvalidConfig {
                what: "zone pages",
                value: pages,
                limit: u64::from(NIL) - 1,
            });
        }
        let n = pages as usize;
        let inner = Inner {
            state: vec![RESERVED; n],
            next: vec![NIL; n],
            prev: vec![NIL; n],
            heads: [NIL; NR_ORDERS],
            hot: (0..=HOT_MAX_ORDER)
                .map(|_| Vec::with_capacity(HOT_HIGH))
                .collect(),
            stats: BuddyStats {
                total_pages: pages,
                reserved_pages: pages,
                ..BuddyStats::default()
            },
        };
        let zone = Zone {
            name,
            start: range.start.0,
            end: range.start.0 + pages,
            max_order,
            inner: Mutex::new(inner),
        };
        if populate {
            zone.release_reserved();
        }
        Ok(zone)
    }

    /// Zone name, for errors.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// Whether `pfn` is inside the zone.
    #[inline]
    pub(crate) fn contains(&self, pfn: Pfn) -> bool {
        self.start <= pfn.0 && pfn.0 < self.end
    }

    /// How many of the pages `[first, end)` lie in the zone.
    pub(crate) fn pages_in(&self, first: Pfn, end: Pfn) -> u64 {
        end.0.min(self.end).saturating_sub(first.0.max(self.start))
    }

    /// Largest order served.
    pub(crate) fn max_order(&self) -> Order {
        self.max_order
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_nowait(&self, nowait: bool) -> Result<MutexGuard<'_, Inner>> {
        if !nowait {
            return Ok(self.lock());
        }
        match self.inner.try_lock() {
            Ok(g) => Ok(g),
            Err(TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(TryLockError::WouldBlock) => Err(Error::WouldBlock { zone: self.name }),
        }
    }

    /// Allocate a folio of `order` for an owner; returns its head. With
    /// `nowait` a busy zone lock gives [`Error::WouldBlock`] instead of
    /// waiting.
    pub(crate) fn alloc(&self, order: Order, nowait: bool) -> Result<Pfn> {
        self.alloc_as(order, nowait, ALLOC)
    }

    /// Allocate a slab page of `order` (see [`alloc`](Self::alloc)).
    pub(crate) fn alloc_slab(&self, order: Order, nowait: bool) -> Result<Pfn> {
        self.alloc_as(order, nowait, SLAB)
    }

    fn alloc_as(&self, order: Order, nowait: bool, kind: u8) -> Result<Pfn> {
        if order > self.max_order {
            return Err(Error::InvalidOrder {
                order: order.get(),
                max: self.max_order.get(),
            });
        }
        let mut g = self.lock_nowait(nowait)?;
        let i = match g.alloc(self, order) {
            Some(i) => i,
            None => {
                g.drain_hot(self);
                g.alloc(self, order).ok_or(Error::OutOfMemory {
                    order: order.get(),
                    zone: self.name,
                })?
            }
        };
        if kind == SLAB {
            g.state[i as usize] = SLAB | order.get();
            g.stats.slab_pages += order.pages();
        }
        Ok(Pfn(self.start + u64::from(i)))
    }

    /// The order of the allocated block (folio or slab page) headed at
    /// `pfn`, if it is one.
    pub(crate) fn allocated_order(&self, pfn: Pfn) -> Option<Order> {
        if !self.contains(pfn) {
            return None;
        }
        let s = self.lock().state[(pfn.0 - self.start) as usize];
        is_allocated(s).then(|| Order::new(s & ORDER)).flatten()
    }

    /// Make the allocated folio `(pfn, order)` a slab page (a restored
    /// slab adopted by its cache).
    pub(crate) fn mark_slab(&self, pfn: Pfn, order: Order) -> Result<()> {
        let not = Error::NotAllocated {
            addr: pfn.addr().map_or(u64::MAX, |a| a.0),
            expected: "the head of an allocated folio of the slab order",
        };
        if !self.contains(pfn) {
            return Err(not);
        }
        let mut g = self.lock();
        let i = (pfn.0 - self.start) as usize;
        if g.state[i] != ALLOC | order.get() {
            return Err(not);
        }
        g.state[i] = SLAB | order.get();
        g.stats.slab_pages += order.pages();
        Ok(())
    }

    /// The folios handed to owners that tile the pages `[first, end)`
    /// (clipped to the zone), in address order; each may extend past the
    /// range. Fails with the first page that lies in no such folio and
    /// what it is instead.
    pub(crate) fn owned_folios(
        &self,
        first: Pfn,
        end: Pfn,
    ) -> std::result::Result<Vec<Folio>, (Pfn, &'static str)> {
        let (lo, hi) = (first.0.max(self.start), end.0.min(self.end));
        let g = self.lock();
        let mut out = Vec::new();
        let mut p = lo;
        while p < hi {
            let (head, s) = g.head_of(self, (p - self.start) as usize);
            let pfn = Pfn(self.start + head as u64);
            let what = match s & KIND {
                ALLOC => {
                    let order = Order::new(s & ORDER).unwrap_or(Order::ZERO);
                    out.push(Folio { pfn, order });
                    p = pfn.0 + order.pages();
                    continue;
                }
                SLAB => "a slab page",
                FREE | HOT => "free",
                RESERVED => "reserved",
                _ => "not the head of a block",
            };
            return Err((Pfn(p), what));
        }
        Ok(out)
    }

    /// Free the allocated block headed at `pfn`; returns its order.
    pub(crate) fn free(&self, pfn: Pfn, nowait: bool) -> Result<Order> {
        let not = Error::NotAllocated {
            addr: pfn.addr().map_or(u64::MAX, |a| a.0),
            expected: "the head of an allocated block",
        };
        if !self.contains(pfn) {
            return Err(not);
        }
        let i = (pfn.0 - self.start) as u32;
        let mut g = self.lock_nowait(nowait)?;
        let s = g.state[i as usize];
        if !is_allocated(s) {
            return Err(not);
        }
        let k = s & ORDER;
        if s & KIND == SLAB {
            g.stats.slab_pages -= 1 << k;
        }
        g.stats.allocated_blocks[k as usize] -= 1;
        g.stats.allocated_pages -= 1 << k;
        g.stats.free_pages += 1 << k;
        g.stats.free_blocks[k as usize] += 1;
        if k <= HOT_MAX_ORDER && g.hot[k as usize].len() < HOT_HIGH {
            g.state[i as usize] = HOT | k;
            g.hot[k as usize].push(i);
        } else {
            g.stats.free_blocks[k as usize] -= 1;
            g.merge_free(self, i, k);
        }
        Ok(Order::new(k).unwrap_or(Order::ZERO))
    }

    /// Mark the reserved block `(pfn, order)` allocated (restore of a
    /// preserved folio). Orders above the zone maximum are claimed as
    /// several maximal blocks. Every page must still be reserved.
    pub(crate) fn claim(&self, pfn: Pfn, order: Order) -> Result<()> {
        let end = pfn.0.saturating_add(order.pages());
        if !pfn.is_aligned(order) || pfn.0 < self.start || end > self.end {
            return Err(Error::Inconsistent {
                addr: pfn.addr().map_or(u64::MAX, |a| a.0),
                what: "claimed folio outside its zone",
                expected: self.end,
                found: end,
            });
        }
        let mut g = self.lock();
        let (lo, hi) = ((pfn.0 - self.start) as usize, (end - self.start) as usize);
        if let Some(p) = g.state[lo..hi].iter().position(|&s| s != RESERVED) {
            return Err(Error::Inconsistent {
                addr: (pfn.0 + p as u64) << kho_core::PAGE_SHIFT,
                what: "claimed page already in use",
                expected: u64::from(RESERVED),
                found: u64::from(g.state[lo + p]),
            });
        }
        let k = order.min(self.max_order).get();
        let mut i = lo;
        while i < hi {
            g.state[i] = ALLOC | k;
            g.state[i + 1..i + (1 << k)].fill(TAIL);
            g.stats.allocated_blocks[k as usize] += 1;
            i += 1 << k;
        }
        g.stats.allocated_pages += (hi - lo) as u64;
        g.stats.reserved_pages -= (hi - lo) as u64;
        Ok(())
    }

    /// Hand every reserved page to the free lists.
    pub(crate) fn release_reserved(&self) {
        let mut g = self.lock();
        let n = g.state.len();
        let mut i = 0;
        while i < n {
            if g.state[i] != RESERVED {
                i += 1;
                continue;
            }
            let run = g.state[i..]
                .iter()
                .position(|&s| s != RESERVED)
                .unwrap_or(n - i);
            let base = self.start + i as u64;
            for f in decompose(Pfn(base), Pfn(base + run as u64)) {
                let k = f.order.min(self.max_order);
                let mut p = f.pfn.0;
                while p < f.end_pfn().0 {
                    let idx = (p - self.start) as u32;
                    g.state[idx as usize + 1..idx as usize + (1 << k.get())].fill(TAIL);
                    g.stats.free_pages += k.pages();
                    g.stats.reserved_pages -= k.pages();
                    g.merge_free(self, idx, k.get());
                    p += k.pages();
                }
            }
            i += run;
        }
    }

    /// The counters.
    pub(crate) fn stats(&self) -> BuddyStats {
        self.lock().stats
    }

    /// Every block in address order as `(head, order, kind)`; a reserved
    /// page is a block of order 0 (tests).
    #[cfg(test)]
    pub(crate) fn blocks(&self) -> Vec<(Pfn, Order, BlockKind)> {
        let g = self.lock();
        let mut out = Vec::new();
        let mut i = 0;
        while i < g.state.len() {
            let st = g.state[i];
            let order = Order::new(st & ORDER).unwrap_or(Order::ZERO);
            let (kind, order) = match st & KIND {
                FREE | HOT => (BlockKind::Free, order),
                ALLOC => (BlockKind::Folio, order),
                SLAB => (BlockKind::Slab, order),
                RESERVED => (BlockKind::Reserved, Order::ZERO),
                _ => (BlockKind::Tail, Order::ZERO),
            };
            out.push((Pfn(self.start + i as u64), order, kind));
            i += order.pages() as usize;
        }
        out
    }

    /// Move every hot block to the free lists, merging.
    #[cfg(test)]
    pub(crate) fn drain(&self) {
        self.lock().drain_hot(self);
    }

    /// Check every invariant: pages tile into blocks, tails are tails,
    /// free-list membership matches state, no two free buddies in the free
    /// lists, counters agree.
    #[cfg(test)]
    pub(crate) fn check(&self) -> std::result::Result<(), String> {
        self.lock().check(self)
    }
}

/// What a block of [`Zone::blocks`] is.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    Free,
    Folio,
    Slab,
    Reserved,
    /// A tail page where a head was expected (a corrupt zone).
    Tail,
}

/// Whether a head state is an allocated block (folio or slab page).
#[inline]
fn is_allocated(s: u8) -> bool {
    matches!(s & KIND, ALLOC | SLAB)
}

impl Inner {
    /// The head index and state of the block holding page index `i`.
    /// Blocks are naturally aligned, so the head of the block of order `k`
    /// holding `i` is `i` rounded down to `2^k` (relative to the zone's
    /// absolute PFNs).
    fn head_of(&self, z: &Zone, i: usize) -> (usize, u8) {
        let pfn = z.start + i as u64;
        for k in 0..=z.max_order.get() {
            let head = pfn & !((1u64 << k) - 1);
            if head < z.start {
                break;
            }
            let h = (head - z.start) as usize;
            let s = self.state[h];
            if s != TAIL {
                return (h, s);
            }
        }
        (i, TAIL)
    }

    fn push(&mut self, k: u8, i: u32) {
        let h = self.heads[k as usize];
        self.next[i as usize] = h;
        self.prev[i as usize] = NIL;
        if h != NIL {
            self.prev[h as usize] = i;
        }
        self.heads[k as usize] = i;
    }

    fn unlink(&mut self, k: u8, i: u32) {
        let (n, p) = (self.next[i as usize], self.prev[i as usize]);
        if p == NIL {
            self.heads[k as usize] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        }
        self.next[i as usize] = NIL;
        self.prev[i as usize] = NIL;
    }

    fn alloc(&mut self, z: &Zone, order: Order) -> Option<u32> {
        let k = order.get();
        if k <= HOT_MAX_ORDER {
            if let Some(i) = self.hot[k as usize].pop() {
                self.state[i as usize] = ALLOC | k;
                self.account_alloc(k);
                return Some(i);
            }
        }
        let mut j = k;
        while self.heads[j as usize] == NIL {
            j += 1;
            if j > z.max_order.get() {
                return None;
            }
        }
        let i = self.heads[j as usize];
        self.unlink(j, i);
        self.stats.free_blocks[j as usize] -= 1;
        while j > k {
            j -= 1;
            let b = i + (1 << j);
            self.state[b as usize] = FREE | j;
            self.push(j, b);
            self.stats.free_blocks[j as usize] += 1;
        }
        self.state[i as usize] = ALLOC | k;
        self.stats.free_blocks[k as usize] += 1;
        self.account_alloc(k);
        Some(i)
    }

    fn account_alloc(&mut self, k: u8) {
        self.stats.free_blocks[k as usize] -= 1;
        self.stats.allocated_blocks[k as usize] += 1;
        self.stats.free_pages -= 1 << k;
        self.stats.allocated_pages += 1 << k;
    }

    /// Put the block `(i, k)` (not in any list, counted in `free_pages`
    /// but not in `free_blocks`) into the free lists, merging with free
    /// buddies.
    fn merge_free(&mut self, z: &Zone, mut i: u32, mut k: u8) {
        while k < z.max_order.get() {
            let pfn = z.start + u64::from(i);
            let buddy = pfn ^ (1u64 << k);
            if buddy < z.start || buddy + (1u64 << k) > z.end {
                break;
            }
            let b = (buddy - z.start) as u32;
            if self.state[b as usize] != FREE | k {
                break;
            }
            self.unlink(k, b);
            self.stats.free_blocks[k as usize] -= 1;
            let (lo, hi) = if b < i { (b, i) } else { (i, b) };
            self.state[hi as usize] = TAIL;
            i = lo;
            k += 1;
        }
        self.state[i as usize] = FREE | k;
        self.push(k, i);
        self.stats.free_blocks[k as usize] += 1;
    }

    fn drain_hot(&mut self, z: &Zone) {
        for k in 0..=HOT_MAX_ORDER {
            while let Some(i) = self.hot[k as usize].pop() {
                self.stats.free_blocks[k as usize] -= 1;
                self.merge_free(z, i, k);
            }
        }
    }

    #[cfg(test)]
    fn check(&self, z: &Zone) -> std::result::Result<(), String> {
        let n = self.state.len();
        let mut s = BuddyStats {
            total_pages: n as u64,
            ..BuddyStats::default()
        };
        let mut in_list = vec![false; n];
        for k in 0..NR_ORDERS {
            let mut i = self.heads[k];
            let mut prev = NIL;
            while i != NIL {
                if in_list[i as usize] {
                    return Err(format!("free list {k} loops at {i}"));
                }
                in_list[i as usize] = true;
                if self.prev[i as usize] != prev {
                    return Err(format!("bad prev link at {i}"));
                }
                if self.state[i as usize] != FREE | k as u8 {
                    return Err(format!(
                        "list {k} holds page {i} in state {:#x}",
                        self.state[i as usize]
                    ));
                }
                prev = i;
                i = self.next[i as usize];
            }
        }
        let mut hot = vec![false; n];
        for (k, stack) in self.hot.iter().enumerate() {
            for &i in stack {
                if self.state[i as usize] != HOT | k as u8 || hot[i as usize] {
                    return Err(format!(
                        "hot {k} holds page {i} in state {:#x}",
                        self.state[i as usize]
                    ));
                }
                hot[i as usize] = true;
            }
        }
        let mut i = 0usize;
        while i < n {
            let st = self.state[i];
            if st == RESERVED {
                s.reserved_pages += 1;
                i += 1;
                continue;
            }
            let kind = st & KIND;
            let k = (st & ORDER) as usize;
            if kind == TAIL || k > z.max_order.index() {
                return Err(format!("page {i} is {st:#x} outside any block"));
            }
            let pfn = z.start + i as u64;
            if pfn & ((1 << k) - 1) != 0 || i + (1 << k) > n {
                return Err(format!(
                    "block at {i} of order {k} misaligned or out of zone"
                ));
            }
            if let Some(t) = self.state[i + 1..i + (1 << k)]
                .iter()
                .position(|&t| t != TAIL)
            {
                return Err(format!(
                    "block at {i} order {k}: page {} not a tail",
                    i + 1 + t
                ));
            }
            match kind {
                FREE => {
                    if !in_list[i] {
                        return Err(format!("free block {i} not in its list"));
                    }
                    s.free_blocks[k] += 1;
                    s.free_pages += 1 << k;
                    if k < z.max_order.index() {
                        let buddy = pfn ^ (1 << k);
                        if buddy >= z.start && buddy + (1 << k) <= z.end {
                            let b = (buddy - z.start) as usize;
                            if self.state[b] == FREE | k as u8 {
                                return Err(format!(
                                    "free buddies {i} and {b} of order {k} not merged"
                                ));
                            }
                        }
                    }
                }
                HOT => {
                    if !hot[i] {
                        return Err(format!("hot block {i} not in its stack"));
                    }
                    s.free_blocks[k] += 1;
                    s.free_pages += 1 << k;
                }
                ALLOC | SLAB => {
                    s.allocated_blocks[k] += 1;
                    s.allocated_pages += 1 << k;
                    if kind == SLAB {
                        s.slab_pages += 1 << k;
                    }
                }
                _ => return Err(format!("page {i} has unknown state {st:#x}")),
            }
            i += 1 << k;
        }
        if s != self.stats {
            return Err(format!("counters {:?} but walk gives {s:?}", self.stats));
        }
        if s.free_pages + s.allocated_pages + s.reserved_pages != s.total_pages {
            return Err("pages not conserved".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zone(start: u64, pages: u64) -> Zone {
        Zone::new(
            "test",
            PfnRange {
                start: Pfn(start),
                end: Pfn(start + pages),
            },
            Order::new(10).unwrap(),
            true,
        )
        .unwrap()
    }

    #[test]
    fn split_and_merge_back() {
        let z = zone(1024, 2048);
        z.check().unwrap();
        assert_eq!(z.stats().free_blocks[10], 2);
        let a = z.alloc(Order::ZERO, false).unwrap();
        assert!(a == Pfn(1024) || a == Pfn(2048), "{a:?}");
        z.check().unwrap();
        assert_eq!(z.stats().free_blocks[..=10].iter().sum::<u64>(), 11);
        z.free(a, false).unwrap();
        z.drain();
        z.check().unwrap();
        assert_eq!(z.stats().free_blocks[10], 2);
        assert!(matches!(z.free(a, false), Err(Error::NotAllocated { .. })));
        assert!(matches!(
            z.free(Pfn(5), false),
            Err(Error::NotAllocated { .. })
        ));
        assert!(matches!(
            z.alloc(Order::new(11).unwrap(), false),
            Err(Error::InvalidOrder { order: 11, max: 10 })
        ));
    }

    #[test]
    fn unaligned_zone_and_exhaustion() {
        let z = zone(3, 100);
        z.check().unwrap();
        let mut got = Vec::new();
        while let Ok(p) = z.alloc(Order::ZERO, false) {
            got.push(p);
        }
        assert_eq!(got.len(), 100);
        assert!(matches!(
            z.alloc(Order::ZERO, false),
            Err(Error::OutOfMemory { order: 0, .. })
        ));
        for p in got {
            z.free(p, false).unwrap();
        }
        // Hot stacks are drained by an allocation that needs more.
        let big = z.alloc(Order::new(5).unwrap(), false).unwrap();
        assert!(big.is_aligned(Order::new(5).unwrap()));
        z.check().unwrap();
    }

    #[test]
    fn claim_then_release() {
        let z = Zone::new(
            "t",
            PfnRange {
                start: Pfn(0),
                end: Pfn(4096),
            },
            Order::new(10).unwrap(),
            false,
        )
        .unwrap();
        z.claim(Pfn(512), Order::new(9).unwrap()).unwrap();
        z.claim(Pfn(0), Order::new(12).unwrap()).unwrap_err();
        z.claim(Pfn(7), Order::ZERO).unwrap();
        assert!(z.claim(Pfn(7), Order::ZERO).is_err());
        assert!(z.claim(Pfn(4096), Order::ZERO).is_err());
        z.release_reserved();
        z.check().unwrap();
        let st = z.stats();
        assert_eq!(st.allocated_pages, 513);
        assert_eq!(st.free_pages, 4096 - 513);
        assert_eq!(z.allocated_order(Pfn(512)), Order::new(9));
        z.free(Pfn(512), false).unwrap();
        z.free(Pfn(7), false).unwrap();
        z.drain();
        z.check().unwrap();
        assert_eq!(z.stats().free_blocks[10], 4);
    }

    #[test]
    fn owned_folios_tell_folios_from_slabs_and_free_pages() {
        let z = zone(0, 64);
        let o2 = Order::new(2).unwrap();
        let a = z.alloc(o2, false).unwrap();
        let s = z.alloc_slab(Order::ZERO, false).unwrap();
        assert_eq!(z.stats().slab_pages, 1);
        // A range inside one folio reports the whole folio.
        let got = z.owned_folios(Pfn(a.0 + 1), Pfn(a.0 + 3)).unwrap();
        assert_eq!(got, vec![Folio { pfn: a, order: o2 }]);
        assert_eq!(z.owned_folios(s, Pfn(s.0 + 1)), Err((s, "a slab page")));
        let free = Pfn(63);
        assert_eq!(z.owned_folios(free, Pfn(64)), Err((free, "free")));
        // Both kinds are allocated blocks; both free the same way.
        assert_eq!(z.allocated_order(s), Some(Order::ZERO));
        z.check().unwrap();
        z.free(s, false).unwrap();
        assert_eq!(z.stats().slab_pages, 0);
        // A claimed folio becomes a slab page only with its own order.
        assert!(z.mark_slab(a, Order::ZERO).is_err());
        assert!(z.mark_slab(Pfn(a.0 + 1), o2).is_err());
        z.mark_slab(a, o2).unwrap();
        assert!(z.mark_slab(a, o2).is_err());
        assert_eq!(z.stats().slab_pages, 4);
        assert_eq!(z.owned_folios(a, Pfn(a.0 + 1)), Err((a, "a slab page")));
        z.check().unwrap();
        z.free(a, false).unwrap();
        z.check().unwrap();
        let r = Zone::new(
            "t",
            PfnRange {
                start: Pfn(0),
                end: Pfn(8),
            },
            Order::new(10).unwrap(),
            false,
        )
        .unwrap();
        assert_eq!(r.owned_folios(Pfn(3), Pfn(4)), Err((Pfn(3), "reserved")));
        assert_eq!(r.pages_in(Pfn(6), Pfn(100)), 2);
    }

    #[test]
    fn nowait_never_blocks() {
        let z = zone(0, 1024);
        let g = z.lock();
        assert!(matches!(
            z.alloc(Order::ZERO, true),
            Err(Error::WouldBlock { .. })
        ));
        drop(g);
        assert!(z.alloc(Order::ZERO, true).is_ok());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u8),
        Free(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                3 => (0u8..=10).prop_map(Op::Alloc),
                2 => any::<usize>().prop_map(Op::Free),
            ],
            1..if cfg!(miri) { 60 } else { 300 },
        )
    }

    proptest! {
        #![proptest_config(if cfg!(miri) {
        // Under Miri: few cases, and no failure file (no file system).
        ProptestConfig { failure_persistence: None, ..ProptestConfig::with_cases(2) }
    } else {
        ProptestConfig::with_cases(200)
    })]

        #[test]
        fn random_sequences_keep_invariants(start in 0u64..2048, pages in 1u64..if cfg!(miri) { 600 } else { 5000 }, ops in ops()) {
            let z = zone(start, pages);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(k) => {
                        let order = Order::new(k).unwrap();
                        match z.alloc(order, false) {
                            Ok(p) => {
                                prop_assert!(p.is_aligned(order));
                                let (s, e) = (p.0, p.0 + order.pages());
                                prop_assert!(s >= start && e <= start + pages);
                                prop_assert!(live.iter().all(|&(a, b)| e <= a || b <= s), "overlap");
                                live.push((s, e));
                            }
                            Err(Error::OutOfMemory { .. }) => {
                                // Then no free block of that order can exist after draining.
                                z.drain();
                                prop_assert_eq!(z.stats().free_blocks[k as usize..].iter().sum::<u64>(), 0);
                            }
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (s, e) = live.swap_remove(i % live.len());
                        let o = z.free(Pfn(s), false).unwrap();
                        prop_assert_eq!(o.pages(), e - s);
                    }
                    Op::Free(_) => {}
                }
                let st = z.stats();
                prop_assert_eq!(st.allocated_pages, live.iter().map(|&(s, e)| e - s).sum::<u64>());
                prop_assert_eq!(st.free_pages + st.allocated_pages, pages);
            }
            z.check().map_err(TestCaseError::fail)?;
            z.drain();
            z.check().map_err(TestCaseError::fail)?;
            for (s, _) in live.drain(..) {
                z.free(Pfn(s), false).unwrap();
            }
            z.drain();
            z.check().map_err(TestCaseError::fail)?;
            prop_assert_eq!(z.stats().free_pages, pages);
        }

        /// A restore: random claims of reserved blocks (some invalid, some
        /// above the zone's order), the rest released, then random
        /// alloc/free with and without NOWAIT, sometimes against a held zone
        /// lock. Claimed blocks behave as allocated ones throughout.
        #[test]
        fn claims_release_and_nowait_keep_invariants(
            start in 0u64..1024,
            pages in 1u64..if cfg!(miri) { 600 } else { 3000 },
            claims in prop::collection::vec((any::<u64>(), 0u8..=11), 0..if cfg!(miri) { 12 } else { 40 }),
            ops in ops(),
            nowait in prop::collection::vec(any::<bool>(), 300),
            held in prop::collection::vec(prop::bool::weighted(0.1), 300),
        ) {
            let end = start + pages;
            let z = Zone::new(
                "test",
                PfnRange { start: Pfn(start), end: Pfn(end) },
                Order::new(10).unwrap(),
                false,
            )
            .unwrap();
            prop_assert_eq!(z.stats().reserved_pages, pages);
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (x, k) in claims {
                let order = Order::new(k).unwrap();
                let pfn = (start + x % pages) & !(order.pages() - 1);
                let e = pfn + order.pages();
                let fits = pfn >= start && e <= end
                    && live.iter().all(|&(a, b)| e <= a || b <= pfn);
                let r = z.claim(Pfn(pfn), order);
                prop_assert_eq!(r.is_ok(), fits, "claim {:#x} order {}: {:?}", pfn, k, r);
                if fits {
                    // Above the zone's order: several maximal blocks.
                    let step = order.pages().min(1 << 10);
                    live.extend((pfn..e).step_by(step as usize).map(|b| (b, b + step)));
                }
                z.check().map_err(TestCaseError::fail)?;
            }
            let claimed: u64 = live.iter().map(|&(a, b)| b - a).sum();
            z.release_reserved();
            z.check().map_err(TestCaseError::fail)?;
            let st = z.stats();
            prop_assert_eq!(
                (st.reserved_pages, st.allocated_pages, st.free_pages),
                (0, claimed, pages - claimed)
            );
            for &(a, b) in &live {
                prop_assert_eq!(z.allocated_order(Pfn(a)).map(Order::pages), Some(b - a));
            }
            for (i, op) in ops.into_iter().enumerate() {
                let nw = nowait[i % nowait.len()];
                if held[i % held.len()] {
                    let g = z.lock();
                    prop_assert!(matches!(z.alloc(Order::ZERO, true), Err(Error::WouldBlock { .. })), "alloc waited");
                    if let Some(&(a, _)) = live.first() {
                        prop_assert!(matches!(z.free(Pfn(a), true), Err(Error::WouldBlock { .. })), "free waited");
                    }
                    drop(g);
                }
                match op {
                    Op::Alloc(k) => {
                        let order = Order::new(k).unwrap();
                        match z.alloc(order, nw) {
                            Ok(p) => {
                                let (s, e) = (p.0, p.0 + order.pages());
                                prop_assert!(p.is_aligned(order) && s >= start && e <= end);
                                prop_assert!(live.iter().all(|&(a, b)| e <= a || b <= s), "overlap");
                                live.push((s, e));
                            }
                            Err(Error::OutOfMemory { .. }) => {}
                            Err(e) => prop_assert!(false, "{e}"),
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (s, e) = live.swap_remove(i % live.len());
                        prop_assert_eq!(z.free(Pfn(s), nw).unwrap().pages(), e - s);
                    }
                    Op::Free(_) => {}
                }
                let st = z.stats();
                prop_assert_eq!(st.allocated_pages, live.iter().map(|&(s, e)| e - s).sum::<u64>());
                prop_assert_eq!(st.free_pages + st.allocated_pages, pages);
            }
            z.check().map_err(TestCaseError::fail)?;
            for (s, _) in live.drain(..) {
                z.free(Pfn(s), false).unwrap();
            }
            z.drain();
            z.check().map_err(TestCaseError::fail)?;
            prop_assert_eq!(z.stats().free_pages, pages);
        }
    }
}
