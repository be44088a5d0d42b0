//! Read-only views of the SLAB section: cache records and preserved slab
//! pages with their allocation bitmaps, read in place.

use core::fmt;

use zerocopy::little_endian::U64;

use super::layout::{RawSlabCache, RawSlabPage, CACHE_NAME_LEN};
use crate::addr::{Order, Pfn, PhysAddr};

pub(crate) fn name_len(name: &[u8; CACHE_NAME_LEN]) -> usize {
    name.iter().position(|&b| b == 0).unwrap_or(CACHE_NAME_LEN)
}

/// The name if it is UTF-8 followed only by NUL bytes.
pub(crate) fn name_of(name: &[u8; CACHE_NAME_LEN]) -> Option<&str> {
    let n = name_len(name);
    let (text, pad) = name.split_at(n);
    if pad.iter().any(|&b| b != 0) {
        return None;
    }
    core::str::from_utf8(text).ok()
}

/// A validated slab cache record, read in place.
#[derive(Clone, Copy)]
pub struct SlabCacheView<'a> {
    pub(crate) raw: &'a RawSlabCache,
}

impl fmt::Debug for SlabCacheView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabCache")
            .field("id", &self.id())
            .field("name", &self.name())
            .field("object_size", &self.object_size())
            .field("align", &self.align())
            .field("objects_per_slab", &self.objects_per_slab())
            .field("order", &self.order())
            .finish()
    }
}

impl<'a> SlabCacheView<'a> {
    /// Cache id.
    pub fn id(&self) -> u32 {
        self.raw.id.get()
    }
    /// Cache name.
    pub fn name(&self) -> &'a str {
        // Validated at parse: UTF-8 then NUL padding.
        name_of(&self.raw.name).unwrap_or("")
    }
    /// Object size in bytes.
    pub fn object_size(&self) -> u32 {
        self.raw.object_size.get()
    }
    /// Object alignment.
    pub fn align(&self) -> u32 {
        self.raw.align.get()
    }
    /// Objects per slab page.
    pub fn objects_per_slab(&self) -> u32 {
        self.raw.objects_per_slab.get()
    }
    /// Order of the cache's slab folios.
    pub fn order(&self) -> Order {
        // Validated at parse.
        Order::new(self.raw.order).unwrap_or(Order::MAX)
    }
}

/// Slab cache records; see [`Image::slab_caches`](super::Image::slab_caches).
#[derive(Debug, Clone)]
pub struct SlabCacheIter<'a> {
    pub(crate) iter: core::slice::Iter<'a, RawSlabCache>,
}

impl<'a> Iterator for SlabCacheIter<'a> {
    type Item = SlabCacheView<'a>;

    fn next(&mut self) -> Option<SlabCacheView<'a>> {
        self.iter.next().map(|raw| SlabCacheView { raw })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.iter.size_hint()
    }
}

impl ExactSizeIterator for SlabCacheIter<'_> {}

/// A validated slab page record and its allocation bitmap, read in place.
#[derive(Clone, Copy)]
pub struct SlabPageView<'a> {
    raw: &'a RawSlabPage,
    bitmap: &'a [U64],
}

impl fmt::Debug for SlabPageView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabPage")
            .field("pfn", &self.pfn())
            .field("cache_id", &self.cache_id())
            .field("order", &self.order())
            .field("object_size", &self.object_size())
            .field("object_count", &self.object_count())
            .field("first_offset", &self.first_offset())
            .field("allocated", &self.allocated_count())
            .finish()
    }
}

impl<'a> SlabPageView<'a> {
    pub(crate) fn new(raw: &'a RawSlabPage, words: &'a [U64]) -> Self {
        let lo = raw.bitmap_index.get() as usize;
        let hi = lo.saturating_add(raw.bitmap_words.get() as usize);
        SlabPageView {
            raw,
            bitmap: words.get(lo..hi).unwrap_or(&[]),
        }
    }
    /// Head PFN of the slab folio.
    pub fn pfn(&self) -> Pfn {
        Pfn(self.raw.pfn.get())
    }
    /// The owning cache id.
    pub fn cache_id(&self) -> u32 {
        self.raw.cache_id.get()
    }
    /// Folio order.
    pub fn order(&self) -> Order {
        // Validated at parse.
        Order::new(self.raw.order).unwrap_or(Order::MAX)
    }
    /// Object size in bytes.
    pub fn object_size(&self) -> u32 {
        self.raw.object_size.get()
    }
    /// Objects in this slab.
    pub fn object_count(&self) -> u32 {
        self.raw.object_count.get()
    }
    /// Offset of object 0 from the folio start.
    pub fn first_offset(&self) -> u32 {
        self.raw.first_offset.get()
    }
    /// Arena address of object `i`, if `i < object_count`.
    pub fn object_addr(&self, i: u32) -> Option<PhysAddr> {
        if i >= self.object_count() {
            return None;
        }
        let off = u64::from(self.first_offset()) + u64::from(i) * u64::from(self.object_size());
        self.pfn().addr()?.checked_add(off)
    }
    /// Whether object `i` is allocated (false past `object_count`).
    pub fn is_allocated(&self, i: u32) -> bool {
        i < self.object_count()
            && self
                .bitmap
                .get((i / 64) as usize)
                .is_some_and(|w| w.get() >> (i % 64) & 1 != 0)
    }
    /// The allocation bitmap words, bit `i` for object `i`.
    pub fn bitmap_words(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.bitmap.iter().map(|w| w.get())
    }
    /// Number of allocated objects.
    pub fn allocated_count(&self) -> u32 {
        self.bitmap.iter().map(|w| w.get().count_ones()).sum()
    }
    /// Indices of the allocated objects, ascending.
    pub fn allocated(&self) -> impl Iterator<Item = u32> + 'a {
        let bitmap = self.bitmap;
        (0..bitmap.len()).flat_map(move |wi| {
            let mut w = bitmap[wi].get();
            core::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u32 * 64 + b)
            })
        })
    }
}

/// Slab page records; see [`Image::slab_pages`](super::Image::slab_pages).
#[derive(Debug, Clone)]
pub struct SlabPageIter<'a> {
    pub(crate) iter: core::slice::Iter<'a, RawSlabPage>,
    pub(crate) words: &'a [U64],
}

impl<'a> Iterator for SlabPageIter<'a> {
    type Item = SlabPageView<'a>;

    fn next(&mut self) -> Option<SlabPageView<'a>> {
        self.iter
            .next()
            .map(|raw| SlabPageView::new(raw, self.words))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.iter.size_hint()
    }
}

impl ExactSizeIterator for SlabPageIter<'_> {}
