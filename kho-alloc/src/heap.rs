//! The heap: an arena with its zones, slab caches and preservation state,
//! and the freeze and restore paths of a handover.
//!
//! Memory is addressed by [`PhysAddr`] in everything that crosses a
//! handover. Inside one process an allocation is an owned handle ([`Obj`]
//! for objects, [`Pages`] for folios): it is not `Clone`, freeing consumes
//! it, and its bytes are reached through the heap (`bytes(&obj)`,
//! `bytes_mut(&mut obj)`), so the borrow checker rules out aliasing and
//! use after free without any raw pointer leaving the crate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use kho_core::{
    Extent, Folio, Image, ImageBuilder, Order, Pfn, PhysAddr, PhysRange, PreservedMap, Restorer,
    SlabCacheInfo, SlabPageInfo, Tree, PAGE_SIZE,
};

use crate::arena::Arena;
use crate::buddy::{BuddyStats, Zone};
use crate::error::{Error, Result};
use crate::kfence::{self, PoolConfig, SampleMode, Sampler};
use crate::layout::{Layout, Region};
use crate::magazine;
use crate::session::fault::{self, FaultPoint};
use crate::slab::{SlabCache, MAX_OBJECT_SIZE};
use crate::superblock::ImageLocation;
use kho_core::image::layout::BLOCK_SIZE;

/// Byte views of owned heap memory: the heap's `unsafe` blocks.
#[allow(unsafe_code)]
mod owned;

/// GFP-style allocation flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GfpFlags(u32);

impl GfpFlags {
    /// No flags: general memory, contents unspecified, may wait for locks.
    pub const NONE: GfpFlags = GfpFlags(0);
    /// Serve from the preservable pool only (never scratch, never the
    /// KFENCE pool, never sampled). Objects up to 4 KiB land in preservable
    /// size-class caches, whose slab pages every freeze preserves. Larger
    /// objects, like [`Heap::alloc_pages`] folios, get a whole folio of the
    /// pool, which crosses a handover only if its owner preserves it
    /// ([`Heap::preserve_obj`], [`Heap::preserve_pages`]); the successor
    /// finds it in [`Restored::folios`] and releases every other page.
    pub const PRESERVE: GfpFlags = GfpFlags(1);
    /// Zero the memory before returning it.
    pub const ZERO: GfpFlags = GfpFlags(2);
    /// Never block: a busy allocator lock gives [`Error::WouldBlock`].
    pub const NOWAIT: GfpFlags = GfpFlags(4);

    /// Whether every flag of `other` is set.
    #[inline]
    pub const fn contains(self, other: GfpFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl core::ops::BitOr for GfpFlags {
    type Output = GfpFlags;
    fn bitor(self, rhs: GfpFlags) -> GfpFlags {
        GfpFlags(self.0 | rhs.0)
    }
}

/// Object sizes of the general size classes.
pub const SIZE_CLASSES: [u32; 12] = [8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096];
const NCLASSES: usize = SIZE_CLASSES.len();
/// Cache-table slots: general classes, preservable classes, named caches.
const MAX_CACHES: usize = 1024;
const FIRST_NAMED: usize = 2 * NCLASSES;

#[inline]
fn class_of(size: usize) -> usize {
    match size {
        0..=8 => 0,
        9..=16 => 1,
        17..=32 => 2,
        33..=64 => 3,
        65..=96 => 4,
        97..=128 => 5,
        129..=192 => 6,
        193..=256 => 7,
        257..=512 => 8,
        513..=1024 => 9,
        1025..=2048 => 10,
        _ => 11,
    }
}

/// Alignment of the objects of the size class of `size` bytes: the size
/// for powers of two up to 64, 8 otherwise.
#[inline]
const fn class_align(size: u32) -> u32 {
    if size.is_power_of_two() {
        if size < 8 {
            8
        } else if size > 64 {
            64
        } else {
            size
        }
    } else {
        8
    }
}

/// Alignment a request of `size` bytes gets from [`Heap::alloc`]: that of
/// the size class serving it (sampled objects included).
#[inline]
fn alloc_align(size: usize) -> usize {
    if size > MAX_OBJECT_SIZE as usize {
        PAGE_SIZE as usize
    } else {
        class_align(SIZE_CLASSES[class_of(size)]) as usize
    }
}

static NEXT_HEAP: AtomicU32 = AtomicU32::new(1);

const KIND_SLAB: u8 = 0;
const KIND_LARGE: u8 = 1;
/// An object of the KFENCE pool (sampled).
const KIND_KFENCE: u8 = 2;

/// An allocated object: an owned handle, not `Clone`. Its address is
/// [`Obj::addr`]; its bytes are reached through the heap that made it.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an object leaks unless it is freed"]
pub struct Obj {
    addr: u64,
    heap: u32,
    /// Slab index (slab objects) or unused.
    slab: u32,
    /// Usable length in bytes.
    len: u32,
    /// Cache index (bits 0..16, slab objects), kind (16..24) and folio
    /// order (24..32, large objects) in one word, so that a handle is
    /// built with whole-word stores.
    tag: u32,
}

/// Pack an [`Obj`] tag.
#[inline]
const fn tag(cache: u16, kind: u8, order: u8) -> u32 {
    cache as u32 | (kind as u32) << 16 | (order as u32) << 24
}

impl Obj {
    #[inline]
    fn cache(&self) -> u16 {
        self.tag as u16
    }

    #[inline]
    fn kind(&self) -> u8 {
        (self.tag >> 16) as u8
    }

    #[inline]
    fn order(&self) -> u8 {
        (self.tag >> 24) as u8
    }

    /// The object's arena address: what goes into handover metadata.
    #[inline]
    pub fn addr(&self) -> PhysAddr {
        PhysAddr(self.addr)
    }

    /// Usable bytes.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the object has no usable bytes (never: sizes start at 1).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes of the object as a range.
    pub fn range(&self) -> PhysRange {
        PhysRange::new(self.addr(), u64::from(self.len))
    }

    /// Give up the handle but keep the object allocated: its address lives
    /// on in handover metadata (a predecessor about to exit does this).
    pub fn leak(self) -> PhysAddr {
        self.addr()
    }
}

/// An [`Obj`] handle taken apart into plain data, for queues that cannot
/// hold handles (a signal handler's list of objects to free, see
/// [`crate::deferred`]). Holding a `RawObj` owns nothing: only
/// [`Obj::from_raw`] turns it back into a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawObj {
    /// Arena address.
    pub addr: u64,
    /// Id of the heap that made the object.
    pub heap: u32,
    /// Usable length in bytes.
    pub len: u32,
    /// Slab index (bits 0..32), cache index (32..48), kind (48..56) and
    /// folio order (56..64), packed.
    pub meta: u64,
}

impl Obj {
    /// Id of the heap that made the object.
    pub(crate) fn heap_id(&self) -> u32 {
        self.heap
    }

    /// Give up the handle as plain data; [`Obj::from_raw`] restores it.
    pub fn into_raw(self) -> RawObj {
        RawObj {
            addr: self.addr,
            heap: self.heap,
            len: self.len,
            meta: u64::from(self.slab)
                | u64::from(self.cache()) << 32
                | u64::from(self.kind()) << 48
                | u64::from(self.order()) << 56,
        }
    }

    /// Rebuild a handle from [`Obj::into_raw`].
    ///
    /// # Safety
    ///
    /// - `raw` came from [`Obj::into_raw`] and no other handle to the
    ///   object exists: it is turned back into a handle at most once per
    ///   `into_raw`, and the object was not freed in between. (A forged or
    ///   duplicated handle would let safe code alias the object's bytes.)
    #[allow(unsafe_code)]
    pub unsafe fn from_raw(raw: RawObj) -> Obj {
        Obj {
            addr: raw.addr,
            heap: raw.heap,
            slab: raw.meta as u32,
            len: raw.len,
            tag: tag(
                (raw.meta >> 32) as u16,
                (raw.meta >> 48) as u8,
                (raw.meta >> 56) as u8,
            ),
        }
    }
}

/// An allocated folio: an owned handle, not `Clone`.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "pages leak unless they are freed"]
pub struct Pages {
    folio: Folio,
    heap: u32,
}

impl Pages {
    /// The folio (head PFN and order).
    #[inline]
    pub fn folio(&self) -> Folio {
        self.folio
    }

    /// First byte.
    #[inline]
    pub fn addr(&self) -> PhysAddr {
        self.folio.addr()
    }

    /// The bytes as a range.
    pub fn range(&self) -> PhysRange {
        PhysRange::new(self.folio.addr(), self.folio.bytes())
    }

    /// Give up the handle but keep the folio allocated.
    pub fn leak(self) -> Folio {
        self.folio
    }
}

/// Counters of a heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeapStats {
    /// The general zone.
    pub general: BuddyStats,
    /// The preservable zone.
    pub preservable: BuddyStats,
    /// Preserved folios recorded by `preserve_*` (slab pages not included).
    pub preserved_folios: u64,
}

/// What a freeze did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FreezeStats {
    /// Preservable slab pages recorded and preserved.
    pub slab_pages: u64,
    /// Live preservable objects in them.
    pub live_objects: u64,
    /// Bytes zeroed in free slots and slab tails.
    pub scrubbed_bytes: u64,
    /// Folios in the MEMMAP section.
    pub preserved_folios: u64,
    /// Bytes in those folios (the image's own folio included).
    pub preserved_bytes: u64,
    /// Image length in bytes.
    pub image_len: u64,
}

/// An image written into the arena by [`Heap::freeze`] but not yet
/// published. Give it to [`Heap::commit`] or [`Heap::discard`]; dropping it
/// discards it too (its folio goes back to the heap that froze it), so no
/// failure path leaks the image's memory.
#[derive(Debug)]
#[must_use = "a frozen image holds arena pages until committed or discarded"]
pub struct FrozenImage {
    location: ImageLocation,
    folio: Folio,
    generation: u64,
    heap: u32,
    stats: FreezeStats,
    /// The heap that owns the folio, until commit or discard.
    owner: Option<Arc<Shared>>,
}

impl FrozenImage {
    /// Where the image bytes are.
    pub fn location(&self) -> ImageLocation {
        self.location
    }

    /// The generation the image records (the one `commit` publishes).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the freeze did.
    pub fn stats(&self) -> FreezeStats {
        self.stats
    }

    /// Free the image's folio in the heap that froze it (once).
    fn release(&mut self) -> Result<()> {
        match self.owner.take() {
            Some(shared) => shared.general.free(self.folio.pfn, false).map(drop),
            None => Ok(()),
        }
    }
}

impl Drop for FrozenImage {
    fn drop(&mut self) {
        // The folio was taken from the general zone by `freeze`; a refusal
        // here would mean the zone is already corrupt, and there is nothing
        // better to do with it in a destructor.
        let _ = self.release();
    }
}

pub(crate) struct Shared {
    id: u32,
    /// The KFENCE sampler, once enabled. Declared before `arena` so that the
    /// pool is dropped (handing its pages back) while the arena is mapped.
    kfence: OnceLock<Sampler>,
    arena: Arena,
    general: Zone,
    preservable: Zone,
    caches: Box<[OnceLock<SlabCache>]>,
    names: Mutex<HashMap<String, u16>>,
    preserved: Mutex<PreservedMap>,
    /// Folios in `preserved`, readable without its lock (fast path of
    /// `free_pages`).
    preserved_count: AtomicU64,
    extents: Mutex<Vec<Extent>>,
    /// The folio of the committed (or restored) image.
    image: Mutex<Option<Folio>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heap")
            .field("id", &self.id)
            .field("arena", &self.arena)
            .field("general", &self.general)
            .field("preservable", &self.preservable)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// Take the arena back out of a heap that was never shared.
    fn into_arena(self) -> Arena {
        let Shared { arena, .. } = self;
        arena
    }

    fn cache(&self, i: u16) -> Option<&SlabCache> {
        self.caches.get(usize::from(i)).and_then(OnceLock::get)
    }

    fn zone_of(&self, pfn: Pfn) -> Option<&Zone> {
        if self.general.contains(pfn) {
            Some(&self.general)
        } else if self.preservable.contains(pfn) {
            Some(&self.preservable)
        } else {
            None
        }
    }

    fn zone_for(&self, cache: &SlabCache) -> &Zone {
        if cache.preservable {
            &self.preservable
        } else {
            &self.general
        }
    }

    /// Return a magazine's objects to the general class `class`.
    pub(crate) fn flush_magazine(&self, class: usize, mag: &mut Vec<(u64, u32)>) {
        let Some(cache) = self.caches.get(class).and_then(OnceLock::get) else {
            return;
        };
        let mut surplus = Vec::new();
        // Magazine entries come from handles, which are unique: none is
        // ever rejected.
        let _ = cache.free_batch(mag, &mut surplus);
        mag.clear();
        for pfn in surplus {
            // The folio was allocated by this zone; freeing cannot fail.
            let _ = self.general.free(pfn, false);
        }
    }

    fn check_heap(&self, heap: u32) -> Result<()> {
        if heap == self.id {
            Ok(())
        } else {
            Err(Error::WrongHeap {
                expected: u64::from(self.id),
                found: u64::from(heap),
            })
        }
    }

    /// Register a cache in a free slot (or `slot` if given).
    fn register(&self, slot: Option<usize>, cache: SlabCache) -> Result<u16> {
        self.register_named(&mut lock(&self.names), slot, cache)
    }

    /// [`register`](Self::register) under the caller's hold of `names`, so
    /// that a lookup and the registration it decided on are one step.
    fn register_named(
        &self,
        names: &mut HashMap<String, u16>,
        slot: Option<usize>,
        cache: SlabCache,
    ) -> Result<u16> {
        let i = match slot {
            Some(i) => i,
            None => (FIRST_NAMED..MAX_CACHES)
                .find(|&i| self.caches[i].get().is_none())
                .ok_or(Error::InvalidConfig {
                    what: "too many caches",
                    value: MAX_CACHES as u64,
                    limit: MAX_CACHES as u64,
                })?,
        };
        let mut cache = cache;
        cache.index = i as u16;
        let name = cache.name.clone();
        self.caches[i]
            .set(cache)
            .map_err(|_| Error::InvalidConfig {
                what: "cache slot in use",
                value: i as u64,
                limit: MAX_CACHES as u64,
            })?;
        names.insert(name, i as u16);
        Ok(i as u16)
    }
}

/// The allocator over one arena: zones, caches, preservation, handover.
///
/// `Heap` is `Send + Sync` and cheap to clone (clones share everything).
#[derive(Debug, Clone)]
pub struct Heap {
    shared: Arc<Shared>,
}

/// A named preservable cache: its slabs come only from the preservable pool
/// and are preserved, scrubbed and recorded at every freeze.
#[derive(Debug, Clone)]
pub struct PreservableCache {
    shared: Arc<Shared>,
    index: u16,
}

/// A cache restored from an image with its live objects.
///
/// Objects are handed out lazily from per-slab copies of the allocation
/// bitmaps, so restoring costs time per slab page, not per object. Each live
/// object is handed out at most once, by [`take`](Self::take) or
/// [`into_objects`](Self::into_objects). The image records slot strides,
/// not requested sizes, so a restored handle's [`Obj::len`] is the stride;
/// the bytes past the requested size were zeroed at allocation.
#[derive(Debug)]
pub struct RestoredCache {
    /// Cache name.
    pub name: String,
    /// Object stride in bytes.
    pub object_size: u32,
    /// Object alignment.
    pub align: u32,
    heap: u32,
    cache: u16,
    order: Order,
    per_slab: u32,
    remaining: usize,
    /// Sorted by PFN.
    slabs: Vec<RestoredSlab>,
}

#[derive(Debug)]
struct RestoredSlab {
    pfn: u64,
    slab: u32,
    /// Live objects not taken yet.
    untaken: Box<[u64]>,
}

impl RestoredCache {
    /// Live objects not taken yet.
    pub fn len(&self) -> usize {
        self.remaining
    }

    /// Whether every object was taken.
    pub fn is_empty(&self) -> bool {
        self.remaining == 0
    }

    fn obj(&self, s: &RestoredSlab, i: u64) -> Obj {
        Obj {
            addr: (s.pfn << kho_core::PAGE_SHIFT) + i * u64::from(self.object_size),
            heap: self.heap,
            slab: s.slab,
            len: self.object_size,
            tag: tag(self.cache, KIND_SLAB, 0),
        }
    }

    /// Take the live object at `addr` (once).
    pub fn take(&mut self, addr: PhysAddr) -> Option<Obj> {
        let head = addr.pfn().align_down(self.order).0;
        let k = self.slabs.binary_search_by_key(&head, |s| s.pfn).ok()?;
        let off = addr.0 - (head << kho_core::PAGE_SHIFT);
        let stride = u64::from(self.object_size);
        if off % stride != 0 || off / stride >= u64::from(self.per_slab) {
            return None;
        }
        let i = off / stride;
        let word = self.slabs[k].untaken.get_mut((i / 64) as usize)?;
        if *word & (1 << (i % 64)) == 0 {
            return None;
        }
        *word &= !(1 << (i % 64));
        self.remaining -= 1;
        Some(self.obj(&self.slabs[k], i))
    }

    /// Addresses of the live objects not taken yet, by address.
    pub fn addrs(&self) -> impl Iterator<Item = PhysAddr> + '_ {
        let stride = u64::from(self.object_size);
        self.slabs.iter().flat_map(move |s| {
            let base = s.pfn << kho_core::PAGE_SHIFT;
            s.untaken.iter().enumerate().flat_map(move |(w, &word)| {
                let mut x = word;
                core::iter::from_fn(move || {
                    if x == 0 {
                        return None;
                    }
                    let b = u64::from(x.trailing_zeros());
                    x &= x - 1;
                    Some(PhysAddr(base + (w as u64 * 64 + b) * stride))
                })
            })
        })
    }

    /// Every live object not taken yet, by address.
    pub fn into_objects(self) -> Vec<Obj> {
        let mut out = Vec::with_capacity(self.remaining);
        for s in &self.slabs {
            for (w, &word) in s.untaken.iter().enumerate() {
                let mut x = word;
                while x != 0 {
                    let b = u64::from(x.trailing_zeros());
                    x &= x - 1;
                    out.push(self.obj(s, w as u64 * 64 + b));
                }
            }
        }
        out
    }
}

/// What a successor got back from [`Heap::restore`].
#[derive(Debug)]
pub struct Restored {
    /// Generation recorded in the image.
    pub generation: u64,
    /// The metadata tree, if the image had one.
    pub tree: Option<Tree>,
    /// Valid-byte extents declared by the predecessor.
    pub extents: Vec<Extent>,
    /// Preservable caches with their live objects.
    pub caches: Vec<RestoredCache>,
    /// Preserved folios that are not slab pages, by address.
    pub folios: Vec<Pages>,
}

impl Restored {
    /// The restored cache called `name`.
    pub fn cache_mut(&mut self, name: &str) -> Option<&mut RestoredCache> {
        self.caches.iter_mut().find(|c| c.name == name)
    }

    /// Take the preserved folio headed at `pfn` (once).
    pub fn take_folio(&mut self, pfn: Pfn) -> Option<Pages> {
        let i = self.folios.iter().position(|p| p.folio.pfn == pfn)?;
        Some(self.folios.swap_remove(i))
    }
}

impl Heap {
    fn next_id() -> Result<u32> {
        let id = NEXT_HEAP.fetch_add(1, Ordering::Relaxed);
        if id == u32::MAX || id == 0 {
            NEXT_HEAP.store(u32::MAX, Ordering::Relaxed);
            return Err(Error::InvalidConfig {
                what: "heap ids exhausted",
                value: u64::from(id),
                limit: u64::from(u32::MAX),
            });
        }
        Ok(id)
    }

    fn build(arena: Arena, id: u32, populate: bool) -> Result<Shared> {
        let layout = *arena.layout();
        let general = Zone::new("general", layout.general, layout.max_order, populate)?;
        let preservable = Zone::new(
            "preservable",
            layout.preservable,
            layout.max_order,
            populate,
        )?;
        let shared = Shared {
            id,
            kfence: OnceLock::new(),
            general,
            preservable,
            caches: (0..MAX_CACHES).map(|_| OnceLock::new()).collect(),
            names: Mutex::new(HashMap::new()),
            preserved: Mutex::new(PreservedMap::new(Pfn(layout.pages))),
            preserved_count: AtomicU64::new(0),
            extents: Mutex::new(Vec::new()),
            image: Mutex::new(None),
            arena,
        };
        for (i, &size) in SIZE_CLASSES.iter().enumerate() {
            let align = class_align(size);
            let g = SlabCache::new(
                0,
                format!("kmalloc-{size}"),
                size,
                align,
                layout.max_order,
                false,
            )?;
            shared.register(Some(i), g)?;
            let p = SlabCache::new(
                0,
                format!("kmalloc-p-{size}"),
                size,
                align,
                layout.max_order,
                true,
            )?;
            shared.register(Some(NCLASSES + i), p)?;
        }
        Ok(shared)
    }

    /// A fresh heap over `arena`: every page of the general and preservable
    /// regions free.
    ///
    /// An arena whose current image was not restored yet holds a handover
    /// that a fresh heap would overwrite page by page: that is refused with
    /// [`Error::PendingHandover`]. Restore it ([`Heap::restore`]) or give it
    /// up explicitly first ([`Arena::discard_image`]).
    pub fn new(arena: Arena) -> Result<Heap> {
        if !arena.is_writable() {
            return Err(Error::ReadOnly);
        }
        if let Some(image) = arena.current_image() {
            if !arena.image_restored() {
                return Err(Error::PendingHandover {
                    generation: arena.generation(),
                    offset: image.offset,
                });
            }
        }
        let shared = Self::build(arena, Self::next_id()?, true)?;
        Ok(Heap {
            shared: Arc::new(shared),
        })
    }

    /// Give the arena back, for a successor in the same process (or a
    /// test) to [`restore`](Self::restore) from. Fails, returning the heap,
    /// while clones of it or its caches are alive.
    pub fn into_arena(self) -> std::result::Result<Arena, Heap> {
        match Arc::try_unwrap(self.shared) {
            Ok(shared) => Ok(shared.arena),
            Err(shared) => Err(Heap { shared }),
        }
    }

    /// The arena geometry.
    pub fn layout(&self) -> &Layout {
        self.shared.arena.layout()
    }

    /// The region of `pfn`.
    pub fn region_of(&self, pfn: Pfn) -> Option<Region> {
        self.shared.arena.region_of(pfn)
    }

    /// Start KFENCE sampling over the arena's KFENCE region (the pool is
    /// built on first call; later calls only switch `mode`). General
    /// requests are then sampled, `PRESERVE` ones never. The sampler is
    /// returned for statistics, the pool's report sink and the fault
    /// handler. [`freeze`](Self::freeze) disables sampling.
    pub fn enable_kfence(&self, mode: SampleMode, config: PoolConfig) -> Result<&Sampler> {
        static ENABLE: Mutex<()> = Mutex::new(());
        let _once = lock(&ENABLE);
        let s = &self.shared;
        if let Some(k) = s.kfence.get() {
            k.enable(mode)?;
            return Ok(k);
        }
        /// The pool's preserved-page query. Weak: it lives inside `Shared`
        /// (through the sampler).
        struct PoolPages(std::sync::Weak<Shared>);
        impl kfence::PreservedQuery for PoolPages {
            fn is_preserved(&self, pfn: Pfn) -> bool {
                self.0
                    .upgrade()
                    .is_some_and(|shared| Heap { shared }.is_preserved(pfn))
            }
            // Asked at every sampled allocation, under the pool lock: never
            // wait for the preserved map.
            fn try_is_preserved(&self, pfn: Pfn) -> Option<bool> {
                let shared = self.0.upgrade()?;
                Heap { shared }.try_is_preserved(pfn)
            }
        }
        let query = Box::new(PoolPages(Arc::downgrade(&self.shared)));
        // Not set yet (checked above under ENABLE).
        owned::kfence_sampler(s, query, mode, config)
    }

    /// The KFENCE sampler, if enabled.
    pub fn kfence(&self) -> Option<&Sampler> {
        self.shared.kfence.get()
    }

    /// Arena size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.arena.size()
    }

    /// The arena, for the crate's KFENCE pool.
    #[allow(dead_code)] // used by the KFENCE pool
    pub(crate) fn arena(&self) -> &Arena {
        &self.shared.arena
    }

    /// Generation of the arena's current superblock.
    pub fn generation(&self) -> u64 {
        self.shared.arena.generation()
    }

    /// Location of the arena's committed image, if any.
    pub fn current_image(&self) -> Option<ImageLocation> {
        self.shared.arena.current_image()
    }

    /// Counters.
    pub fn stats(&self) -> HeapStats {
        HeapStats {
            general: self.shared.general.stats(),
            preservable: self.shared.preservable.stats(),
            preserved_folios: lock(&self.shared.preserved).folio_count(),
        }
    }

    /// The heap's id, as recorded in its handles.
    pub(crate) fn id(&self) -> u32 {
        self.shared.id
    }

    fn check_heap(&self, heap: u32) -> Result<()> {
        self.shared.check_heap(heap)
    }

    // ---- pages -------------------------------------------------------

    /// Allocate a folio of `order`: from the preservable pool with
    /// [`GfpFlags::PRESERVE`], from general memory otherwise.
    pub fn alloc_pages(&self, order: Order, flags: GfpFlags) -> Result<Pages> {
        let zone = if flags.contains(GfpFlags::PRESERVE) {
            &self.shared.preservable
        } else {
            &self.shared.general
        };
        let pfn = zone.alloc(order, flags.contains(GfpFlags::NOWAIT))?;
        let mut pages = Pages {
            folio: Folio { pfn, order },
            heap: self.shared.id,
        };
        if flags.contains(GfpFlags::ZERO) {
            owned::pages_mut(&self.shared, &mut pages)?.fill(0);
        }
        Ok(pages)
    }

    /// Free a folio. Whatever was preserved inside it is unpreserved first.
    pub fn free_pages(&self, pages: Pages) -> Result<()> {
        self.check_heap(pages.heap)?;
        self.release(pages.folio)
    }

    /// Free a folio handed back by its owner, unpreserving every preserved
    /// folio inside it first (under the map lock, so that no preserve of
    /// it can slip in between).
    fn release(&self, f: Folio) -> Result<()> {
        if self.shared.preserved_count.load(Ordering::Acquire) == 0 {
            return self.free_folio(f);
        }
        let end = f.pfn.folio_end(f.order).ok_or(Error::NotAllocated {
            addr: f.pfn.addr().map_or(u64::MAX, |a| a.0),
            expected: "a folio inside the arena",
        })?;
        self.with_map(|m| {
            let mut inside = Vec::new();
            let mut at = f.pfn;
            while let Some(p) = m.first_overlap(at, end) {
                if p.pfn < f.pfn || p.end_pfn() > end {
                    return Err(Error::Inconsistent {
                        addr: p.addr().0,
                        what: "preserved folio straddles the freed folio",
                        expected: f.pfn.0,
                        found: p.pfn.0,
                    });
                }
                inside.push(p);
                at = p.end_pfn();
            }
            for p in inside {
                m.unpreserve(p.pfn, p.order)?;
            }
            self.free_folio(f)
        })
    }

    fn free_folio(&self, f: Folio) -> Result<()> {
        let zone = self.shared.zone_of(f.pfn).ok_or(Error::NotAllocated {
            addr: f.addr().0,
            expected: "a folio of the general or preservable zone",
        })?;
        let max = zone.max_order();
        if f.order <= max {
            zone.free(f.pfn, false)?;
        } else {
            // Restored folios above the zone's order were claimed as
            // several maximal blocks.
            let mut p = f.pfn.0;
            while p < f.end_pfn().0 {
                zone.free(Pfn(p), false)?;
                p += max.pages();
            }
        }
        Ok(())
    }

    /// The bytes of a folio.
    pub fn page_bytes<'a>(&'a self, pages: &'a Pages) -> Result<&'a [u8]> {
        owned::pages(&self.shared, pages)
    }

    /// The bytes of a folio, writable.
    pub fn page_bytes_mut<'a>(&'a self, pages: &'a mut Pages) -> Result<&'a mut [u8]> {
        owned::pages_mut(&self.shared, pages)
    }

    // ---- objects -----------------------------------------------------

    /// Allocate `size` bytes: from the general size classes, from the
    /// preservable size classes with [`GfpFlags::PRESERVE`], or as a whole
    /// folio above 4 KiB. An object is aligned as its size class: to the
    /// class size for powers of two up to 64 bytes, to 8 bytes otherwise,
    /// to a page above 4 KiB; sampled objects alike.
    ///
    /// This is the single entry point of general object allocation: the
    /// KFENCE sampling hook belongs at its top (never for `PRESERVE`).
    #[inline]
    pub fn alloc(&self, size: usize, flags: GfpFlags) -> Result<Obj> {
        // Unsampled fast path: one relaxed load of the process-wide "some
        // gate is open" count, before touching this heap's sampler.
        if kfence::may_sample() {
            if let Some(obj) = self.alloc_sampled(size, flags) {
                return Ok(obj);
            }
        }
        if size > MAX_OBJECT_SIZE as usize {
            return self.alloc_large(size, flags);
        }
        let class = class_of(size);
        let preserve = flags.contains(GfpFlags::PRESERVE);
        let index = if preserve { NCLASSES + class } else { class };
        let mut obj = if preserve || flags.contains(GfpFlags::NOWAIT) {
            self.alloc_locked(index as u16, flags)?
        } else {
            self.alloc_magazine(class)?
        };
        obj.len = size.max(1) as u32;
        if flags.contains(GfpFlags::ZERO) {
            owned::obj_mut(&self.shared, &mut obj)?.fill(0);
        }
        if preserve {
            owned::zero_slack(&self.shared, &mut obj)?;
        }
        Ok(obj)
    }

    /// Ask the KFENCE sampler's gate; `None` when there is no sampler or
    /// the gate does not let the request through (the fast path: a
    /// countdown step in count mode), otherwise see `alloc_passed`.
    #[inline(never)]
    fn alloc_sampled(&self, size: usize, flags: GfpFlags) -> Option<Obj> {
        let k = self.shared.kfence.get()?;
        let pass = k.pass()?;
        self.alloc_passed(k, pass, size, flags)
    }

    /// A request the KFENCE sampler's gate let through: `None` when the
    /// request is not eligible (`PRESERVE`, or `NOWAIT`: a sampled
    /// allocation captures a stack, which may block) or the pool cannot
    /// serve it. The object gets its size class's alignment, as an
    /// unsampled one would.
    #[cold]
    #[inline(never)]
    fn alloc_passed(
        &self,
        k: &Sampler,
        pass: kfence::Pass,
        size: usize,
        flags: GfpFlags,
    ) -> Option<Obj> {
        let preserve = flags.contains(GfpFlags::PRESERVE);
        let nowait = flags.contains(GfpFlags::NOWAIT);
        let addr = k.alloc_phys(pass, size.max(1), alloc_align(size), preserve, nowait)?;
        Some(Obj {
            addr: addr.raw(),
            heap: self.shared.id,
            slab: 0,
            len: size.max(1) as u32,
            tag: tag(0, KIND_KFENCE, 0),
        })
    }

    fn alloc_large(&self, size: usize, flags: GfpFlags) -> Result<Obj> {
        let max = self.layout().max_order.bytes().min(u64::from(u32::MAX));
        let too_big = Error::BadSize {
            size: size as u64,
            align: PAGE_SIZE,
            max,
        };
        let len = u32::try_from(size).map_err(|_| too_big)?;
        let pages = u64::from(len).div_ceil(PAGE_SIZE);
        let order = u8::try_from(64 - (pages - 1).leading_zeros())
            .ok()
            .and_then(Order::new)
            .filter(|o| *o <= self.layout().max_order)
            .ok_or(Error::BadSize {
                size: size as u64,
                align: PAGE_SIZE,
                max,
            })?;
        let p = self.alloc_pages(order, flags)?;
        let obj = Obj {
            addr: p.folio.addr().0,
            heap: self.shared.id,
            slab: 0,
            len,
            tag: tag(0, KIND_LARGE, order.get()),
        };
        // The folio now belongs to the object handle.
        p.leak();
        Ok(obj)
    }

    fn alloc_locked(&self, index: u16, flags: GfpFlags) -> Result<Obj> {
        let s = &self.shared;
        let cache = s.cache(index).ok_or(Error::InvalidConfig {
            what: "cache index",
            value: u64::from(index),
            limit: MAX_CACHES as u64,
        })?;
        let mut out = Vec::with_capacity(1);
        cache.alloc_batch(
            s.zone_for(cache),
            flags.contains(GfpFlags::NOWAIT),
            1,
            &mut out,
        )?;
        let (addr, slab) = out.pop().ok_or(Error::OutOfMemory {
            order: cache.order.get(),
            zone: s.zone_for(cache).name(),
        })?;
        Ok(Obj {
            addr,
            heap: s.id,
            slab,
            len: cache.size,
            tag: tag(index, KIND_SLAB, 0),
        })
    }

    #[inline]
    fn alloc_magazine(&self, class: usize) -> Result<Obj> {
        let s = &self.shared;
        let got = magazine::with(&self.shared, NCLASSES, |tc| {
            let mag = &mut tc.mags[class];
            if mag.is_empty() {
                let cache = s.caches[class].get()?;
                cache
                    .alloc_batch(&s.general, false, magazine::MAG_BATCH, mag)
                    .ok()?;
            }
            mag.pop()
        });
        match got {
            Some(Some((addr, slab))) => Ok(Obj {
                addr,
                heap: s.id,
                slab,
                len: SIZE_CLASSES[class],
                tag: tag(class as u16, KIND_SLAB, 0),
            }),
            // No thread-local storage, or the refill failed: the locked
            // path reports the precise error.
            _ => self.alloc_locked(class as u16, GfpFlags::NONE),
        }
    }

    /// Free an object from [`alloc`](Self::alloc) or a cache.
    ///
    /// The single entry point of general object free: the KFENCE hook
    /// (recognising a sampled object by its handle's kind) belongs at its top.
    #[inline]
    pub fn free(&self, obj: Obj) -> Result<()> {
        // Fast path: a general size-class object of this heap goes to the
        // thread's magazine. KFENCE, large and preservable objects, and a
        // thread without usable thread-local storage, take `free_slow`.
        if obj.heap == self.shared.id
            && obj.kind() == KIND_SLAB
            && usize::from(obj.cache()) < NCLASSES
        {
            let class = usize::from(obj.cache());
            let full = magazine::with(&self.shared, NCLASSES, |tc| {
                let mag = &mut tc.mags[class];
                mag.push((obj.addr, obj.slab));
                mag.len() >= magazine::MAG_CAP
            });
            match full {
                Some(false) => return Ok(()),
                Some(true) => {
                    self.spill_magazine(class);
                    return Ok(());
                }
                None => {}
            }
        }
        self.free_slow(obj)
    }

    /// Give half of a full magazine back to its cache.
    #[cold]
    #[inline(never)]
    fn spill_magazine(&self, class: usize) {
        let s = &self.shared;
        let spill = magazine::with(s, NCLASSES, |tc| {
            let mag = &mut tc.mags[class];
            mag.drain(magazine::MAG_CAP / 2..).collect::<Vec<_>>()
        });
        if let Some(mut spill) = spill {
            s.flush_magazine(class, &mut spill);
        }
    }

    #[inline(never)]
    fn free_slow(&self, obj: Obj) -> Result<()> {
        self.check_heap(obj.heap)?;
        if obj.kind() == KIND_KFENCE {
            let k = self.shared.kfence.get().ok_or(Error::NotAllocated {
                addr: obj.addr,
                expected: "a KFENCE object",
            })?;
            // Bugs found on free were reported to the pool's sink.
            // `obj` is consumed: no slice `bytes` gave out outlives it.
            return k.free_phys(obj.addr()).map_err(|r| Error::KfenceReport {
                addr: obj.addr,
                title: r.title().to_owned(),
            });
        }
        let s = &self.shared;
        if obj.kind() == KIND_LARGE {
            let order = Order::new(obj.order()).unwrap_or(Order::ZERO);
            return self.release(Folio {
                pfn: PhysAddr(obj.addr).pfn(),
                order,
            });
        }
        let cache = s.cache(obj.cache()).ok_or(Error::NotAllocated {
            addr: obj.addr,
            expected: "an object of a known cache",
        })?;
        if let Some(pfn) = cache.free(obj.addr, obj.slab)? {
            s.zone_for(cache).free(pfn, false)?;
        }
        Ok(())
    }

    /// The bytes of an object.
    pub fn bytes<'a>(&'a self, obj: &'a Obj) -> Result<&'a [u8]> {
        owned::obj(&self.shared, obj)
    }

    /// The bytes of an object, writable.
    pub fn bytes_mut<'a>(&'a self, obj: &'a mut Obj) -> Result<&'a mut [u8]> {
        owned::obj_mut(&self.shared, obj)
    }

    /// A zerocopy view of an object as `T`.
    pub fn view<'a, T>(&'a self, obj: &'a Obj) -> Result<&'a T>
    where
        T: zerocopy::FromBytes + zerocopy::KnownLayout + zerocopy::Immutable,
    {
        let bytes = self.bytes(obj)?;
        T::ref_from_prefix(bytes)
            .map(|(t, _)| t)
            .map_err(|_| Error::BadSize {
                size: bytes.len() as u64,
                align: core::mem::align_of::<T>() as u64,
                max: core::mem::size_of::<T>() as u64,
            })
    }

    /// A mutable zerocopy view of an object as `T`.
    pub fn view_mut<'a, T>(&'a self, obj: &'a mut Obj) -> Result<&'a mut T>
    where
        T: zerocopy::FromBytes + zerocopy::IntoBytes + zerocopy::KnownLayout,
    {
        let bytes = self.bytes_mut(obj)?;
        let len = bytes.len() as u64;
        T::mut_from_prefix(bytes)
            .map(|(t, _)| t)
            .map_err(|_| Error::BadSize {
                size: len,
                align: core::mem::align_of::<T>() as u64,
                max: core::mem::size_of::<T>() as u64,
            })
    }

    /// The named preservable cache, created on first use. A name already
    /// in use (or restored) must come with the same geometry.
    pub fn cache(&self, name: &str, size: u32, align: u32) -> Result<PreservableCache> {
        let s = &self.shared;
        let (stride, order, per_slab) =
            crate::slab::geometry(size, align, self.layout().max_order)?;
        // One critical section from lookup to registration: two threads
        // asking for a new name get one cache.
        let mut names = lock(&s.names);
        let existing = names.get(name).copied();
        let index = match existing {
            Some(i) => {
                let c = s.cache(i).ok_or(Error::InvalidConfig {
                    what: "cache index",
                    value: u64::from(i),
                    limit: MAX_CACHES as u64,
                })?;
                let mismatch = |what, expected: u64, found: u64| Error::CacheMismatch {
                    name: name.to_owned(),
                    what,
                    expected,
                    found,
                };
                if !c.preservable {
                    return Err(mismatch("preservable", 1, 0));
                }
                if c.stride != stride {
                    return Err(mismatch("object stride", c.stride.into(), stride.into()));
                }
                if c.align != align {
                    return Err(mismatch("align", c.align.into(), align.into()));
                }
                if c.order != order || c.per_slab != per_slab {
                    return Err(mismatch(
                        "slab order",
                        c.order.get().into(),
                        order.get().into(),
                    ));
                }
                i
            }
            None => {
                let c = SlabCache::new(
                    0,
                    name.to_owned(),
                    size,
                    align,
                    self.layout().max_order,
                    true,
                )?;
                s.register_named(&mut names, None, c)?
            }
        };
        drop(names);
        Ok(PreservableCache {
            shared: Arc::clone(&self.shared),
            index,
        })
    }

    // ---- preservation ------------------------------------------------
    //
    // The rule: what is preserved lies inside folios handed to owners
    // (`alloc_pages`, objects above 4 KiB, restored folios), never in free
    // pages, slab pages (their other slots belong to other users;
    // preservable slabs are recorded at freeze) or the heap's own image.
    // Each preserved folio lies inside one owner's folio, so freeing that
    // folio unpreserves exactly what was preserved in it. The map lock is
    // held across each check and change, and across the unpreserve and
    // free of a folio, so the two cannot interleave.

    /// The folios handed to owners that tile pages `[first, end)`, by
    /// address. Refuses superblock, scratch and KFENCE pages, pages past
    /// the arena, and pages in no owner's folio.
    fn owned_folios(&self, first: Pfn, end: Pfn, addr: u64, len: u64) -> Result<Vec<Folio>> {
        let layout = self.layout();
        if end.0 > layout.pages || first > end {
            return Err(Error::OutOfBounds {
                offset: addr,
                len,
                size: self.size(),
            });
        }
        for (region, r) in layout.regions() {
            if matches!(
                region,
                Region::Superblock | Region::Scratch | Region::Kfence
            ) && first < r.end
                && r.start < end
            {
                return Err(Error::PreserveRefused {
                    addr,
                    len,
                    pfn: first.max(r.start).0,
                    region: region.name(),
                });
            }
        }
        let s = &self.shared;
        let refuse = |pfn: Pfn, found| Error::NotPreservable {
            addr,
            len,
            pfn: pfn.0,
            found,
        };
        let mut out = Vec::new();
        let mut covered = 0;
        for zone in [&s.preservable, &s.general] {
            covered += zone.pages_in(first, end);
            out.extend(
                zone.owned_folios(first, end)
                    .map_err(|(pfn, found)| refuse(pfn, found))?,
            );
        }
        if covered != end.0 - first.0 {
            return Err(refuse(first, "outside the allocator's zones"));
        }
        if let Some(image) = *lock(&s.image) {
            if out.iter().any(|f| f.pfn == image.pfn) {
                return Err(refuse(image.pfn, "the heap's handover image"));
            }
        }
        out.sort_unstable_by_key(|f| f.pfn);
        Ok(out)
    }

    /// Run `f` on the preserved map under its lock, keeping the lock-free
    /// folio count in step.
    fn with_map<T>(&self, f: impl FnOnce(&mut PreservedMap) -> Result<T>) -> Result<T> {
        let mut map = lock(&self.shared.preserved);
        let r = f(&mut map);
        self.shared
            .preserved_count
            .store(map.folio_count(), Ordering::Release);
        r
    }

    /// Preserve `folio`, which must lie in folios handed to owners; with
    /// `whole` (the caller holds the handle of exactly this folio) it may
    /// span several (a restored folio above the zone's order), otherwise it
    /// must lie inside one.
    fn preserve_owned(&self, folio: Folio, whole: bool) -> Result<()> {
        let addr = folio.pfn.addr().map_or(u64::MAX, |a| a.0);
        let len = folio.order.bytes();
        let end = folio.pfn.folio_end(folio.order).ok_or(Error::OutOfBounds {
            offset: addr,
            len,
            size: self.size(),
        })?;
        if !folio.pfn.is_aligned(folio.order) {
            return Err(kho_core::MapError::Misaligned {
                pfn: folio.pfn.0,
                order: folio.order.get(),
            }
            .into());
        }
        self.with_map(|m| {
            let owned = self.owned_folios(folio.pfn, end, addr, len)?;
            if !whole {
                if let Some(second) = owned.get(1) {
                    return Err(Error::NotPreservable {
                        addr,
                        len,
                        pfn: second.pfn.0,
                        found: "in a second allocation (preserve each on its own)",
                    });
                }
            }
            Ok(m.preserve(folio.pfn, folio.order)?)
        })
    }

    /// Preserve an allocated folio across the next handover. Freeing it
    /// unpreserves it.
    pub fn preserve_pages(&self, pages: &Pages) -> Result<()> {
        self.check_heap(pages.heap)?;
        self.preserve_owned(pages.folio, true)
    }

    /// Preserve an object across the next handover: the folio of an object
    /// above 4 KiB (in the preservable pool with [`GfpFlags::PRESERVE`],
    /// the successor finds it in [`Restored::folios`]); nothing for an
    /// object of a preservable cache, whose slab pages every freeze
    /// preserves. Objects of the general size classes share their pages
    /// with other users' objects and are refused, as are sampled objects.
    /// Freeing the object unpreserves it.
    pub fn preserve_obj(&self, obj: &Obj) -> Result<()> {
        self.check_heap(obj.heap)?;
        match self.owned_folio_of(obj)? {
            Some(folio) => self.preserve_owned(folio, true),
            None => Ok(()),
        }
    }

    /// Undo [`preserve_obj`](Self::preserve_obj).
    pub fn unpreserve_obj(&self, obj: &Obj) -> Result<()> {
        self.check_heap(obj.heap)?;
        match self.owned_folio_of(obj)? {
            Some(folio) => self.unpreserve_folio(folio),
            None => Ok(()),
        }
    }

    /// The folio an object owns (objects above 4 KiB), `None` for objects
    /// of preservable caches; an error for objects that cannot be
    /// preserved.
    fn owned_folio_of(&self, obj: &Obj) -> Result<Option<Folio>> {
        let refuse = |found| Error::NotPreservable {
            addr: obj.addr,
            len: u64::from(obj.len),
            pfn: obj.addr().pfn().0,
            found,
        };
        match obj.kind() {
            KIND_LARGE => Ok(Some(Folio {
                pfn: obj.addr().pfn(),
                order: Order::new(obj.order()).unwrap_or(Order::ZERO),
            })),
            KIND_SLAB => match self.shared.cache(obj.cache()) {
                Some(c) if c.preservable => Ok(None),
                _ => Err(refuse("a slab page of a general size class")),
            },
            _ => Err(refuse("a sampled (KFENCE) object")),
        }
    }

    /// Preserve the folio `folio` of arena memory, which must lie inside
    /// one folio handed to an owner (see [`preserve_range`]). Scratch,
    /// KFENCE and superblock memory is refused with
    /// [`Error::PreserveRefused`], free pages, slab pages and the heap's
    /// own image with [`Error::NotPreservable`].
    ///
    /// [`preserve_range`]: Self::preserve_range
    pub fn preserve_folio(&self, folio: Folio) -> Result<()> {
        self.preserve_owned(folio, false)
    }

    /// The first and end PFNs of a page-aligned `range` of the arena.
    fn range_pfns(&self, range: PhysRange) -> Result<(Pfn, Pfn)> {
        if !range.is_page_aligned() {
            return Err(kho_core::MapError::Unaligned {
                start: range.start,
                len: range.len,
            }
            .into());
        }
        range.pfns().ok_or_else(|| self.out_of_bounds(range))
    }

    fn out_of_bounds(&self, range: PhysRange) -> Error {
        Error::OutOfBounds {
            offset: range.start,
            len: range.len,
            size: self.size(),
        }
    }

    /// Preserve the page-aligned `range`, split into maximal folios at the
    /// boundaries of the allocations it covers. Every page must belong to a
    /// folio handed to an owner ([`alloc_pages`](Self::alloc_pages), an
    /// object above 4 KiB, a restored folio); freeing one of them
    /// unpreserves the part of `range` inside it. All or nothing.
    pub fn preserve_range(&self, range: PhysRange) -> Result<()> {
        let (first, end) = self.range_pfns(range)?;
        self.with_map(|m| {
            let owned = self.owned_folios(first, end, range.start, range.len)?;
            if let Some(f) = m.first_overlap(first, end) {
                return Err(kho_core::MapError::Overlap {
                    pfn: first.0,
                    order: 0,
                    existing_pfn: f.pfn.0,
                    existing_order: f.order.get(),
                }
                .into());
            }
            for o in owned {
                let lo = o.pfn.max(first);
                let hi = o.end_pfn().min(end);
                let start = lo.addr().ok_or_else(|| self.out_of_bounds(range))?;
                m.preserve_range(start, (hi.0 - lo.0) * PAGE_SIZE)?;
            }
            Ok(())
        })
    }

    /// Undo [`preserve_folio`](Self::preserve_folio).
    pub fn unpreserve_folio(&self, folio: Folio) -> Result<()> {
        self.with_map(|m| Ok(m.unpreserve(folio.pfn, folio.order)?))
    }

    /// Undo [`preserve_range`](Self::preserve_range): every page of the
    /// page-aligned `range` must be preserved, by folios lying inside it.
    /// All or nothing.
    pub fn unpreserve_range(&self, range: PhysRange) -> Result<()> {
        let (first, end) = self.range_pfns(range)?;
        self.with_map(|m| {
            let mut folios = Vec::new();
            let mut at = first;
            while at < end {
                match m.first_overlap(at, end) {
                    Some(f) if f.pfn == at && f.end_pfn() <= end => {
                        folios.push(f);
                        at = f.end_pfn();
                    }
                    _ => {
                        return Err(kho_core::MapError::NotPreserved {
                            pfn: at.0,
                            order: 0,
                        }
                        .into())
                    }
                }
            }
            for f in folios {
                m.unpreserve(f.pfn, f.order)?;
            }
            Ok(())
        })
    }

    /// Whether `pfn` is preserved or will be at the next freeze: inside a
    /// folio given to `preserve_*`, or anywhere in the preservable pool
    /// (whose slab pages are preserved at freeze). The KFENCE pool must
    /// never contain such a page. May wait for the map lock; see
    /// [`try_is_preserved`](Self::try_is_preserved).
    pub fn is_preserved(&self, pfn: Pfn) -> bool {
        if let Some(known) = self.preserved_fast(pfn) {
            return known;
        }
        lock(&self.shared.preserved).is_preserved(pfn).is_some()
    }

    /// [`is_preserved`](Self::is_preserved) without waiting: `None` when
    /// the map is busy (being changed, or copied by a freeze). Callers in
    /// contexts that must not block (the KFENCE sampler) treat `None` as
    /// "preserved".
    pub fn try_is_preserved(&self, pfn: Pfn) -> Option<bool> {
        if let Some(known) = self.preserved_fast(pfn) {
            return Some(known);
        }
        let map = match self.shared.preserved.try_lock() {
            Ok(m) => m,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(map.is_preserved(pfn).is_some())
    }

    /// The answers of `is_preserved` that need no lock.
    #[inline]
    fn preserved_fast(&self, pfn: Pfn) -> Option<bool> {
        match self.region_of(pfn) {
            Some(Region::Preservable) => Some(true),
            // `preserve_*` refuses every other region.
            Some(Region::General) => None,
            _ => Some(false),
        }
        .or_else(|| (self.shared.preserved_count.load(Ordering::Acquire) == 0).then_some(false))
    }

    /// Declare `range` (inside preserved memory) valid for checkers.
    pub fn add_extent(&self, range: PhysRange, tag: u32) {
        lock(&self.shared.extents).push(Extent { range, tag });
    }

    // ---- freeze ------------------------------------------------------

    /// Freeze: preserve every preservable slab page holding live objects,
    /// zero their free slots and tails, and write a handover image (MEMMAP,
    /// SCRATCH, KFENCE, SLAB, EXTENTS and `tree`) into a fresh folio of
    /// general memory, whose bytes past the image are zeroed. Nothing is
    /// published: pass the result to [`commit`](Self::commit) (or
    /// [`discard`](Self::discard)).
    ///
    /// Callers stop allocating from preservable caches for the duration
    /// (the blackout); each cache is locked while it is recorded.
    ///
    /// Freeze takes no lock that an allocation path holds for long and
    /// waits for no future work, but it allocates, in proportion to the
    /// metadata it writes and never to the data preserved: a copy of the
    /// preserved map (one 520-byte block per 4096 folios of an order), one
    /// record with its allocation bitmap per live preservable slab page,
    /// the image's section buffers, and one arena folio of general memory
    /// for the image.
    pub fn freeze(&self, tree: Option<&Tree>) -> Result<FrozenImage> {
        let s = &self.shared;
        let layout = *self.layout();
        let nonempty = |r: PhysRange| if r.is_empty() { Vec::new() } else { vec![r] };
        // Sampling stops for the handover (bounded: no allocation needed);
        // the pool's ranges go into the KFENCE section.
        let kfence_ranges = match s.kfence.get() {
            Some(k) => {
                k.disable();
                k.pool().ranges()
            }
            None => nonempty(layout.bytes_of(Region::Kfence)),
        };
        let mut map = lock(&s.preserved).clone();
        let mut stats = FreezeStats::default();
        let mut caches = Vec::new();
        let mut pages = Vec::new();
        for cache in s.caches.iter().filter_map(OnceLock::get) {
            if !cache.preservable {
                continue;
            }
            caches.push(SlabCacheInfo {
                id: u32::from(cache.index),
                name: cache.name.clone(),
                object_size: cache.stride,
                align: cache.align,
                objects_per_slab: cache.per_slab,
                order: cache.order,
            });
            let g = cache.lock();
            let mut pfns = Vec::new();
            for slab in g.slabs.iter() {
                if SlabCache::is_vacant(slab) || slab.free == cache.per_slab {
                    continue;
                }
                stats.scrubbed_bytes += owned::scrub_dead(s, cache, slab)?;
                stats.live_objects += u64::from(cache.per_slab - slab.free);
                pages.push(SlabPageInfo {
                    pfn: Pfn(slab.pfn),
                    cache_id: u32::from(cache.index),
                    order: cache.order,
                    object_size: cache.stride,
                    object_count: cache.per_slab,
                    first_offset: 0,
                    bitmap: slab.bitmap.to_vec(),
                });
                pfns.push(slab.pfn);
            }
            drop(g);
            stats.slab_pages += pfns.len() as u64;
            pfns.sort_unstable();
            let step = cache.order.pages();
            let mut i = 0;
            while i < pfns.len() {
                let mut j = i + 1;
                while j < pfns.len() && pfns[j] == pfns[j - 1] + step {
                    j += 1;
                }
                map.preserve_folios(Pfn(pfns[i]), cache.order, (j - i) as u64)?;
                i = j;
            }
        }
        let generation = s.arena.generation().wrapping_add(1);
        let mut builder = ImageBuilder::new(layout.size())
            .generation(generation)
            .memmap(&map)
            .scratch(nonempty(layout.bytes_of(Region::Scratch)))
            .kfence(kfence_ranges)
            .slab(caches, pages)
            .extents(lock(&s.extents).clone());
        if let Some(t) = tree {
            builder = builder.tree(t);
        }
        // The image lives in a folio that its own MEMMAP preserves, so a
        // successor claims it like any other preserved folio and a checker
        // can prove it lies in preserved memory. Preserving one more folio
        // adds at most one bitmap block, so size the folio for that first.
        let bound = builder.encoded_len() + BLOCK_SIZE as u64;
        let order = Order::covering(bound)
            .filter(|o| *o <= layout.max_order)
            .ok_or(Error::BadSize {
                size: bound,
                align: PAGE_SIZE,
                max: layout.max_order.bytes(),
            })?;
        let pfn = s.general.alloc(order, false)?;
        let folio = Folio { pfn, order };
        // From here on the folio is owned by `frozen`: every error below
        // drops it, which frees the folio.
        let mut frozen = FrozenImage {
            location: ImageLocation {
                offset: folio.addr().0,
                len: 0,
                crc: 0,
            },
            folio,
            generation,
            heap: s.id,
            stats,
            owner: Some(Arc::clone(s)),
        };
        map.preserve(pfn, order)?;
        builder = builder.memmap(&map);
        let len = builder.encoded_len();
        if len > order.bytes() {
            return Err(Error::BadSize {
                size: len,
                align: PAGE_SIZE,
                max: order.bytes(),
            });
        }
        let out = owned::frozen_folio_mut(s, &mut frozen)?;
        let (image, tail) = out.split_at_mut(len as usize);
        builder.write_to(image)?;
        // The rest of the folio is preserved with the image: no stale bytes
        // of its earlier owner cross the handover.
        tail.fill(0);
        let crc = crc32fast::hash(image);
        frozen.location.len = len;
        frozen.location.crc = crc;
        frozen.stats.image_len = len;
        frozen.stats.preserved_folios = map.folio_count();
        frozen.stats.preserved_bytes = map.total_bytes();
        fault::hit(FaultPoint::AfterImageWrite).map_err(Error::io("freeze"))?;
        Ok(frozen)
    }

    /// Publish a frozen image: `msync` it, then flip the superblock (see
    /// [`Arena::commit_image`]). The previous image's folio is freed.
    /// Returns the new generation.
    ///
    /// The image must record the generation the publish produces: one
    /// frozen before another commit is refused. On any error the previous
    /// generation stays current and the frozen image is discarded (its
    /// folio freed in the heap that froze it); once the superblock is
    /// published, commit does not fail.
    pub fn commit(&self, mut frozen: FrozenImage) -> Result<u64> {
        self.check_heap(frozen.heap)?;
        let generation = self
            .shared
            .arena
            .commit_image_as(frozen.location, frozen.generation)?;
        // Published: the folio now belongs to the committed image.
        frozen.owner = None;
        let old = lock(&self.shared.image).replace(frozen.folio);
        if let Some(old) = old {
            // The superblock no longer points at the old image. Its folio
            // came from the general zone; should the zone refuse it, the
            // only cost is that folio, not the published handover.
            let _ = self.shared.general.free(old.pfn, false);
        }
        Ok(generation)
    }

    /// Drop a frozen image without publishing it (cancel).
    pub fn discard(&self, mut frozen: FrozenImage) -> Result<()> {
        self.check_heap(frozen.heap)?;
        frozen.release()
    }

    /// Withdraw the committed handover: publish a superblock with no image
    /// (the next generation), then free the image's folio. A successor
    /// started after this finds no handover. On error the handover stays
    /// published and nothing is freed.
    pub fn withdraw(&self) -> Result<u64> {
        let generation = self.shared.arena.publish(None)?;
        if let Some(old) = lock(&self.shared.image).take() {
            // As in `commit`: only that folio is at stake.
            let _ = self.shared.general.free(old.pfn, false);
        }
        Ok(generation)
    }

    /// The bytes of a frozen image.
    pub fn frozen_bytes<'a>(&'a self, frozen: &'a FrozenImage) -> Result<&'a [u8]> {
        owned::frozen(&self.shared, frozen)
    }

    /// Freeze and commit in one step.
    pub fn freeze_and_commit(&self, tree: Option<&Tree>) -> Result<(u64, FreezeStats)> {
        let frozen = self.freeze(tree)?;
        let stats = frozen.stats;
        Ok((self.commit(frozen)?, stats))
    }

    // ---- restore -----------------------------------------------------

    /// Restore in a successor: validate the arena's image, claim every
    /// preserved folio as allocated, rebuild each preservable cache with
    /// its live objects at the same addresses, release everything else,
    /// and record in the superblock that the image was restored (a second
    /// restore of it is refused).
    ///
    /// Everything is checked before that record is written, so on error
    /// nothing in the arena has changed (a reopen can try again).
    pub fn restore(arena: Arena) -> Result<(Heap, Restored)> {
        match Self::restore_with(arena, |_| Ok::<(), std::convert::Infallible>(()), true) {
            Ok(r) => Ok(r),
            Err(refused) => match refused.error {
                RestoreError::Heap(e) => Err(e),
                RestoreError::Check(never) => match never {},
            },
        }
    }

    /// Record in the superblock that the restored image was consumed (see
    /// [`Arena::mark_restored`]).
    pub(crate) fn mark_restored(&self) -> Result<u64> {
        self.shared.arena.mark_restored()
    }

    /// [`restore`](Self::restore) with a caller's check of the validated
    /// image (run before any folio is claimed), and the superblock record
    /// only if `mark`. A refusal hands the arena back unchanged.
    pub(crate) fn restore_with<E>(
        arena: Arena,
        check: impl FnOnce(&Image<'_>) -> std::result::Result<(), E>,
        mark: bool,
    ) -> std::result::Result<(Heap, Restored), Box<Refused<E>>> {
        let refuse = |arena, e| {
            Err(Box::new(Refused {
                arena: Some(arena),
                error: RestoreError::Heap(e),
            }))
        };
        if !arena.is_writable() {
            return refuse(arena, Error::ReadOnly);
        }
        let sb = arena.superblock();
        if arena.image_restored() {
            return refuse(
                arena,
                Error::AlreadyRestored {
                    generation: sb.generation,
                },
            );
        }
        let Some(loc) = sb.image else {
            return refuse(arena, Error::NoImage);
        };
        let id = match Self::next_id() {
            Ok(id) => id,
            Err(e) => return refuse(arena, e),
        };
        // A heap that cannot be built over a validated superblock's layout
        // closes the arena unchanged.
        let shared = Self::build(arena, id, false).map_err(|e| {
            Box::new(Refused {
                arena: None,
                error: RestoreError::Heap(e),
            })
        })?;
        let restored = match Self::restore_into(&shared, loc, sb.generation, check) {
            Ok(r) => r,
            Err(error) => {
                return Err(Box::new(Refused {
                    arena: Some(shared.into_arena()),
                    error,
                }))
            }
        };
        if mark {
            if let Err(e) = shared.arena.mark_restored() {
                return refuse(shared.into_arena(), e);
            }
        }
        Ok((
            Heap {
                shared: Arc::new(shared),
            },
            restored,
        ))
    }

    /// The checks and claims of a restore, into a heap built over the
    /// arena. The image is parsed once, in place in the mapping (its pages
    /// are claimed, and nothing writes them).
    fn restore_into<E>(
        shared: &Shared,
        loc: ImageLocation,
        generation: u64,
        check: impl FnOnce(&Image<'_>) -> std::result::Result<(), E>,
    ) -> std::result::Result<Restored, RestoreError<E>> {
        let id = shared.id;
        let bytes = shared.arena.image_bytes()?;
        let image = Image::parse(bytes).map_err(Error::from)?;
        let layout = *shared.arena.layout();
        Self::check_geometry(&image, &layout, loc, generation)?;
        // The image must lie in a folio its own MEMMAP preserves, headed at
        // the image's first page and covering all of it; the loop below
        // claims it with the other preserved folios.
        let img_folio = PhysAddr(loc.offset)
            .aligned_pfn()
            .and_then(|pfn| image.is_preserved(pfn))
            .filter(|&(head, order)| {
                head.addr() == Some(PhysAddr(loc.offset)) && order.bytes() >= loc.len
            })
            .map(|(pfn, order)| Folio { pfn, order })
            .ok_or(Error::Inconsistent {
                addr: loc.offset,
                what: "image not in a preserved folio headed at its first page",
                expected: loc.len,
                found: 0,
            })?;
        if !shared.general.contains(img_folio.pfn)
            || !shared.general.contains(Pfn(img_folio.end_pfn().0 - 1))
        {
            return Err(Error::Inconsistent {
                addr: loc.offset,
                what: "image outside general memory",
                expected: layout.general.start.0,
                found: img_folio.pfn.0,
            }
            .into());
        }
        check(&image).map_err(RestoreError::Check)?;
        *lock(&shared.image) = Some(img_folio);

        let mut restorer = Restorer::new(&image);
        for f in restorer.restore_all() {
            let zone = shared
                .zone_of(f.pfn)
                .ok_or_else(|| Error::PreserveRefused {
                    addr: f.addr().0,
                    len: f.bytes(),
                    pfn: f.pfn.0,
                    region: layout.region_of(f.pfn).map_or("outside", Region::name),
                })?;
            zone.claim(f.pfn, f.order)?;
        }
        shared.general.release_reserved();
        shared.preservable.release_reserved();

        // Caches: map image ids to heap caches by name.
        let mut ids: HashMap<u32, (u16, usize)> = HashMap::new();
        let mut restored_caches: Vec<RestoredCache> = Vec::new();
        for c in image.slab_caches() {
            let known = lock(&shared.names).get(c.name()).copied();
            let index = match known {
                Some(i) => i,
                None => {
                    let cache = SlabCache::new(
                        0,
                        c.name().to_owned(),
                        c.object_size(),
                        c.align(),
                        layout.max_order,
                        true,
                    )?;
                    shared.register(None, cache)?
                }
            };
            let cache = shared.cache(index).ok_or(Error::Inconsistent {
                addr: 0,
                what: "cache slot",
                expected: 1,
                found: 0,
            })?;
            if !cache.preservable
                || cache.stride != c.object_size()
                || cache.per_slab != c.objects_per_slab()
                || cache.order != c.order()
            {
                return Err(RestoreError::Heap(Error::CacheMismatch {
                    name: c.name().to_owned(),
                    what: "object size",
                    expected: u64::from(cache.stride),
                    found: u64::from(c.object_size()),
                }));
            }
            ids.insert(c.id(), (index, restored_caches.len()));
            restored_caches.push(RestoredCache {
                name: c.name().to_owned(),
                object_size: cache.stride,
                align: cache.align,
                heap: id,
                cache: index,
                order: cache.order,
                per_slab: cache.per_slab,
                remaining: 0,
                slabs: Vec::new(),
            });
        }
        let mut slab_pfns = Vec::with_capacity(image.slab_pages().len());
        for p in image.slab_pages() {
            let pos = ids.get(&p.cache_id()).copied();
            let (index, rc) = pos.ok_or(Error::Inconsistent {
                addr: p.pfn().0 << kho_core::PAGE_SHIFT,
                what: "slab page of an unknown cache",
                expected: 0,
                found: u64::from(p.cache_id()),
            })?;
            let cache = shared.cache(index).ok_or(Error::Inconsistent {
                addr: 0,
                what: "cache slot",
                expected: 1,
                found: 0,
            })?;
            let inconsistent = |what, expected: u64, found: u64| Error::Inconsistent {
                addr: p.pfn().0 << kho_core::PAGE_SHIFT,
                what,
                expected,
                found,
            };
            if p.order() != cache.order {
                return Err(inconsistent(
                    "slab order",
                    cache.order.get().into(),
                    p.order().get().into(),
                )
                .into());
            }
            if p.object_count() != cache.per_slab
                || p.first_offset() != 0
                || p.object_size() != cache.stride
            {
                return Err(inconsistent(
                    "slab geometry",
                    cache.per_slab.into(),
                    p.object_count().into(),
                )
                .into());
            }
            if shared.preservable.allocated_order(p.pfn()) != Some(cache.order) {
                return Err(
                    inconsistent("slab page not a preserved folio of the pool", 1, 0).into(),
                );
            }
            let bitmap: Vec<u64> = p.bitmap_words().collect();
            let untaken: Box<[u64]> = bitmap.as_slice().into();
            let live: u32 = bitmap.iter().map(|w| w.count_ones()).sum();
            let slab = cache.adopt(&shared.preservable, p.pfn(), bitmap)?;
            slab_pfns.push(p.pfn());
            let rc = &mut restored_caches[rc];
            rc.remaining += live as usize;
            rc.slabs.push(RestoredSlab {
                pfn: p.pfn().0,
                slab,
                untaken,
            });
        }
        for rc in &mut restored_caches {
            // The writer sorts slab pages by PFN; do not rely on it for
            // `take`'s binary search.
            if !rc.slabs.windows(2).all(|w| w[0].pfn < w[1].pfn) {
                rc.slabs.sort_unstable_by_key(|s| s.pfn);
            }
        }
        slab_pfns.sort_unstable();
        let folios = image
            .folios()
            .filter(|f| f.pfn != img_folio.pfn && slab_pfns.binary_search(&f.pfn).is_err())
            .map(|folio| Pages { folio, heap: id })
            .collect();
        Ok(Restored {
            generation: image.header().generation,
            tree: image.tree().cloned(),
            extents: image.extents().collect(),
            caches: restored_caches,
            folios,
        })
    }

    /// The image describes this arena: size, page size, the generation the
    /// superblock published it under, and the arena's own scratch and
    /// KFENCE regions.
    fn check_geometry(
        image: &Image<'_>,
        layout: &Layout,
        loc: ImageLocation,
        generation: u64,
    ) -> Result<()> {
        let mismatch = |what, expected, found| {
            Err(Error::GeometryMismatch {
                what,
                expected,
                found,
            })
        };
        if image.arena_size() != layout.size() {
            return mismatch("image arena size", layout.size(), image.arena_size());
        }
        if image.header().page_shift != kho_core::PAGE_SHIFT {
            return mismatch(
                "image page shift",
                u64::from(kho_core::PAGE_SHIFT),
                u64::from(image.header().page_shift),
            );
        }
        if image.header().generation != generation {
            return Err(Error::Inconsistent {
                addr: loc.offset,
                what: "image generation differs from the superblock's",
                expected: generation,
                found: image.header().generation,
            });
        }
        let scratch = layout.bytes_of(Region::Scratch);
        let want: &[PhysRange] = if scratch.is_empty() { &[] } else { &[scratch] };
        let got: Vec<PhysRange> = image.scratch().collect();
        if got.len() != want.len() {
            return mismatch("image SCRATCH ranges", want.len() as u64, got.len() as u64);
        }
        for (w, g) in want.iter().zip(&got) {
            if w.start != g.start {
                return mismatch("image SCRATCH range start", w.start, g.start);
            }
            if w.len != g.len {
                return mismatch("image SCRATCH range length", w.len, g.len);
            }
        }
        // The pool may use part of the KFENCE region, never anything else.
        let kfence = layout.bytes_of(Region::Kfence);
        for r in image.kfence() {
            if r.start < kfence.start {
                return mismatch("image KFENCE range start", kfence.start, r.start);
            }
            let (end, limit) = (r.start.saturating_add(r.len), kfence.start + kfence.len);
            if end > limit {
                return mismatch("image KFENCE range end", limit, end);
            }
        }
        Ok(())
    }
}

/// Why a restore was refused.
#[derive(Debug)]
pub(crate) enum RestoreError<E> {
    /// The image or the arena.
    Heap(Error),
    /// The caller's check of the image.
    Check(E),
}

impl<E> From<Error> for RestoreError<E> {
    fn from(e: Error) -> Self {
        RestoreError::Heap(e)
    }
}

/// A refused restore: why, and the arena, unchanged (`None` only if no
/// heap could be built over it at all).
#[derive(Debug)]
pub(crate) struct Refused<E> {
    pub(crate) arena: Option<Arena>,
    pub(crate) error: RestoreError<E>,
}

impl PreservableCache {
    /// A named preservable cache of `heap` (same as [`Heap::cache`]).
    pub fn new(heap: &Heap, name: &str, size: u32, align: u32) -> Result<PreservableCache> {
        heap.cache(name, size, align)
    }

    fn inner(&self) -> Result<&SlabCache> {
        self.shared.cache(self.index).ok_or(Error::InvalidConfig {
            what: "cache index",
            value: u64::from(self.index),
            limit: MAX_CACHES as u64,
        })
    }

    /// Cache name.
    pub fn name(&self) -> &str {
        self.inner().map_or("", |c| c.name.as_str())
    }

    /// Object stride in bytes.
    pub fn object_size(&self) -> u32 {
        self.inner().map_or(0, |c| c.stride)
    }

    /// Live objects.
    pub fn live(&self) -> u64 {
        self.inner().map_or(0, SlabCache::live)
    }

    /// Allocate an object (only [`GfpFlags::ZERO`] and
    /// [`GfpFlags::NOWAIT`] matter; memory always comes from the pool).
    pub fn alloc(&self, flags: GfpFlags) -> Result<Obj> {
        let heap = Heap {
            shared: Arc::clone(&self.shared),
        };
        let mut obj = heap.alloc_locked(self.index, flags)?;
        let cache = self.inner()?;
        obj.len = cache.size;
        if flags.contains(GfpFlags::ZERO) {
            owned::obj_mut(&self.shared, &mut obj)?.fill(0);
        }
        owned::zero_slack(&self.shared, &mut obj)?;
        Ok(obj)
    }

    /// Free an object of this cache.
    pub fn free(&self, obj: Obj) -> Result<()> {
        if obj.cache() != self.index || obj.kind() != KIND_SLAB {
            return Err(Error::NotAllocated {
                addr: obj.addr,
                expected: "an object of this cache",
            });
        }
        Heap {
            shared: Arc::clone(&self.shared),
        }
        .free(obj)
    }
}

#[cfg(test)]
#[path = "heap_tests.rs"]
mod tests;
