//! The preserved-memory map: which folios survive a handover.
//!
//! Per order, the map is a sparse set of bitmap blocks. One block covers
//! [`BLOCK_BITS`] consecutive folios of one order; bit `i` of the block whose
//! base is `b` says "the folio of this order headed at `b + (i << order)` is
//! preserved". Blocks are kept sorted by `(order, base)`, the order in which
//! they are written to the `MEMMAP` section of a handover image, so a reader
//! can binary-search them in place.
//!
//! Preserving is refused when the folio is misaligned, out of the arena, or
//! overlaps any folio already preserved under any order. Bulk operations
//! validate the whole request before changing anything, so a refused request
//! leaves the map exactly as it was.

use std::collections::BTreeMap;

use bitvec::prelude::*;

use crate::addr::{Order, Pfn, PhysAddr, NR_ORDERS, PAGE_SIZE};

/// Folios per bitmap block.
pub const BLOCK_BITS: u64 = 4096;
/// 64-bit words per bitmap block.
pub const BLOCK_WORDS: usize = (BLOCK_BITS / 64) as usize;

/// The bits of one block, bit `i` in word `i / 64` at position `i % 64`.
pub type BlockWords = [u64; BLOCK_WORDS];

type Bits = BitArray<BlockWords, Lsb0>;

/// Errors from changing a [`PreservedMap`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MapError {
    /// The PFN is not a multiple of the folio size of its order.
    #[error("pfn {pfn:#x} is not aligned to order {order} (expected a multiple of {:#x} pages)", 1u64 << *order)]
    Misaligned {
        /// The head PFN given.
        pfn: u64,
        /// The order given.
        order: u8,
    },
    /// The folio extends past the end of the arena.
    #[error("folio at pfn {pfn:#x} of order {order} ends past the arena limit pfn {limit:#x}")]
    OutOfRange {
        /// The head PFN given.
        pfn: u64,
        /// The order given.
        order: u8,
        /// First PFN past the arena.
        limit: u64,
    },
    /// The folio overlaps one that is already preserved.
    #[error("folio at pfn {pfn:#x} of order {order} overlaps preserved folio at pfn {existing_pfn:#x} of order {existing_order}")]
    Overlap {
        /// The head PFN given.
        pfn: u64,
        /// The order given.
        order: u8,
        /// Head of the preserved folio in the way.
        existing_pfn: u64,
        /// Order of the preserved folio in the way.
        existing_order: u8,
    },
    /// Unpreserve of a folio that was not preserved with exactly this order.
    #[error("folio at pfn {pfn:#x} of order {order} is not preserved")]
    NotPreserved {
        /// The head PFN given.
        pfn: u64,
        /// The order given.
        order: u8,
    },
    /// A byte range that does not start and end on page boundaries.
    #[error("range {start:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// Start of the range.
        start: u64,
        /// Length of the range in bytes.
        len: u64,
    },
}

/// Result alias for map operations.
pub type MapResult<T> = Result<T, MapError>;

/// A preserved folio: its head PFN and order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Folio {
    /// First page of the folio.
    pub pfn: Pfn,
    /// Size class of the folio.
    pub order: Order,
}

impl Folio {
    /// First byte of the folio.
    pub fn addr(self) -> PhysAddr {
        PhysAddr(self.pfn.0 << crate::PAGE_SHIFT)
    }
    /// Bytes covered.
    pub fn bytes(self) -> u64 {
        self.order.bytes()
    }
    /// One past the last page.
    pub fn end_pfn(self) -> Pfn {
        Pfn(self.pfn.0 + self.order.pages())
    }
}

/// A coalesced run of preserved pages `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PfnRange {
    /// First page.
    pub start: Pfn,
    /// One past the last page.
    pub end: Pfn,
}

impl PfnRange {
    /// Pages in the range.
    pub fn pages(self) -> u64 {
        self.end.0 - self.start.0
    }
    /// Bytes in the range.
    pub fn bytes(self) -> u64 {
        self.pages() * PAGE_SIZE
    }
}

/// One bitmap block as the walkers see it, whether it lives in a
/// [`PreservedMap`] or in the mapped bytes of an image.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BlockBits {
    /// Order of every folio in the block.
    pub order: Order,
    /// Head PFN of the folio that bit 0 describes.
    pub base: Pfn,
    /// The bits.
    pub words: BlockWords,
}

impl core::fmt::Debug for BlockBits {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let ones: u32 = self.words.iter().map(|w| w.count_ones()).sum();
        f.debug_struct("BlockBits")
            .field("order", &self.order)
            .field("base", &self.base)
            .field("ones", &ones)
            .finish()
    }
}

/// Pages spanned by one block of `order`.
#[inline]
pub const fn block_span_pages(order: Order) -> u64 {
    BLOCK_BITS << order.get()
}

#[derive(Clone, Default)]
struct OrderMap {
    /// Block index (`(pfn >> order) / BLOCK_BITS`) to bits.
    blocks: BTreeMap<u64, Box<Bits>>,
    folios: u64,
}

impl OrderMap {
    /// Whether any bit in folio-index range `[lo, hi]` (inclusive) is set;
    /// returns the first such folio index.
    fn first_in(&self, lo: u64, hi: u64) -> Option<u64> {
        let (blo, bhi) = (lo / BLOCK_BITS, hi / BLOCK_BITS);
        for (&bi, bits) in self.blocks.range(blo..=bhi) {
            let start = if bi == blo {
                (lo % BLOCK_BITS) as usize
            } else {
                0
            };
            let end = if bi == bhi {
                (hi % BLOCK_BITS) as usize + 1
            } else {
                BLOCK_BITS as usize
            };
            if let Some(i) = bits[start..end].first_one() {
                return Some(bi * BLOCK_BITS + (start + i) as u64);
            }
        }
        None
    }

    fn test(&self, idx: u64) -> bool {
        self.blocks
            .get(&(idx / BLOCK_BITS))
            .is_some_and(|b| b[(idx % BLOCK_BITS) as usize])
    }

    /// Set bits `[lo, hi)`; all must be clear.
    fn fill(&mut self, lo: u64, hi: u64) {
        let mut i = lo;
        while i < hi {
            let bi = i / BLOCK_BITS;
            let start = (i % BLOCK_BITS) as usize;
            let end = ((hi - bi * BLOCK_BITS).min(BLOCK_BITS)) as usize;
            let bits = self
                .blocks
                .entry(bi)
                .or_insert_with(|| Box::new(Bits::ZERO));
            bits[start..end].fill(true);
            i = bi * BLOCK_BITS + end as u64;
        }
        self.folios += hi - lo;
    }

    fn clear(&mut self, idx: u64) {
        let bi = idx / BLOCK_BITS;
        if let Some(bits) = self.blocks.get_mut(&bi) {
            bits.set((idx % BLOCK_BITS) as usize, false);
            if bits.not_any() {
                self.blocks.remove(&bi);
            }
            self.folios -= 1;
        }
    }
}

/// The live tracker of preserved folios.
///
/// ```
/// use kho_core::{Order, PreservedMap, Pfn, PhysAddr};
///
/// let mut map = PreservedMap::new(Pfn(1 << 20)); // a 4 GiB arena
/// map.preserve(Pfn(512), Order::new(9).unwrap())?;
/// // A 4 KiB page inside that 2 MiB folio cannot be preserved again.
/// assert!(map.preserve(Pfn(700), Order::ZERO).is_err());
/// assert_eq!(map.is_preserved(Pfn(700)), Some((Pfn(512), Order::new(9).unwrap())));
/// // Bulk: split a byte range into maximal aligned folios.
/// map.preserve_range(PhysAddr(0x1000), 0x3000)?;
/// assert_eq!(map.folio_count(), 3);
/// # Ok::<(), kho_core::MapError>(())
/// ```
#[derive(Clone)]
pub struct PreservedMap {
    limit: Pfn,
    orders: [OrderMap; NR_ORDERS],
}

impl core::fmt::Debug for PreservedMap {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PreservedMap")
            .field("limit", &self.limit)
            .field("folios", &self.folio_count())
            .field("bytes", &self.total_bytes())
            .finish()
    }
}

impl PartialEq for PreservedMap {
    fn eq(&self, other: &Self) -> bool {
        self.limit == other.limit && self.blocks().eq(other.blocks())
    }
}
impl Eq for PreservedMap {}

impl PreservedMap {
    /// An empty map for an arena of `limit` pages (PFNs `0..limit`).
    pub fn new(limit: Pfn) -> Self {
        PreservedMap {
            limit,
            orders: Default::default(),
        }
    }

    /// First PFN past the arena.
    pub fn limit(&self) -> Pfn {
        self.limit
    }

    fn check_folio(&self, pfn: Pfn, order: Order) -> MapResult<Pfn> {
        if !pfn.is_aligned(order) {
            return Err(MapError::Misaligned {
                pfn: pfn.0,
                order: order.get(),
            });
        }
        match pfn.folio_end(order) {
            Some(end) if end <= self.limit => Ok(end),
            _ => Err(MapError::OutOfRange {
                pfn: pfn.0,
                order: order.get(),
                limit: self.limit.0,
            }),
        }
    }

    /// The first preserved folio intersecting pages `[start, end)`.
    pub fn first_overlap(&self, start: Pfn, end: Pfn) -> Option<Folio> {
        if start >= end {
            return None;
        }
        let mut best: Option<Folio> = None;
        for order in Order::all() {
            let om = &self.orders[order.index()];
            if om.folios == 0 {
                continue;
            }
            let lo = start.0 >> order.get();
            let hi = (end.0 - 1) >> order.get();
            if let Some(idx) = om.first_in(lo, hi) {
                let f = Folio {
                    pfn: Pfn(idx << order.get()),
                    order,
                };
                if best.is_none_or(|b| f.pfn < b.pfn) {
                    best = Some(f);
                }
            }
        }
        best
    }

    fn refuse_overlap(&self, pfn: Pfn, order: Order, end: Pfn) -> MapResult<()> {
        match self.first_overlap(pfn, end) {
            Some(f) => Err(MapError::Overlap {
                pfn: pfn.0,
                order: order.get(),
                existing_pfn: f.pfn.0,
                existing_order: f.order.get(),
            }),
            None => Ok(()),
        }
    }

    /// Preserve the folio of `order` headed at `pfn`.
    pub fn preserve(&mut self, pfn: Pfn, order: Order) -> MapResult<()> {
        let end = self.check_folio(pfn, order)?;
        self.refuse_overlap(pfn, order, end)?;
        let idx = pfn.0 >> order.get();
        self.orders[order.index()].fill(idx, idx + 1);
        Ok(())
    }

    /// Preserve `count` consecutive folios of `order`, the first headed at
    /// `pfn`. All or nothing.
    pub fn preserve_folios(&mut self, pfn: Pfn, order: Order, count: u64) -> MapResult<()> {
        if count == 0 {
            return Ok(());
        }
        self.check_folio(pfn, order)?;
        let end = count
            .checked_mul(order.pages())
            .and_then(|p| pfn.checked_add(p))
            .filter(|e| *e <= self.limit)
            .ok_or(MapError::OutOfRange {
                pfn: pfn.0,
                order: order.get(),
                limit: self.limit.0,
            })?;
        self.refuse_overlap(pfn, order, end)?;
        let idx = pfn.0 >> order.get();
        self.orders[order.index()].fill(idx, idx + count);
        Ok(())
    }

    /// Preserve the page-aligned byte range `[start, start + len)`, split into
    /// maximal naturally aligned folios. All or nothing.
    pub fn preserve_range(&mut self, start: PhysAddr, len: u64) -> MapResult<()> {
        let (first, end) = self.range_pfns(start, len)?;
        if first == end {
            return Ok(());
        }
        self.refuse_overlap(first, Order::ZERO, end)?;
        for f in decompose(first, end) {
            let idx = f.pfn.0 >> f.order.get();
            self.orders[f.order.index()].fill(idx, idx + 1);
        }
        Ok(())
    }

    fn range_pfns(&self, start: PhysAddr, len: u64) -> MapResult<(Pfn, Pfn)> {
        let unaligned = MapError::Unaligned {
            start: start.0,
            len,
        };
        if !start.is_page_aligned() || len % PAGE_SIZE != 0 {
            return Err(unaligned);
        }
        let first = start.pfn();
        let end = first
            .checked_add(len / PAGE_SIZE)
            .filter(|e| *e <= self.limit)
            .ok_or(MapError::OutOfRange {
                pfn: first.0,
                order: 0,
                limit: self.limit.0,
            })?;
        Ok((first, end))
    }

    /// Undo a [`preserve`](Self::preserve). The folio must have been preserved
    /// with exactly this head and order.
    pub fn unpreserve(&mut self, pfn: Pfn, order: Order) -> MapResult<()> {
        self.check_folio(pfn, order)?;
        let om = &mut self.orders[order.index()];
        let idx = pfn.0 >> order.get();
        if !om.test(idx) {
            return Err(MapError::NotPreserved {
                pfn: pfn.0,
                order: order.get(),
            });
        }
        om.clear(idx);
        Ok(())
    }

    /// Undo a [`preserve_range`](Self::preserve_range) of the same range.
    /// All or nothing: every folio of the decomposition must be preserved.
    pub fn unpreserve_range(&mut self, start: PhysAddr, len: u64) -> MapResult<()> {
        let (first, end) = self.range_pfns(start, len)?;
        for f in decompose(first, end) {
            if !self.orders[f.order.index()].test(f.pfn.0 >> f.order.get()) {
                return Err(MapError::NotPreserved {
                    pfn: f.pfn.0,
                    order: f.order.get(),
                });
            }
        }
        for f in decompose(first, end) {
            self.orders[f.order.index()].clear(f.pfn.0 >> f.order.get());
        }
        Ok(())
    }

    /// The preserved folio containing `pfn`, as `(head, order)`.
    pub fn is_preserved(&self, pfn: Pfn) -> Option<(Pfn, Order)> {
        for order in Order::all() {
            let om = &self.orders[order.index()];
            if om.folios != 0 && om.test(pfn.0 >> order.get()) {
                return Some((pfn.align_down(order), order));
            }
        }
        None
    }

    /// Whether nothing is preserved.
    pub fn is_empty(&self) -> bool {
        self.folio_count() == 0
    }

    /// Number of preserved folios of every order.
    pub fn folio_count(&self) -> u64 {
        self.orders.iter().map(|o| o.folios).sum()
    }

    /// Number of preserved folios of `order`.
    pub fn folios_of(&self, order: Order) -> u64 {
        self.orders[order.index()].folios
    }

    /// Preserved bytes of `order`.
    pub fn bytes_of(&self, order: Order) -> u64 {
        self.folios_of(order) * order.bytes()
    }

    /// Preserved bytes in total.
    pub fn total_bytes(&self) -> u64 {
        Order::all().map(|o| self.bytes_of(o)).sum()
    }

    /// Number of bitmap blocks, the unit of the `MEMMAP` section.
    pub fn block_count(&self) -> usize {
        self.orders.iter().map(|o| o.blocks.len()).sum()
    }

    /// Every bitmap block, sorted by `(order, base)`: the on-image order.
    pub fn blocks(&self) -> impl Iterator<Item = BlockBits> + '_ {
        Order::all().flat_map(move |o| self.blocks_of(o))
    }

    /// The bitmap blocks of one order, by base.
    pub fn blocks_of(&self, order: Order) -> impl Iterator<Item = BlockBits> + '_ {
        self.orders[order.index()]
            .blocks
            .iter()
            .map(move |(&bi, bits)| BlockBits {
                order,
                base: Pfn((bi * BLOCK_BITS) << order.get()),
                words: bits.into_inner(),
            })
    }

    /// Every preserved folio in address order.
    pub fn folios(&self) -> Folios<impl Iterator<Item = BlockBits> + '_> {
        Folios::new(Order::all().map(|o| self.blocks_of(o)))
    }

    /// Preserved memory as maximal runs of pages, in address order.
    pub fn ranges(&self) -> Ranges<Folios<impl Iterator<Item = BlockBits> + '_>> {
        Ranges::new(self.folios())
    }

    /// Rebuild a map from blocks such as those of a parsed image. Blocks
    /// must describe non-overlapping, in-range folios.
    pub fn from_blocks(limit: Pfn, blocks: impl IntoIterator<Item = BlockBits>) -> MapResult<Self> {
        let mut map = PreservedMap::new(limit);
        for b in blocks {
            for f in BlockFolios::new(b) {
                map.preserve(f.pfn, f.order)?;
            }
        }
        Ok(map)
    }
}

/// Split pages `[start, end)` into maximal naturally aligned folios, lowest
/// address first.
pub fn decompose(start: Pfn, end: Pfn) -> impl Iterator<Item = Folio> {
    let mut cur = start.0;
    core::iter::from_fn(move || {
        if cur >= end.0 {
            return None;
        }
        let align = if cur == 0 { 64 } else { cur.trailing_zeros() };
        let fit = 63 - (end.0 - cur).leading_zeros();
        let order = Order::new(align.min(fit).min(u32::from(crate::MAX_MAP_ORDER)) as u8)?;
        let f = Folio {
            pfn: Pfn(cur),
            order,
        };
        cur += order.pages();
        Some(f)
    })
}

/// The folios of one block, lowest first.
#[derive(Debug, Clone)]
pub struct BlockFolios {
    block: BlockBits,
    word: usize,
    bits: u64,
}

impl BlockFolios {
    /// Walk the set bits of `block`.
    pub fn new(block: BlockBits) -> Self {
        BlockFolios {
            bits: block.words[0],
            block,
            word: 0,
        }
    }
}

impl Iterator for BlockFolios {
    type Item = Folio;

    #[inline]
    fn next(&mut self) -> Option<Folio> {
        while self.bits == 0 {
            self.word += 1;
            if self.word >= BLOCK_WORDS {
                return None;
            }
            self.bits = self.block.words[self.word];
        }
        let bit = self.bits.trailing_zeros() as u64;
        self.bits &= self.bits - 1;
        let idx = self.word as u64 * 64 + bit;
        Some(Folio {
            pfn: Pfn(self.block.base.0 + (idx << self.block.order.get())),
            order: self.block.order,
        })
    }
}

/// One order's blocks flattened into folios.
struct OrderCursor<I> {
    blocks: I,
    cur: Option<BlockFolios>,
    head: Option<Folio>,
}

impl<I: Iterator<Item = BlockBits>> OrderCursor<I> {
    fn advance(&mut self) {
        loop {
            if let Some(f) = self.cur.as_mut().and_then(Iterator::next) {
                self.head = Some(f);
                return;
            }
            match self.blocks.next() {
                Some(b) => self.cur = Some(BlockFolios::new(b)),
                None => {
                    self.head = None;
                    return;
                }
            }
        }
    }
}

/// Folios of several orders merged into address order.
///
/// Each input yields one order's blocks sorted by base. With one non-empty
/// order the merge costs a branch per folio.
pub struct Folios<I> {
    cursors: Vec<OrderCursor<I>>,
}

impl<I> core::fmt::Debug for Folios<I> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Folios")
            .field("orders", &self.cursors.len())
            .finish()
    }
}

impl<I: Iterator<Item = BlockBits>> Folios<I> {
    /// Merge per-order block sequences (each sorted by base).
    pub fn new(per_order: impl IntoIterator<Item = I>) -> Self {
        let mut cursors: Vec<OrderCursor<I>> = per_order
            .into_iter()
            .map(|blocks| OrderCursor {
                blocks,
                cur: None,
                head: None,
            })
            .collect();
        for c in &mut cursors {
            c.advance();
        }
        cursors.retain(|c| c.head.is_some());
        Folios { cursors }
    }
}

impl<I: Iterator<Item = BlockBits>> Iterator for Folios<I> {
    type Item = Folio;

    #[inline]
    fn next(&mut self) -> Option<Folio> {
        let pick = match self.cursors.len() {
            0 => return None,
            1 => 0,
            _ => {
                let mut best = 0;
                let mut best_pfn = u64::MAX;
                for (i, c) in self.cursors.iter().enumerate() {
                    if let Some(h) = c.head {
                        if h.pfn.0 < best_pfn {
                            best_pfn = h.pfn.0;
                            best = i;
                        }
                    }
                }
                best
            }
        };
        let c = &mut self.cursors[pick];
        let out = c.head;
        c.advance();
        if c.head.is_none() {
            self.cursors.swap_remove(pick);
        }
        out
    }
}

/// Adjacent folios coalesced into runs of pages.
#[derive(Debug)]
pub struct Ranges<F> {
    folios: F,
    pending: Option<PfnRange>,
}

impl<F: Iterator<Item = Folio>> Ranges<F> {
    /// Coalesce folios that arrive in address order.
    pub fn new(folios: F) -> Self {
        Ranges {
            folios,
            pending: None,
        }
    }
}

impl<F: Iterator<Item = Folio>> Iterator for Ranges<F> {
    type Item = PfnRange;

    fn next(&mut self) -> Option<PfnRange> {
        for f in self.folios.by_ref() {
            let (start, end) = (f.pfn, f.end_pfn());
            match &mut self.pending {
                Some(r) if r.end == start => r.end = end,
                Some(r) => {
                    let done = *r;
                    *r = PfnRange { start, end };
                    return Some(done);
                }
                None => self.pending = Some(PfnRange { start, end }),
            }
        }
        self.pending.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn o(n: u8) -> Order {
        Order::new(n).unwrap()
    }

    #[test]
    fn refuses_misaligned_out_of_range_and_overlap() {
        let mut m = PreservedMap::new(Pfn(1 << 20));
        assert_eq!(
            m.preserve(Pfn(3), o(1)),
            Err(MapError::Misaligned { pfn: 3, order: 1 })
        );
        assert_eq!(m.preserve(Pfn((1 << 20) - 1), o(0)).map(|_| ()), Ok(()));
        assert!(matches!(
            m.preserve(Pfn(1 << 20), o(0)),
            Err(MapError::OutOfRange { .. })
        ));
        assert!(matches!(
            m.preserve(Pfn(!1), o(1)),
            Err(MapError::OutOfRange { .. })
        ));
        m.preserve(Pfn(1024), o(9)).unwrap();
        // Same folio twice.
        assert!(matches!(
            m.preserve(Pfn(1024), o(9)),
            Err(MapError::Overlap { .. })
        ));
        // A smaller folio inside.
        assert_eq!(
            m.preserve(Pfn(1030), o(1)),
            Err(MapError::Overlap {
                pfn: 1030,
                order: 1,
                existing_pfn: 1024,
                existing_order: 9
            })
        );
        // A larger folio around it.
        assert!(matches!(
            m.preserve(Pfn(0), o(18)),
            Err(MapError::Overlap { .. })
        ));
        // Neighbours are fine.
        m.preserve(Pfn(1023), o(0)).unwrap();
        m.preserve(Pfn(1536), o(0)).unwrap();
        assert_eq!(m.folio_count(), 4);
    }

    #[test]
    fn unpreserve_must_match() {
        let mut m = PreservedMap::new(Pfn(1 << 20));
        m.preserve(Pfn(512), o(9)).unwrap();
        assert_eq!(
            m.unpreserve(Pfn(512), o(8)),
            Err(MapError::NotPreserved { pfn: 512, order: 8 })
        );
        assert_eq!(
            m.unpreserve(Pfn(768), o(8)),
            Err(MapError::NotPreserved { pfn: 768, order: 8 })
        );
        m.unpreserve(Pfn(512), o(9)).unwrap();
        assert!(m.is_empty());
        assert_eq!(m.block_count(), 0);
        assert!(m.unpreserve(Pfn(512), o(9)).is_err());
    }

    #[test]
    fn range_is_all_or_nothing() {
        let mut m = PreservedMap::new(Pfn(1 << 20));
        m.preserve(Pfn(100), o(0)).unwrap();
        let before = m.clone();
        assert!(matches!(
            m.preserve_range(PhysAddr(0), 0x100000),
            Err(MapError::Overlap {
                existing_pfn: 100,
                ..
            })
        ));
        assert_eq!(m, before);
        assert!(matches!(
            m.preserve_range(PhysAddr(0x800), 0x1000),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            m.preserve_range(PhysAddr(0), 0x1800),
            Err(MapError::Unaligned { .. })
        ));
        assert!(matches!(
            m.preserve_folios(Pfn(0), o(0), 101),
            Err(MapError::Overlap { .. })
        ));
        assert_eq!(m, before);
        assert!(matches!(
            m.unpreserve_range(PhysAddr(100 << 12), 0x2000),
            Err(MapError::NotPreserved { pfn: 100, order: 1 })
        ));
        assert_eq!(m, before);
    }

    #[test]
    fn decompose_is_maximal() {
        let got: Vec<_> = decompose(Pfn(1), Pfn(1 + 1 + 2 + 4 + 8))
            .map(|f| (f.pfn.0, f.order.get()))
            .collect();
        assert_eq!(got, vec![(1, 0), (2, 1), (4, 2), (8, 3)]);
        // Huge aligned range uses the largest order.
        let big: Vec<_> = decompose(Pfn(0), Pfn(3 << 18)).collect();
        assert_eq!(big.len(), 3);
        assert!(big.iter().all(|f| f.order == Order::MAX));
    }

    #[test]
    fn ranges_coalesce_across_orders() {
        let mut m = PreservedMap::new(Pfn(1 << 20));
        m.preserve_range(PhysAddr(0x1000), 0x7000).unwrap();
        m.preserve(Pfn(8), o(3)).unwrap();
        m.preserve(Pfn(100), o(0)).unwrap();
        let r: Vec<_> = m.ranges().map(|r| (r.start.0, r.end.0)).collect();
        assert_eq!(r, vec![(1, 16), (100, 101)]);
    }

    fn arb_folios() -> impl Strategy<Value = Vec<(u64, u8)>> {
        prop::collection::vec(
            (
                0u64..(1 << 16),
                prop_oneof![Just(0u8), Just(1), Just(3), Just(9), 0u8..=12],
            ),
            0..200,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn folios_match_a_model(req in arb_folios(), probes in prop::collection::vec(0u64..(1 << 16) + 64, 64)) {
            let limit = Pfn(1 << 16);
            let mut m = PreservedMap::new(limit);
            let mut model: Vec<(u64, u64, u8)> = Vec::new(); // start, end, order
            for (p, ord) in req {
                let order = o(ord);
                let pfn = Pfn(p).align_down(order);
                let end = pfn.0 + order.pages();
                let overlaps = model.iter().any(|&(s, e, _)| s < end && pfn.0 < e);
                let res = m.preserve(pfn, order);
                if end > limit.0 {
                    prop_assert!(matches!(res, Err(MapError::OutOfRange { .. })), "{:?}", res);
                } else if overlaps {
                    prop_assert!(matches!(res, Err(MapError::Overlap { .. })), "{:?}", res);
                } else {
                    prop_assert_eq!(res, Ok(()));
                    model.push((pfn.0, end, ord));
                }
            }
            model.sort();
            let got: Vec<_> = m.folios().map(|f| (f.pfn.0, f.end_pfn().0, f.order.get())).collect();
            prop_assert_eq!(&got, &model);
            for probe in probes {
                let want = model.iter().find(|&&(s, e, _)| s <= probe && probe < e).map(|&(s, _, ord)| (Pfn(s), o(ord)));
                prop_assert_eq!(m.is_preserved(Pfn(probe)), want);
            }
            let rebuilt = PreservedMap::from_blocks(limit, m.blocks()).unwrap();
            prop_assert_eq!(&rebuilt, &m);
            let pages: u64 = m.ranges().map(|r| r.pages()).sum();
            prop_assert_eq!(pages * PAGE_SIZE, m.total_bytes());
        }
    }
}
