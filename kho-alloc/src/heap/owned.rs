//! Byte views of heap memory through `&Shared`: the one place where the
//! heap turns its ownership records into references into the arena.
//!
//! The arena hands out views of its bytes through `&self` only to callers
//! that promise exclusivity
//! ([`Arena::slice_shared`](crate::arena::Arena::slice_shared),
//! [`Arena::slice_mut_shared`](crate::arena::Arena::slice_mut_shared)).
//! Here that promise is kept by what each function takes: a handle
//! ([`Obj`], [`Pages`], [`FrozenImage`]), which is not `Clone` and is made
//! once per allocation, so borrowing it shared or mutably for the view's
//! lifetime excludes every other view of its bytes; or a slab borrowed
//! from its cache's locked side table, for free slots that no handle
//! refers to. Functions taking a handle first check that it belongs to
//! `s`, so a handle of another heap never reaches these bytes. The KFENCE
//! pool's memory is built here too, because its soundness rests on where
//! `Shared` keeps the pool.

use kho_core::{PhysAddr, PhysRange};

use super::{FrozenImage, Obj, Pages, Shared, KIND_SLAB};
use crate::error::Result;
use crate::kfence::{
    Pool, PoolConfig, PoolMemory, PreservedQuery, RegionMemory, SampleMode, Sampler,
};
use crate::slab::{Slab, SlabCache};

/// The bytes of an object.
pub(super) fn obj<'a>(s: &'a Shared, obj: &'a Obj) -> Result<&'a [u8]> {
    s.check_heap(obj.heap)?;
    // SAFETY:
    // - `obj` is the only handle to these bytes (handles are not `Clone`,
    //   made once per allocation or restored object, and objects never
    //   overlap); borrowing it shared excludes writers.
    unsafe { s.arena.slice_shared(obj.range()) }
}

/// The bytes of an object, writable.
pub(super) fn obj_mut<'a>(s: &'a Shared, obj: &'a mut Obj) -> Result<&'a mut [u8]> {
    s.check_heap(obj.heap)?;
    // SAFETY:
    // - `obj` is the only handle to these bytes and is borrowed mutably for
    //   the result's lifetime.
    unsafe { s.arena.slice_mut_shared(obj.range()) }
}

/// Zero the bytes between a slab object's length and its cache's stride,
/// so that nothing stale hides in a live slot at freeze. Other objects
/// have no slack.
pub(super) fn zero_slack(s: &Shared, obj: &mut Obj) -> Result<()> {
    s.check_heap(obj.heap)?;
    if obj.kind() != KIND_SLAB {
        return Ok(());
    }
    let Some(cache) = s.cache(obj.cache()) else {
        return Ok(());
    };
    if obj.len < cache.stride {
        let slack = PhysRange::new(
            PhysAddr(obj.addr + u64::from(obj.len)),
            u64::from(cache.stride - obj.len),
        );
        // SAFETY:
        // - The slack lies in `obj`'s slot (its cache's stride from its
        //   address), which only `obj` owns and which is borrowed mutably
        //   for this call; slots of a slab never overlap.
        unsafe { s.arena.slice_mut_shared(slack) }?.fill(0);
    }
    Ok(())
}

/// The bytes of a folio.
pub(super) fn pages<'a>(s: &'a Shared, pages: &'a Pages) -> Result<&'a [u8]> {
    s.check_heap(pages.heap)?;
    // SAFETY:
    // - `pages` is the only handle to this folio (handles are not `Clone`
    //   and are made once per allocation or restored folio); a shared
    //   borrow of it excludes writers.
    unsafe { s.arena.slice_shared(pages.range()) }
}

/// The bytes of a folio, writable.
pub(super) fn pages_mut<'a>(s: &'a Shared, pages: &'a mut Pages) -> Result<&'a mut [u8]> {
    s.check_heap(pages.heap)?;
    // SAFETY:
    // - `pages` is the only handle to this folio and is borrowed mutably
    //   for the result's lifetime, so no other reference to these bytes
    //   exists.
    unsafe { s.arena.slice_mut_shared(pages.range()) }
}

/// The bytes of a frozen image (its recorded length).
pub(super) fn frozen<'a>(s: &'a Shared, frozen: &'a FrozenImage) -> Result<&'a [u8]> {
    s.check_heap(frozen.heap)?;
    let loc = frozen.location;
    // SAFETY:
    // - The image folio is owned by `frozen` and nothing writes it after
    //   `freeze`.
    unsafe {
        s.arena
            .slice_shared(PhysRange::new(PhysAddr(loc.offset), loc.len))
    }
}

/// The whole folio of a frozen image, writable, for `freeze` to write the
/// image into.
pub(super) fn frozen_folio_mut<'a>(
    s: &'a Shared,
    frozen: &'a mut FrozenImage,
) -> Result<&'a mut [u8]> {
    s.check_heap(frozen.heap)?;
    let folio = frozen.folio;
    // SAFETY:
    // - The folio was taken from the general zone by `freeze` and is owned
    //   by `frozen` (not `Clone`), borrowed mutably here; no handle refers
    //   to it.
    unsafe {
        s.arena
            .slice_mut_shared(PhysRange::new(folio.addr(), folio.bytes()))
    }
}

/// Zero the free slots and the tail of `slab`, a slab of `cache` (a cache
/// of `s`), borrowed from the cache's locked side table. Returns the bytes
/// zeroed.
pub(super) fn scrub_dead(s: &Shared, cache: &SlabCache, slab: &Slab) -> Result<u64> {
    let mut scrubbed = 0;
    let mut scrub = Ok(());
    cache.dead_ranges(slab, |r| {
        scrubbed += r.len;
        if scrub.is_ok() {
            // SAFETY:
            // - These are free slots and tails of a slab, which no handle
            //   refers to, and `slab` is borrowed from its cache's side
            //   table under the cache lock (a `Slab` lives nowhere else), so
            //   no allocation can hand them out meanwhile. No other
            //   reference to these bytes exists.
            scrub = unsafe { s.arena.slice_mut_shared(r) }.map(|b| b.fill(0));
        }
    });
    scrub.map(|()| scrubbed)
}

/// Build the KFENCE pool over the arena's KFENCE region and store its
/// sampler in `s.kfence` (the caller has checked, under its lock, that none
/// is stored yet).
pub(super) fn kfence_sampler(
    s: &Shared,
    query: Box<dyn PreservedQuery>,
    mode: SampleMode,
    config: PoolConfig,
) -> Result<&Sampler> {
    // SAFETY:
    // - the pool over this memory lives in `Shared::kfence`, declared
    //   before `Shared::arena`, so it is dropped while the arena is still
    //   mapped;
    // - nothing else in the heap touches the KFENCE region: the zones cover
    //   general and preservable memory only, and `preserve_*` refuses
    //   KFENCE pages.
    let memory = unsafe { RegionMemory::new(&s.arena, query) }?;
    let objects = config.objects.min(memory.pages().saturating_sub(1) / 2);
    let pool = std::sync::Arc::new(Pool::new(
        Box::new(memory),
        PoolConfig { objects, ..config },
    )?);
    let sampler = Sampler::new(pool, mode)?;
    // Not set yet (checked by the caller), so this stores `sampler`.
    Ok(s.kfence.get_or_init(|| sampler))
}
