//! Checked-by-caller slices of mapped memory.
//!
//! The arena hands out byte slices built from its base pointer and an
//! offset. Bounds are checked by the caller (`Arena`); what these functions
//! cannot check is aliasing, which is why they are `unsafe`.

/// A shared slice of `len` bytes at `base + off`.
///
/// # Safety
///
/// - `base..base + off + len` lies inside one live allocation or mapping
///   that stays mapped for `'a`.
/// - No `&mut` to any of those bytes exists during `'a`, and nothing writes
///   them during `'a`.
#[inline]
pub(crate) unsafe fn slice<'a>(base: *const u8, off: usize, len: usize) -> &'a [u8] {
    // SAFETY:
    // - The caller guarantees `base + off` is inside the allocation.
    let p = unsafe { base.add(off) };
    // SAFETY:
    // - `p..p + len` is inside one allocation (caller) and `u8` has no
    //   alignment or validity requirement beyond being initialised, which
    //   mapped memory is.
    // - No concurrent mutation for `'a` (caller).
    unsafe { core::slice::from_raw_parts(p, len) }
}

/// An exclusive slice of `len` bytes at `base + off`.
///
/// # Safety
///
/// - `base..base + off + len` lies inside one live, writable allocation or
///   mapping that stays mapped for `'a`.
/// - No other reference to any of those bytes exists during `'a`.
#[inline]
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn slice_mut<'a>(base: *mut u8, off: usize, len: usize) -> &'a mut [u8] {
    // SAFETY:
    // - The caller guarantees `base + off` is inside the allocation.
    let p = unsafe { base.add(off) };
    // SAFETY:
    // - `p..p + len` is inside one writable allocation (caller); bytes are
    //   always valid `u8`.
    // - The caller guarantees exclusivity for `'a`.
    unsafe { core::slice::from_raw_parts_mut(p, len) }
}
