//! Restoring preserved folios from a parsed image, each exactly once.

use core::cell::Cell;

use super::{Image, ImageBlocks, RestoreError};
use crate::addr::{Order, Pfn, NR_ORDERS};
use crate::memmap::{block_span_pages, BlockBits, Folio, Folios, BLOCK_WORDS};

/// Hands out every preserved folio of an [`Image`] exactly once, as the
/// kernel's per-page KHO magic does.
///
/// Bookkeeping is one restored-bitmap per MEMMAP block, so memory use is
/// proportional to the image, never to the arena.
pub struct Restorer<'i, 'a> {
    image: &'i Image<'a>,
    /// Per block, [`BLOCK_WORDS`] words of "already restored" bits.
    restored: Vec<Cell<u64>>,
    remaining: Cell<u64>,
}

impl core::fmt::Debug for Restorer<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Restorer")
            .field("remaining", &self.remaining.get())
            .finish()
    }
}

impl<'i, 'a> Restorer<'i, 'a> {
    /// Nothing restored yet.
    pub fn new(image: &'i Image<'a>) -> Self {
        Restorer {
            image,
            restored: (0..image.block_count() * BLOCK_WORDS)
                .map(|_| Cell::new(0))
                .collect(),
            remaining: Cell::new(image.folio_count()),
        }
    }

    /// The image being restored.
    pub fn image(&self) -> &'i Image<'a> {
        self.image
    }

    /// Claim the preserved folio headed at `pfn` and return its order.
    ///
    /// Fails on a PFN no preserved folio contains, on a PFN inside a folio
    /// that is not its head, and on a folio restored before.
    pub fn restore_folio(&mut self, pfn: Pfn) -> Result<Order, RestoreError> {
        let Some((head, order, block, bit)) = self.image.locate(pfn) else {
            return Err(RestoreError::NotPreserved { pfn: pfn.0 });
        };
        if head != pfn {
            return Err(RestoreError::NotHead {
                pfn: pfn.0,
                head: head.0,
                order: order.get(),
            });
        }
        let Some(cell) = self.restored.get(block * BLOCK_WORDS + (bit / 64) as usize) else {
            return Err(RestoreError::NotPreserved { pfn: pfn.0 });
        };
        let mask = 1u64 << (bit % 64);
        if cell.get() & mask != 0 {
            return Err(RestoreError::AlreadyRestored {
                pfn: pfn.0,
                order: order.get(),
            });
        }
        cell.set(cell.get() | mask);
        self.remaining.set(self.remaining.get() - 1);
        Ok(order)
    }

    /// Whether the folio headed at `pfn` has been restored.
    pub fn is_restored(&self, pfn: Pfn) -> bool {
        match self.image.locate(pfn) {
            Some((head, _, block, bit)) if head == pfn => self
                .restored
                .get(block * BLOCK_WORDS + (bit / 64) as usize)
                .is_some_and(|c| c.get() >> (bit % 64) & 1 != 0),
            _ => false,
        }
    }

    /// Folios not restored yet.
    pub fn remaining(&self) -> u64 {
        self.remaining.get()
    }

    /// Restore every folio not restored yet, in address order. Each folio is
    /// marked restored as the iterator yields it; dropping the iterator
    /// early leaves the rest for later.
    pub fn restore_all(&mut self) -> RestoreAll<'_, 'a> {
        let restorer: &Restorer<'_, 'a> = self;
        let folios = Folios::new(Order::all().map(|order| Unrestored {
            blocks: restorer.image.blocks_of(order),
            index: restorer.image.first_block_of(order),
            restored: &restorer.restored,
        }));
        RestoreAll {
            folios,
            last: [(u64::MAX, 0); NR_ORDERS],
            restored: &restorer.restored,
            remaining: &restorer.remaining,
            image: restorer.image,
        }
    }
}

/// One order's blocks with restored folios masked out.
#[derive(Debug)]
struct Unrestored<'r, 'a> {
    blocks: ImageBlocks<'a>,
    index: usize,
    restored: &'r [Cell<u64>],
}

impl Iterator for Unrestored<'_, '_> {
    type Item = BlockBits;

    fn next(&mut self) -> Option<BlockBits> {
        let mut b = self.blocks.next()?;
        let base = self.index * BLOCK_WORDS;
        self.index += 1;
        for (i, w) in b.words.iter_mut().enumerate() {
            *w &= !self.restored.get(base + i).map_or(0, Cell::get);
        }
        Some(b)
    }
}

/// Folios being restored in bulk; see [`Restorer::restore_all`].
pub struct RestoreAll<'r, 'a> {
    folios: Folios<Unrestored<'r, 'a>>,
    /// Per order, the last block seen as `(base, index)`.
    last: [(u64, usize); NR_ORDERS],
    restored: &'r [Cell<u64>],
    remaining: &'r Cell<u64>,
    image: &'r Image<'a>,
}

impl core::fmt::Debug for RestoreAll<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RestoreAll")
            .field("remaining", &self.remaining.get())
            .finish()
    }
}

impl Iterator for RestoreAll<'_, '_> {
    type Item = Folio;

    fn next(&mut self) -> Option<Folio> {
        let f = self.folios.next()?;
        let span = block_span_pages(f.order);
        let base = f.pfn.0 & !(span - 1);
        let last = &mut self.last[f.order.index()];
        if last.0 != base {
            if let Some(i) = self.image.block_index(f.order, base) {
                *last = (base, i);
            }
        }
        let bit = (f.pfn.0 - base) >> f.order.get();
        if last.0 == base {
            if let Some(c) = self
                .restored
                .get(last.1 * BLOCK_WORDS + (bit / 64) as usize)
            {
                c.set(c.get() | 1u64 << (bit % 64));
                self.remaining.set(self.remaining.get() - 1);
            }
        }
        Some(f)
    }
}
