//! Address newtypes: arena byte offsets, page frame numbers and folio orders.
//!
//! The three kinds never mix through operators. Conversions and arithmetic are
//! explicit, checked, and return `Option` when they can overflow, so that a
//! value read from untrusted bytes can never wrap silently.

use core::fmt;

/// log2 of the page size used by every arena and image of format v1.
pub const PAGE_SHIFT: u32 = 12;
/// Page size in bytes (4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Largest folio order the preserved-memory map can describe. Order 18 is a
/// 1 GiB folio with 4 KiB pages.
pub const MAX_MAP_ORDER: u8 = 18;
/// Number of distinct orders, `0..=MAX_MAP_ORDER`.
pub const NR_ORDERS: usize = MAX_MAP_ORDER as usize + 1;

/// A byte offset inside an arena, the user-space stand-in for a physical
/// address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PhysAddr(pub u64);

/// A page frame number: `PhysAddr >> PAGE_SHIFT`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pfn(pub u64);

/// A folio order: a folio of order `n` spans `2^n` pages and its head PFN is
/// a multiple of `2^n`. Always `<= MAX_MAP_ORDER`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Order(u8);

impl PhysAddr {
    /// The raw offset.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The page containing this address.
    #[inline]
    pub const fn pfn(self) -> Pfn {
        Pfn(self.0 >> PAGE_SHIFT)
    }

    /// The page frame if this address is page aligned.
    #[inline]
    pub const fn aligned_pfn(self) -> Option<Pfn> {
        if self.is_page_aligned() {
            Some(self.pfn())
        } else {
            None
        }
    }

    /// Whether the address is a multiple of [`PAGE_SIZE`].
    #[inline]
    pub const fn is_page_aligned(self) -> bool {
        self.0 & (PAGE_SIZE - 1) == 0
    }

    /// Offset inside its page.
    #[inline]
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }

    /// `self + bytes`, or `None` on overflow.
    #[inline]
    pub const fn checked_add(self, bytes: u64) -> Option<PhysAddr> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(PhysAddr(v)),
            None => None,
        }
    }

    /// Bytes from `base` up to `self`, or `None` if `self < base`.
    #[inline]
    pub const fn checked_offset_from(self, base: PhysAddr) -> Option<u64> {
        self.0.checked_sub(base.0)
    }
}

impl Pfn {
    /// The raw frame number.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// First byte of the page, or `None` if it does not fit in 64 bits.
    #[inline]
    pub const fn addr(self) -> Option<PhysAddr> {
        if self.0 > (u64::MAX >> PAGE_SHIFT) {
            None
        } else {
            Some(PhysAddr(self.0 << PAGE_SHIFT))
        }
    }

    /// `self + pages`, or `None` on overflow.
    #[inline]
    pub const fn checked_add(self, pages: u64) -> Option<Pfn> {
        match self.0.checked_add(pages) {
            Some(v) => Some(Pfn(v)),
            None => None,
        }
    }

    /// `self - pages`, or `None` on underflow.
    #[inline]
    pub const fn checked_sub(self, pages: u64) -> Option<Pfn> {
        match self.0.checked_sub(pages) {
            Some(v) => Some(Pfn(v)),
            None => None,
        }
    }

    /// Whether this PFN can be the head of a folio of `order`.
    #[inline]
    pub const fn is_aligned(self, order: Order) -> bool {
        self.0 & (order.pages() - 1) == 0
    }

    /// The head of the folio of `order` that contains this page.
    #[inline]
    pub const fn align_down(self, order: Order) -> Pfn {
        Pfn(self.0 & !(order.pages() - 1))
    }

    /// One past the last page of the folio of `order` headed here, or `None`
    /// on overflow.
    #[inline]
    pub const fn folio_end(self, order: Order) -> Option<Pfn> {
        self.checked_add(order.pages())
    }
}

impl Order {
    /// Order 0: a single page.
    pub const ZERO: Order = Order(0);
    /// The largest order, [`MAX_MAP_ORDER`].
    pub const MAX: Order = Order(MAX_MAP_ORDER);

    /// An order, or `None` if it exceeds [`MAX_MAP_ORDER`].
    #[inline]
    pub const fn new(order: u8) -> Option<Order> {
        if order <= MAX_MAP_ORDER {
            Some(Order(order))
        } else {
            None
        }
    }

    /// The raw order.
    #[inline]
    pub const fn get(self) -> u8 {
        self.0
    }

    /// Index into per-order tables.
    #[inline]
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Pages in a folio of this order.
    #[inline]
    pub const fn pages(self) -> u64 {
        1u64 << self.0
    }

    /// Bytes in a folio of this order.
    #[inline]
    pub const fn bytes(self) -> u64 {
        PAGE_SIZE << self.0
    }

    /// Every order, smallest first.
    pub fn all() -> impl DoubleEndedIterator<Item = Order> + Clone {
        (0..=MAX_MAP_ORDER).map(Order)
    }

    /// The largest order whose folio fits in `pages` pages (`pages > 0`),
    /// capped at [`MAX_MAP_ORDER`].
    #[inline]
    pub const fn fitting(pages: u64) -> Order {
        if pages == 0 {
            return Order(0);
        }
        let log = 63 - pages.leading_zeros();
        if log >= MAX_MAP_ORDER as u32 {
            Order(MAX_MAP_ORDER)
        } else {
            Order(log as u8)
        }
    }

    /// The smallest order whose folio holds `bytes` bytes (order 0 for
    /// zero bytes), or `None` if even a [`MAX_MAP_ORDER`] folio is too
    /// small.
    #[inline]
    pub const fn covering(bytes: u64) -> Option<Order> {
        let pages = bytes.div_ceil(PAGE_SIZE);
        if pages <= 1 {
            return Some(Order(0));
        }
        let log = 64 - (pages - 1).leading_zeros();
        if log > MAX_MAP_ORDER as u32 {
            None
        } else {
            Some(Order(log as u8))
        }
    }
}

/// A byte range `[start, start + len)` inside an arena. Used for scratch and
/// KFENCE ranges, extents, and metadata properties that point into the arena.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub struct PhysRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl PhysRange {
    /// The range `[start, start + len)`.
    #[inline]
    pub const fn new(start: PhysAddr, len: u64) -> Self {
        PhysRange {
            start: start.0,
            len,
        }
    }

    /// First byte.
    #[inline]
    pub const fn start(self) -> PhysAddr {
        PhysAddr(self.start)
    }

    /// One past the last byte, or `None` if that overflows.
    #[inline]
    pub const fn end(self) -> Option<PhysAddr> {
        match self.start.checked_add(self.len) {
            Some(e) => Some(PhysAddr(e)),
            None => None,
        }
    }

    /// Whether the range is empty.
    #[inline]
    pub const fn is_empty(self) -> bool {
        self.len == 0
    }

    /// Whether `addr` lies inside.
    #[inline]
    pub const fn contains(self, addr: PhysAddr) -> bool {
        addr.0 >= self.start && addr.0 - self.start < self.len
    }

    /// Whether the two ranges share at least one byte (saturating at the
    /// top of the address space).
    #[inline]
    pub const fn overlaps(self, other: PhysRange) -> bool {
        let a_end = self.start.saturating_add(self.len);
        let b_end = other.start.saturating_add(other.len);
        self.len != 0 && other.len != 0 && self.start < b_end && other.start < a_end
    }

    /// Whether both ends are page aligned.
    #[inline]
    pub const fn is_page_aligned(self) -> bool {
        self.start & (PAGE_SIZE - 1) == 0 && self.len & (PAGE_SIZE - 1) == 0
    }

    /// The pages `[first, end)` this range touches, or `None` on overflow.
    pub fn pfns(self) -> Option<(Pfn, Pfn)> {
        let end = self.start.checked_add(self.len)?;
        Some((Pfn(self.start >> PAGE_SHIFT), Pfn(end.div_ceil(PAGE_SIZE))))
    }
}

impl fmt::Debug for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhysRange({:#x}+{:#x})", self.start, self.len)
    }
}

impl fmt::Display for PhysRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x})",
            self.start,
            self.start.saturating_add(self.len)
        )
    }
}

impl fmt::Debug for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PhysAddr({:#x})", self.0)
    }
}

impl fmt::Display for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for PhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pfn({:#x})", self.0)
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::Debug for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Order({})", self.0)
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_checked() {
        assert_eq!(PhysAddr(0x3000).pfn(), Pfn(3));
        assert_eq!(PhysAddr(0x3001).aligned_pfn(), None);
        assert_eq!(Pfn(3).addr(), Some(PhysAddr(0x3000)));
        assert_eq!(Pfn(u64::MAX).addr(), None);
        assert_eq!(Pfn(u64::MAX).checked_add(1), None);
        assert_eq!(Pfn(0).checked_sub(1), None);
        assert_eq!(PhysAddr(u64::MAX).checked_add(1), None);
        assert_eq!(PhysAddr(5).checked_offset_from(PhysAddr(6)), None);
        assert_eq!(Order::new(MAX_MAP_ORDER + 1), None);
        assert_eq!(Order::new(18).unwrap().bytes(), 1 << 30);
        let r = PhysRange::new(PhysAddr(0x1000), 0x2000);
        assert_eq!(r.end(), Some(PhysAddr(0x3000)));
        assert!(r.contains(PhysAddr(0x2fff)) && !r.contains(PhysAddr(0x3000)));
        assert!(r.overlaps(PhysRange::new(PhysAddr(0x2fff), 1)));
        assert!(!r.overlaps(PhysRange::new(PhysAddr(0x3000), 1)));
        assert!(!r.overlaps(PhysRange::new(PhysAddr(0x1000), 0)));
        assert_eq!(PhysRange::new(PhysAddr(u64::MAX), 2).end(), None);
        assert_eq!(
            PhysRange::new(PhysAddr(0x1800), 0x1000).pfns(),
            Some((Pfn(1), Pfn(3)))
        );
    }

    #[test]
    fn alignment() {
        let o9 = Order::new(9).unwrap();
        assert!(Pfn(512).is_aligned(o9));
        assert!(!Pfn(513).is_aligned(o9));
        assert_eq!(Pfn(1000).align_down(o9), Pfn(512));
        assert_eq!(Order::fitting(1), Order::ZERO);
        assert_eq!(Order::fitting(1023).get(), 9);
        assert_eq!(Order::fitting(u64::MAX), Order::MAX);
    }

    #[test]
    fn covering_is_the_least_order_that_holds() {
        assert_eq!(Order::covering(0), Some(Order::ZERO));
        assert_eq!(Order::covering(1), Some(Order::ZERO));
        assert_eq!(Order::covering(PAGE_SIZE), Some(Order::ZERO));
        assert_eq!(Order::covering(PAGE_SIZE + 1).map(Order::get), Some(1));
        assert_eq!(Order::covering(3 * PAGE_SIZE).map(Order::get), Some(2));
        assert_eq!(Order::covering(Order::MAX.bytes()), Some(Order::MAX));
        assert_eq!(Order::covering(Order::MAX.bytes() + 1), None);
        assert_eq!(Order::covering(u64::MAX), None);
        for o in Order::all() {
            assert_eq!(Order::covering(o.bytes()), Some(o));
        }
    }
}
