//! Restoring preserved folios from a parsed image, each exactly once.

use super::walk::{FolioMerge, Located};
use super::{Image, RestoreError};
use crate::addr::{Order, Pfn};
use crate::memmap::{Folio, BLOCK_WORDS};

/// Hands out every preserved folio of an [`Image`] exactly once, as the
/// kernel's per-page KHO magic does.
///
/// Bookkeeping is one restored-bitmap per MEMMAP block, so memory use is
/// proportional to the image, never to the arena.
pub struct Restorer<'i, 'a> {
    image: &'i Image<'a>,
    /// Per block, [`BLOCK_WORDS`] words of "already restored" bits.
    restored: Vec<u64>,
    remaining: u64,
}

impl core::fmt::Debug for Restorer<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Restorer")
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl<'i, 'a> Restorer<'i, 'a> {
    /// Nothing restored yet.
    pub fn new(image: &'i Image<'a>) -> Self {
        Restorer {
            image,
            restored: vec![0; image.block_count() * BLOCK_WORDS],
            remaining: image.folio_count(),
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
        let Some(word) = self
            .restored
            .get_mut(block * BLOCK_WORDS + (bit / 64) as usize)
        else {
            return Err(RestoreError::NotPreserved { pfn: pfn.0 });
        };
        let mask = 1u64 << (bit % 64);
        if *word & mask != 0 {
            return Err(RestoreError::AlreadyRestored {
                pfn: pfn.0,
                order: order.get(),
            });
        }
        *word |= mask;
        self.remaining -= 1;
        Ok(order)
    }

    /// Whether the folio headed at `pfn` has been restored.
    pub fn is_restored(&self, pfn: Pfn) -> bool {
        match self.image.locate(pfn) {
            Some((head, _, block, bit)) if head == pfn => self
                .restored
                .get(block * BLOCK_WORDS + (bit / 64) as usize)
                .is_some_and(|w| w >> (bit % 64) & 1 != 0),
            _ => false,
        }
    }

    /// Folios not restored yet.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Restore every folio not restored yet, in address order. Each folio is
    /// marked restored as the iterator yields it; dropping the iterator
    /// early leaves the rest for later.
    pub fn restore_all(&mut self) -> RestoreAll<'_, 'a> {
        RestoreAll {
            merge: self.image.folio_merge(),
            restored: &mut self.restored,
            remaining: &mut self.remaining,
        }
    }
}

/// Folios being restored in bulk; see [`Restorer::restore_all`].
pub struct RestoreAll<'r, 'a> {
    merge: FolioMerge<'a>,
    restored: &'r mut [u64],
    remaining: &'r mut u64,
}

impl core::fmt::Debug for RestoreAll<'_, '_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RestoreAll")
            .field("remaining", &self.remaining)
            .finish()
    }
}

/// Mark `l` restored in `restored` unless it already is; whether it was
/// newly restored.
#[inline(always)]
fn claim(restored: &mut [u64], remaining: &mut u64, l: &Located) -> bool {
    let Some(word) = restored.get_mut(l.block * BLOCK_WORDS + (l.bit / 64) as usize) else {
        return false;
    };
    let mask = 1u64 << (l.bit % 64);
    if *word & mask != 0 {
        return false;
    }
    *word |= mask;
    *remaining -= 1;
    true
}

impl Iterator for RestoreAll<'_, '_> {
    type Item = Folio;

    #[inline]
    fn next(&mut self) -> Option<Folio> {
        while let Some(l) = self.merge.next_located() {
            if claim(self.restored, self.remaining, &l) {
                return Some(l.folio);
            }
        }
        None
    }

    #[inline]
    fn fold<B, F: FnMut(B, Folio) -> B>(self, init: B, mut f: F) -> B {
        let RestoreAll {
            merge,
            restored,
            remaining,
        } = self;
        merge.fold_located(init, |acc, l| {
            if claim(restored, remaining, &l) {
                f(acc, l.folio)
            } else {
                acc
            }
        })
    }
}
