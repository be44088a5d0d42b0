//! Walking the MEMMAP blocks of a parsed image in place: folios in address
//! order, and runs of set bits for validation.
//!
//! These read the little-endian words straight from the image bytes instead
//! of copying each 512-byte block into a [`BlockBits`](crate::BlockBits)
//! first, and merge orders in batches: while one order's next folio lies
//! below every other order's, it is yielded without comparing again.

use core::fmt;

use super::layout::RawBlock;
use crate::addr::{Order, Pfn, NR_ORDERS};
use crate::memmap::{Folio, PfnRange, BLOCK_WORDS};

/// A folio and where its bit lives: global block index and bit index.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Located {
    pub folio: Folio,
    pub block: usize,
    pub bit: u64,
}

/// Bit `i` set when word `i` of `b` is non-zero. Branch-free, so sparse
/// blocks (a few scattered bits) cost no mispredicted branch per word; built
/// a byte at a time, which compiles to straight-line compares (a third
/// faster here than one 64-step loop, which vectorizes into lane shifts).
#[inline(always)]
fn nonzero_words(b: &RawBlock) -> u64 {
    let mut mask = 0u64;
    for (c, eight) in b.bits.chunks_exact(8).enumerate() {
        let mut m = 0u8;
        for (i, w) in eight.iter().enumerate() {
            m |= u8::from(w.get() != 0) << i;
        }
        mask |= u64::from(m) << (c * 8);
    }
    mask
}

/// The non-zero words of a run of blocks, in order: the word cursor under
/// both the folio walk and the run walk.
#[derive(Clone)]
struct Words<'a> {
    blocks: &'a [RawBlock],
    /// Block and word of the word loaded last.
    bi: usize,
    wi: usize,
    /// Non-zero words of block `bi` after `wi` not yet loaded, so sparse
    /// blocks are not scanned a word (and a branch) at a time.
    wmask: u64,
}

impl<'a> Words<'a> {
    fn new(blocks: &'a [RawBlock]) -> Self {
        Words {
            blocks,
            bi: 0,
            wi: 0,
            wmask: blocks.first().map_or(0, nonzero_words),
        }
    }

    /// The next non-zero word and its block, moving on to later blocks as
    /// needed; `bi` and `wi` then name it.
    #[inline(always)]
    fn next(&mut self) -> Option<(&'a RawBlock, u64)> {
        while self.wmask == 0 {
            self.bi += 1;
            self.wmask = nonzero_words(self.blocks.get(self.bi)?);
        }
        let b = self.blocks.get(self.bi)?;
        self.wi = self.wmask.trailing_zeros() as usize;
        self.wmask &= self.wmask - 1;
        Some((b, b.bits[self.wi].get()))
    }
}

/// One order's folios, lowest first.
#[derive(Clone)]
struct OrderFolios<'a> {
    words: Words<'a>,
    first_block: usize,
    order: Order,
    /// Bits of the word `words` loaded last not yet yielded.
    word: u64,
    /// PFN described by bit 0 of `word`.
    wbase: u64,
}

impl<'a> OrderFolios<'a> {
    fn new(blocks: &'a [RawBlock], first_block: usize, order: Order) -> Self {
        OrderFolios {
            words: Words::new(blocks),
            first_block,
            order,
            word: 0,
            wbase: 0,
        }
    }

    #[inline(always)]
    fn next(&mut self) -> Option<Located> {
        while self.word == 0 {
            let (b, w) = self.words.next()?;
            self.word = w;
            self.wbase = b.base_pfn() + ((self.words.wi as u64 * 64) << self.order.get());
        }
        let bit = u64::from(self.word.trailing_zeros());
        self.word &= self.word - 1;
        Some(Located {
            folio: Folio {
                pfn: Pfn(self.wbase + (bit << self.order.get())),
                order: self.order,
            },
            block: self.first_block + self.words.bi,
            bit: self.words.wi as u64 * 64 + bit,
        })
    }

    /// Feed `f` every folio up to and including PFN `limit`, and return the
    /// first folio above it (taken from the cursor) if there is one. The
    /// cursor's state lives in locals for the whole run, so the loop keeps
    /// it in registers; it steps the words as [`Words::next`] does, written
    /// out so each block's base is read once.
    #[inline(always)]
    fn run<B>(
        &mut self,
        limit: u64,
        mut acc: B,
        f: &mut impl FnMut(B, Located) -> B,
    ) -> (B, Option<Located>) {
        let (blocks, first_block, order) = (self.words.blocks, self.first_block, self.order);
        let shift = order.get();
        let Words {
            mut bi,
            mut wi,
            mut wmask,
            ..
        } = self.words;
        let (mut word, mut wbase) = (self.word, self.wbase);
        let over = 'run: loop {
            let Some(b) = blocks.get(bi) else {
                break None;
            };
            let base = b.base_pfn();
            loop {
                if word != 0 {
                    let at = |word: u64| {
                        let bit = u64::from(word.trailing_zeros());
                        Located {
                            folio: Folio {
                                pfn: Pfn(wbase + (bit << shift)),
                                order,
                            },
                            block: first_block + bi,
                            bit: wi as u64 * 64 + bit,
                        }
                    };
                    if wbase.saturating_add(63 << shift) <= limit {
                        // Every folio of the word is below the limit.
                        loop {
                            acc = f(acc, at(word));
                            word &= word - 1;
                            if word == 0 {
                                break;
                            }
                        }
                    } else {
                        while word != 0 {
                            let l = at(word);
                            word &= word - 1;
                            if l.folio.pfn.0 > limit {
                                break 'run Some(l);
                            }
                            acc = f(acc, l);
                        }
                    }
                }
                if wmask == 0 {
                    break;
                }
                wi = wmask.trailing_zeros() as usize;
                wmask &= wmask - 1;
                word = b.bits.get(wi).map_or(0, |w| w.get());
                wbase = base + ((wi as u64 * 64) << shift);
            }
            bi += 1;
            wmask = blocks.get(bi).map_or(0, nonzero_words);
        };
        (self.words.bi, self.words.wi, self.words.wmask) = (bi, wi, wmask);
        (self.word, self.wbase) = (word, wbase);
        (acc, over)
    }
}

/// Folios of every order merged into address order.
///
/// One cursor is *active* and held by value: it yields directly while its
/// folios stay at or below `limit`, the lowest next folio among the other
/// orders (`u64::MAX` when it is alone). The others wait with their next
/// folio peeked; at the start every cursor waits. Internal iteration
/// ([`Self::fold_located`]) runs the active cursor's stretch with its state
/// in registers.
#[derive(Clone)]
pub(crate) struct FolioMerge<'a> {
    active: Option<OrderFolios<'a>>,
    limit: u64,
    /// The other orders: each cursor and the next folio it yields.
    waiting: Vec<(OrderFolios<'a>, Located)>,
}

impl<'a> FolioMerge<'a> {
    pub(crate) fn new(blocks: &'a [RawBlock], spans: &[(usize, usize); NR_ORDERS]) -> Self {
        let mut waiting = Vec::new();
        for o in Order::all() {
            let (lo, hi) = spans[o.index()];
            let Some(b) = blocks.get(lo..hi).filter(|b| !b.is_empty()) else {
                continue;
            };
            let mut c = OrderFolios::new(b, lo, o);
            if let Some(l) = c.next() {
                waiting.push((c, l));
            }
        }
        FolioMerge {
            active: None,
            limit: 0,
            waiting,
        }
    }

    #[inline(always)]
    pub(crate) fn next_located(&mut self) -> Option<Located> {
        let Some(c) = self.active.as_mut() else {
            return self.promote();
        };
        match c.next() {
            Some(l) if l.folio.pfn.0 <= self.limit => Some(l),
            Some(l) => {
                if let Some(c) = self.active.take() {
                    self.waiting.push((c, l));
                }
                self.promote()
            }
            None => {
                self.active = None;
                self.promote()
            }
        }
    }

    /// Feed `f` every remaining folio in address order: internal iteration,
    /// which runs each order's stretch below `limit` as one tight loop.
    #[inline]
    pub(crate) fn fold_located<B>(mut self, init: B, mut f: impl FnMut(B, Located) -> B) -> B {
        let mut acc = init;
        loop {
            if let Some(mut c) = self.active.take() {
                let (a, over) = c.run(self.limit, acc, &mut f);
                acc = a;
                if let Some(l) = over {
                    self.waiting.push((c, l));
                }
            }
            match self.promote() {
                Some(l) => acc = f(acc, l),
                None => break acc,
            }
        }
    }

    /// Make the waiting cursor with the lowest next folio active and return
    /// that folio.
    #[inline]
    fn promote(&mut self) -> Option<Located> {
        let (mut best, mut best_pfn, mut second) = (0, u64::MAX, u64::MAX);
        for (i, (_, l)) in self.waiting.iter().enumerate() {
            let p = l.folio.pfn.0;
            if p < best_pfn {
                second = best_pfn;
                best_pfn = p;
                best = i;
            } else if p < second {
                second = p;
            }
        }
        if best >= self.waiting.len() {
            return None;
        }
        let (c, l) = self.waiting.swap_remove(best);
        self.active = Some(c);
        self.limit = second;
        Some(l)
    }
}

/// Preserved folios of an image in address order; see
/// [`Image::folios`](super::Image::folios).
#[derive(Clone)]
pub struct ImageFolios<'a> {
    merge: FolioMerge<'a>,
}

impl<'a> ImageFolios<'a> {
    pub(crate) fn new(blocks: &'a [RawBlock], spans: &[(usize, usize); NR_ORDERS]) -> Self {
        ImageFolios {
            merge: FolioMerge::new(blocks, spans),
        }
    }
}

impl fmt::Debug for ImageFolios<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageFolios")
            .field(
                "orders",
                &(self.merge.waiting.len() + usize::from(self.merge.active.is_some())),
            )
            .finish()
    }
}

impl Iterator for ImageFolios<'_> {
    type Item = Folio;

    #[inline(always)]
    fn next(&mut self) -> Option<Folio> {
        self.merge.next_located().map(|l| l.folio)
    }

    #[inline]
    fn fold<B, F: FnMut(B, Folio) -> B>(self, init: B, mut f: F) -> B {
        self.merge.fold_located(init, |acc, l| f(acc, l.folio))
    }
}

/// Coalesced preserved runs of an image, in address order; see
/// [`Image::ranges`](super::Image::ranges).
///
/// Read as runs of set bits straight from the blocks (whole words at a time
/// where a run covers them), not folio by folio.
pub struct ImageRanges<'a> {
    runs: Coalesced<'a>,
}

impl<'a> ImageRanges<'a> {
    pub(crate) fn new(blocks: &'a [RawBlock], spans: &[(usize, usize); NR_ORDERS]) -> Self {
        ImageRanges {
            runs: Coalesced::new(blocks, spans),
        }
    }
}

impl fmt::Debug for ImageRanges<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageRanges")
            .field("pending", &self.runs.pending)
            .finish_non_exhaustive()
    }
}

impl Iterator for ImageRanges<'_> {
    type Item = PfnRange;

    #[inline(always)]
    fn next(&mut self) -> Option<PfnRange> {
        self.runs.next().map(|(start, end)| PfnRange {
            start: Pfn(start),
            end: Pfn(end),
        })
    }
}

/// A maximal run of set bits inside one block, in pages.
#[derive(Clone, Copy)]
pub(crate) struct Piece {
    pub start: u64,
    pub end: u64,
}

/// The set bits of one order's blocks as page runs, in address order. A run
/// spans words but ends at its block's boundary; callers coalesce where they
/// need to.
pub(crate) struct OrderRuns<'a> {
    words: Words<'a>,
    order: u8,
    /// Bits of the word `words` loaded last not yet reported.
    word: u64,
}

impl<'a> OrderRuns<'a> {
    pub(crate) fn new(blocks: &'a [RawBlock], order: u8) -> Self {
        OrderRuns {
            words: Words::new(blocks),
            order,
            word: 0,
        }
    }

    #[inline(always)]
    pub(crate) fn next_piece(&mut self) -> Option<Piece> {
        loop {
            if self.word != 0 {
                let c = &mut self.words;
                let block = c.blocks.get(c.bi)?;
                let s = self.word.trailing_zeros();
                let n = (!(self.word >> s)).trailing_zeros();
                let start_idx = c.wi as u64 * 64 + u64::from(s);
                let mut end_idx = start_idx + u64::from(n);
                if s + n >= 64 {
                    // The run reaches the word's top bit: follow it into
                    // the next words of the block.
                    self.word = 0;
                    while c.wi + 1 < BLOCK_WORDS {
                        // Eight full words at a time: dense maps are runs
                        // of whole blocks.
                        if let Some(eight) = block.bits.get(c.wi + 1..c.wi + 9) {
                            if eight.iter().fold(!0u64, |a, w| a & w.get()) == !0 {
                                c.wi += 8;
                                end_idx += 512;
                                continue;
                            }
                        }
                        let next = block.bits[c.wi + 1].get();
                        let ones = next.trailing_ones();
                        if ones == 0 {
                            break;
                        }
                        c.wi += 1;
                        end_idx += u64::from(ones);
                        if ones < 64 {
                            self.word = next & !((1u64 << ones) - 1);
                            break;
                        }
                    }
                    // Words up to `wi` are consumed.
                    c.wmask &= (!0u64).checked_shl(c.wi as u32 + 1).unwrap_or(0);
                } else {
                    self.word &= !(((1u64 << n) - 1) << s);
                }
                let base = block.base_pfn();
                return Some(Piece {
                    start: base + (start_idx << self.order),
                    end: base + (end_idx << self.order),
                });
            }
            self.word = self.words.next()?.1;
        }
    }

    pub(crate) fn order(&self) -> u8 {
        self.order
    }
}

/// Runs of every order merged by start address. On a validated image the
/// runs are disjoint.
pub(crate) struct RunMerge<'a> {
    heads: Vec<(OrderRuns<'a>, Piece)>,
}

impl<'a> RunMerge<'a> {
    pub(crate) fn new(blocks: &'a [RawBlock], spans: &[(usize, usize); NR_ORDERS]) -> Self {
        let mut heads = Vec::with_capacity(NR_ORDERS);
        for (order, &(lo, hi)) in spans.iter().enumerate() {
            if let Some(b) = blocks.get(lo..hi).filter(|b| !b.is_empty()) {
                let mut runs = OrderRuns::new(b, order as u8);
                if let Some(p) = runs.next_piece() {
                    heads.push((runs, p));
                }
            }
        }
        RunMerge { heads }
    }

    /// The next run and its order.
    #[inline(always)]
    pub(crate) fn next_piece(&mut self) -> Option<(Piece, u8)> {
        let mut best = 0;
        if self.heads.len() > 1 {
            let mut best_start = u64::MAX;
            for (i, (_, p)) in self.heads.iter().enumerate() {
                if p.start < best_start {
                    best_start = p.start;
                    best = i;
                }
            }
        }
        let (runs, piece) = self.heads.get_mut(best)?;
        let out = (*piece, runs.order());
        match runs.next_piece() {
            Some(p) => *piece = p,
            None => {
                self.heads.swap_remove(best);
            }
        }
        Some(out)
    }
}

/// Coalesced preserved runs `[start, end)` in pages, address order.
pub(crate) struct Coalesced<'a> {
    merge: RunMerge<'a>,
    pending: Option<(u64, u64)>,
}

impl<'a> Coalesced<'a> {
    pub(crate) fn new(blocks: &'a [RawBlock], spans: &[(usize, usize); NR_ORDERS]) -> Self {
        Coalesced {
            merge: RunMerge::new(blocks, spans),
            pending: None,
        }
    }
}

impl Iterator for Coalesced<'_> {
    type Item = (u64, u64);

    // Inlined down to the caller's loop: a run returned through memory
    // (an `Option` of 24 bytes) stalls on store forwarding every call.
    #[inline(always)]
    fn next(&mut self) -> Option<(u64, u64)> {
        while let Some((p, _)) = self.merge.next_piece() {
            match &mut self.pending {
                Some(r) if r.1 == p.start => r.1 = p.end,
                Some(r) => {
                    let done = *r;
                    *r = (p.start, p.end);
                    return Some(done);
                }
                None => self.pending = Some((p.start, p.end)),
            }
        }
        self.pending.take()
    }
}
