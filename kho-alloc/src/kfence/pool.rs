//! The guarded object pool.

use std::collections::VecDeque;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, TryLockError};
use std::time::Instant;

use kho_core::{PhysAddr, PhysRange, PAGE_SIZE};

use super::memory::PoolMemory;
use super::report::{
    self, Access, ObjView, ObjectInfo, Report, ReportKind, ReportSink, Side, Site,
};
use super::text::{AtomicText, Out};
use super::{stack, sys, KfenceError, Result, StderrSink, DEFAULT_OBJECTS};

const PAGE: usize = PAGE_SIZE as usize;
/// Largest object count of one pool.
const MAX_OBJECTS: usize = 1 << 16;
/// 8-byte words of stack text kept per stack (1.5 KiB).
const STACK_WORDS: usize = 192;
/// 8-byte words of cache name kept per object.
const CACHE_WORDS: usize = 4;
/// Faults recorded by the fault handler, awaiting delivery to the sink.
const PENDING_FAULTS: usize = 16;

/// Pool parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Object pages (each followed by a guard page, with one more guard page
    /// in front). Default 255, as in the kernel.
    pub objects: usize,
    /// Resolve allocation and free stacks to function names at capture time
    /// (slow; for tests and debugging). Otherwise stacks are return
    /// addresses with object-file offsets.
    pub symbolize_stacks: bool,
    /// Seed for left/right placement; 0 picks one from the clock.
    pub seed: u64,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            objects: DEFAULT_OBJECTS,
            symbolize_stacks: false,
            seed: 0,
        }
    }
}

impl PoolConfig {
    /// Pages a pool of `objects` objects occupies: `2 * objects + 1`.
    pub const fn pages_for(objects: usize) -> usize {
        objects.saturating_mul(2).saturating_add(1)
    }
}

/// The cache an object was allocated for, printed in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheTag(&'static str);

const SIZE_CLASS_NAMES: [&str; 10] = [
    "size-8",
    "size-16",
    "size-32",
    "size-64",
    "size-128",
    "size-256",
    "size-512",
    "size-1024",
    "size-2048",
    "size-4096",
];

impl CacheTag {
    /// A named cache. Names longer than 32 bytes are truncated in reports.
    pub const fn named(name: &'static str) -> Self {
        CacheTag(name)
    }

    /// The power-of-two general size class that serves `size` bytes
    /// (`size-8` … `size-4096`, or `size-large`).
    pub fn size_class(size: usize) -> Self {
        let name = size
            .max(8)
            .checked_next_power_of_two()
            .and_then(|p| SIZE_CLASS_NAMES.get(p.trailing_zeros() as usize - 3))
            .copied();
        CacheTag(name.unwrap_or("size-large"))
    }

    /// The cache name.
    pub const fn name(self) -> &'static str {
        self.0
    }
}

/// Life-cycle state of a pool slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ObjectState {
    /// Never allocated.
    Unused,
    /// Live.
    Allocated,
    /// Freed; its page is inaccessible until the slot is reused.
    Freed,
}

impl ObjectState {
    const fn from_u8(v: u8) -> ObjectState {
        match v {
            1 => ObjectState::Allocated,
            2 => ObjectState::Freed,
            _ => ObjectState::Unused,
        }
    }
}

/// Which edge of its page an object touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Starts at the page start: underflows hit the guard page on the left.
    Left,
    /// Ends at the page end (up to alignment): overflows hit the guard page
    /// on the right.
    Right,
}

const UNUSED: u8 = 0;
const ALLOCATED: u8 = 1;
const FREED: u8 = 2;

/// Per-object metadata, readable from the fault handler without locks.
pub(crate) struct Slot {
    state: AtomicU8,
    placement: AtomicU8,
    addr: AtomicUsize,
    size: AtomicUsize,
    cache: AtomicText<CACHE_WORDS>,
    alloc_tid: AtomicU64,
    alloc_ns: AtomicU64,
    free_tid: AtomicU64,
    free_ns: AtomicU64,
    alloc_stack: AtomicText<STACK_WORDS>,
    free_stack: AtomicText<STACK_WORDS>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            state: AtomicU8::new(UNUSED),
            placement: AtomicU8::new(0),
            addr: AtomicUsize::new(0),
            size: AtomicUsize::new(0),
            cache: AtomicText::new(),
            alloc_tid: AtomicU64::new(0),
            alloc_ns: AtomicU64::new(0),
            free_tid: AtomicU64::new(0),
            free_ns: AtomicU64::new(0),
            alloc_stack: AtomicText::new(),
            free_stack: AtomicText::new(),
        }
    }

    pub(crate) fn state(&self) -> ObjectState {
        ObjectState::from_u8(self.state.load(Ordering::Acquire))
    }
}

/// A slot as seen through [`ObjView`], with its index and arena offset.
pub(crate) struct SlotView<'a> {
    shared: &'a Shared,
    index: usize,
    slot: &'a Slot,
}

impl ObjView for SlotView<'_> {
    fn index(&self) -> usize {
        self.index
    }
    fn addr(&self) -> usize {
        self.slot.addr.load(Ordering::Relaxed)
    }
    fn phys(&self) -> u64 {
        self.shared.phys_of(self.addr()).map_or(0, PhysAddr::raw)
    }
    fn size(&self) -> usize {
        self.slot.size.load(Ordering::Relaxed)
    }
    fn cache(&self, out: &mut dyn Out) {
        self.slot.cache.emit(out);
    }
    fn alloc_info(&self) -> (u64, u64) {
        (
            self.slot.alloc_tid.load(Ordering::Relaxed),
            self.slot.alloc_ns.load(Ordering::Relaxed),
        )
    }
    fn alloc_stack(&self, out: &mut dyn Out) {
        self.slot.alloc_stack.emit(out);
    }
    fn free_info(&self) -> Option<(u64, u64)> {
        (self.slot.state() == ObjectState::Freed).then(|| {
            (
                self.slot.free_tid.load(Ordering::Relaxed),
                self.slot.free_ns.load(Ordering::Relaxed),
            )
        })
    }
    fn free_stack(&self, out: &mut dyn Out) {
        self.slot.free_stack.emit(out);
    }
}

/// Event counters.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) allocated: AtomicU64,
    pub(crate) allocs: AtomicU64,
    pub(crate) frees: AtomicU64,
    pub(crate) bugs: AtomicU64,
    pub(crate) skip_incompatible: AtomicU64,
    pub(crate) skip_capacity: AtomicU64,
    pub(crate) skip_busy: AtomicU64,
    pub(crate) skip_protect: AtomicU64,
    pub(crate) skip_excluded: AtomicU64,
    pub(crate) retired: AtomicU64,
}

/// Pool statistics, as the kernel's `/sys/kernel/debug/kfence/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Whether a sampler is currently feeding the pool.
    pub enabled: bool,
    /// Objects currently allocated.
    pub allocated: u64,
    /// Objects allocated since creation.
    pub total_allocs: u64,
    /// Objects freed since creation.
    pub total_frees: u64,
    /// Bugs reported (by free checks and by the fault handler).
    pub bugs: u64,
    /// Sampled requests refused because of their size or alignment, or
    /// because they must never block (`NOWAIT`).
    pub skipped_incompatible: u64,
    /// Sampled requests refused because no slot was free.
    pub skipped_capacity: u64,
    /// Sampled requests refused because another sampled allocation or a
    /// free held the pool (allocation never waits for it).
    pub skipped_busy: u64,
    /// Sampled requests refused because the object page could not be made
    /// accessible (`mprotect` failed, e.g. at the kernel's mapping limit).
    pub skipped_protect: u64,
    /// Sampled requests refused because they asked for preservable memory,
    /// or because the slot's page was no longer general or KFENCE memory,
    /// or could not be checked without blocking.
    pub skipped_excluded: u64,
    /// Slots taken out of use for good because their page was found to be
    /// no longer general or KFENCE memory.
    pub retired: u64,
}

/// States of a [`PendingFault`].
const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const FULL: u8 = 2;
const READING: u8 = 3;

/// A fault recorded by the handler, awaiting delivery to the sink.
pub(crate) struct PendingFault {
    /// [`EMPTY`], [`WRITING`], [`FULL`] or [`READING`].
    state: AtomicU8,
    addr: AtomicUsize,
    ip: AtomicUsize,
    /// Encoded [`Fault`].
    code: AtomicU64,
}

/// What the fault handler decided about a pool fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fault {
    pub(crate) kind: ReportKind,
    pub(crate) slot: Option<usize>,
}

impl Fault {
    fn encode(self) -> u64 {
        let access = |a: Access| match a {
            Access::Read => 0u64,
            Access::Write => 1,
            Access::Unknown => 2,
        };
        let slot = self.slot.map_or(0, |s| s as u64 + 1) & 0x1_ffff;
        let (code, access_bits, side, distance) = match self.kind {
            ReportKind::OutOfBounds {
                access: a,
                side,
                distance,
            } => (
                1u64,
                access(a),
                u64::from(side == Side::Right),
                distance as u64,
            ),
            ReportKind::UseAfterFree { access: a } => (2, access(a), 0, 0),
            _ => (3, access(self.kind_access()), 0, 0),
        };
        code | access_bits << 2 | side << 4 | slot << 5 | (distance & 0xffff_ffff) << 22
    }

    fn kind_access(self) -> Access {
        match self.kind {
            ReportKind::InvalidAccess { access } => access,
            _ => Access::Unknown,
        }
    }

    fn decode(v: u64) -> Fault {
        let access = match (v >> 2) & 3 {
            0 => Access::Read,
            1 => Access::Write,
            _ => Access::Unknown,
        };
        let slot = ((v >> 5) & 0x1_ffff).checked_sub(1).map(|s| s as usize);
        let kind = match v & 3 {
            1 => ReportKind::OutOfBounds {
                access,
                side: if (v >> 4) & 1 == 1 {
                    Side::Right
                } else {
                    Side::Left
                },
                distance: (v >> 22) as usize,
            },
            2 => ReportKind::UseAfterFree { access },
            _ => ReportKind::InvalidAccess { access },
        };
        Fault { kind, slot }
    }
}

/// The part of a pool the fault handler sees: addresses, slot metadata and
/// counters, all readable without locks or allocation.
pub(crate) struct Shared {
    pub(crate) base: usize,
    pub(crate) len: usize,
    phys_base: u64,
    objects: usize,
    slots: Box<[Slot]>,
    /// Guard pages the handler made accessible in report-only mode.
    guard_open: Box<[AtomicBool]>,
    pub(crate) counters: Counters,
    /// Samplers currently enabled over this pool.
    pub(crate) feeders: AtomicUsize,
    /// Whether the fault handler was ever given this pool, so that dropping
    /// it must wait for handlers that may still be reading it.
    pub(crate) registered: AtomicBool,
    pending: Box<[PendingFault]>,
    epoch: Instant,
}

impl Shared {
    /// Whether `addr` lies in the pool (guards included).
    #[inline]
    pub(crate) fn contains(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.base) < self.len
    }

    fn phys_of(&self, addr: usize) -> Option<PhysAddr> {
        let off = addr.checked_sub(self.base)?;
        if off >= self.len {
            return None;
        }
        PhysAddr(self.phys_base).checked_add(off as u64)
    }

    fn page_addr(&self, page: usize) -> usize {
        self.base + page * PAGE
    }

    fn object_page(&self, slot: usize) -> usize {
        self.page_addr(2 * slot + 1)
    }

    fn view(&self, index: usize) -> Option<SlotView<'_>> {
        self.slots.get(index).map(|slot| SlotView {
            shared: self,
            index,
            slot,
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Classifies a fault at `addr` (async-signal-safe). `None` if the
    /// address is not in the pool.
    pub(crate) fn classify_fault(&self, addr: usize, access: Access) -> Option<Fault> {
        if !self.contains(addr) {
            return None;
        }
        let page = (addr - self.base) / PAGE;
        if page % 2 == 1 {
            let slot = page / 2;
            let state = self.slots.get(slot)?.state();
            let kind = if state == ObjectState::Freed {
                ReportKind::UseAfterFree { access }
            } else {
                ReportKind::InvalidAccess { access }
            };
            return Some(Fault {
                kind,
                slot: Some(slot),
            });
        }
        // A guard page: blame the nearest allocated neighbour.
        Some(
            match self.neighbour(addr, |st| st == ObjectState::Allocated) {
                Some((slot, side, distance)) => Fault {
                    kind: ReportKind::OutOfBounds {
                        access,
                        side,
                        distance,
                    },
                    slot: Some(slot),
                },
                None => Fault {
                    kind: ReportKind::InvalidAccess { access },
                    slot: None,
                },
            },
        )
    }

    /// The object nearest to `addr`, an address on a guard page, among the
    /// two slots beside that page whose state passes `want`: its index, the
    /// side of it `addr` lies on, and the distance as reports give it (from
    /// the access up to the object on the left side, from the object's first
    /// byte on the right). Async-signal-safe.
    fn neighbour(
        &self,
        addr: usize,
        want: impl Fn(ObjectState) -> bool,
    ) -> Option<(usize, Side, usize)> {
        let page = addr.checked_sub(self.base)? / PAGE;
        if page % 2 == 1 || !self.contains(addr) {
            return None;
        }
        let g = page / 2;
        // The slot on the left of guard `g` ends below it; the one on its
        // right starts above it. Compare the gaps, report the distance.
        let mut best: Option<(usize, usize, Side, usize)> = None;
        if let Some(left) = g.checked_sub(1) {
            if let Some(s) = self.slots.get(left).filter(|s| want(s.state())) {
                let obj = s.addr.load(Ordering::Relaxed);
                let end = obj.saturating_add(s.size.load(Ordering::Relaxed));
                best = Some((
                    addr.saturating_sub(end),
                    left,
                    Side::Right,
                    addr.saturating_sub(obj),
                ));
            }
        }
        if let Some(s) = self.slots.get(g).filter(|s| want(s.state())) {
            let obj = s.addr.load(Ordering::Relaxed);
            let gap = obj.saturating_sub(addr);
            if best.is_none_or(|(d, ..)| gap < d) {
                best = Some((gap, g, Side::Left, gap));
            }
        }
        best.map(|(_, slot, side, distance)| (slot, side, distance))
    }

    /// Renders a fault report (async-signal-safe when `out` is).
    pub(crate) fn render_fault(&self, out: &mut dyn Out, fault: Fault, addr: usize, ip: usize) {
        let view = fault.slot.and_then(|s| self.view(s));
        report::render(
            out,
            &fault.kind,
            addr,
            &Site::Ip(ip),
            view.as_ref().map(|v| v as &dyn ObjView),
        );
    }

    /// Makes the page holding `addr` accessible so that the faulting access
    /// can complete (report-only mode). Async-signal-safe. Returns whether
    /// the page is now accessible.
    pub(crate) fn open_page(&self, addr: usize) -> bool {
        if !self.contains(addr) {
            return false;
        }
        let page = (addr - self.base) / PAGE;
        if page % 2 == 0 {
            if let Some(flag) = self.guard_open.get(page / 2) {
                flag.store(true, Ordering::Release);
            }
        }
        // SAFETY: the page lies in the pool (checked above), whose memory the
        // pool owns; making it accessible invalidates no reference.
        unsafe { sys::protect(self.page_addr(page), PAGE, true) }.is_ok()
    }

    /// Records a fault for delivery to the sink at the next safe point
    /// (async-signal-safe). Drops it if the queue is full.
    pub(crate) fn record_fault(&self, fault: Fault, addr: usize, ip: usize) {
        for p in self.pending.iter() {
            if p.state
                .compare_exchange(EMPTY, WRITING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                p.addr.store(addr, Ordering::Relaxed);
                p.ip.store(ip, Ordering::Relaxed);
                p.code.store(fault.encode(), Ordering::Relaxed);
                p.state.store(FULL, Ordering::Release);
                return;
            }
        }
    }

    /// Whether a recorded fault awaits delivery.
    fn has_pending(&self) -> bool {
        self.pending
            .iter()
            .any(|p| p.state.load(Ordering::Acquire) == FULL)
    }

    fn snapshot(&self, index: usize) -> Option<ObjectInfo> {
        let v = self.view(index)?;
        let slot = v.slot;
        let state = slot.state();
        if state == ObjectState::Unused {
            return None;
        }
        let placement = if slot.placement.load(Ordering::Relaxed) == 0 {
            Placement::Left
        } else {
            Placement::Right
        };
        Some(ObjectInfo {
            index,
            addr: v.addr(),
            phys: PhysAddr(v.phys()),
            size: v.size(),
            cache: slot.cache.to_string_lossy(),
            state,
            placement,
            alloc_thread: slot.alloc_tid.load(Ordering::Relaxed),
            alloc_ns: slot.alloc_ns.load(Ordering::Relaxed),
            alloc_stack: slot.alloc_stack.to_string_lossy(),
            freed: (state == ObjectState::Freed).then(|| {
                (
                    slot.free_tid.load(Ordering::Relaxed),
                    slot.free_ns.load(Ordering::Relaxed),
                    slot.free_stack.to_string_lossy(),
                )
            }),
        })
    }
}

struct Inner {
    free: VecDeque<usize>,
    rng: u64,
}

/// A KFENCE pool: `objects` object pages interleaved with `objects + 1`
/// inaccessible guard pages. See the [module documentation](super).
///
/// Every object page starts inaccessible, is opened on allocation, and is
/// closed again on free; freed slots go to the tail of the free list so the
/// page of a freed object stays protected as long as possible.
pub struct Pool {
    shared: Arc<Shared>,
    inner: Mutex<Inner>,
    sink: RwLock<Arc<dyn ReportSink>>,
    symbolize: bool,
    /// `None` only once dropped with a fault handler stuck on the pool.
    memory: Option<Box<dyn PoolMemory>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("base", &(self.shared.base as *const u8))
            .field("objects", &self.shared.objects)
            .field("ranges", &self.ranges())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// Lays a pool of `config.objects` objects over the first
    /// `2 * objects + 1` pages of `memory`, after checking that every one of
    /// them is general or KFENCE memory, and protects them all.
    pub fn new(memory: Box<dyn PoolMemory>, config: PoolConfig) -> Result<Pool> {
        let host = sys::host_page_size();
        if host != PAGE_SIZE {
            return Err(KfenceError::PageSize {
                expected: PAGE_SIZE,
                found: host,
            });
        }
        if config.objects == 0 || config.objects > MAX_OBJECTS {
            return Err(KfenceError::ObjectCount {
                expected: MAX_OBJECTS,
                found: config.objects,
            });
        }
        let pages = PoolConfig::pages_for(config.objects);
        if memory.pages() < pages {
            return Err(KfenceError::TooSmall {
                objects: config.objects,
                expected: pages,
                found: memory.pages(),
            });
        }
        let base = memory.base() as usize;
        if base % PAGE != 0 {
            return Err(KfenceError::Misaligned {
                expected: PAGE_SIZE,
                found: base,
            });
        }
        let phys_base = memory.phys_base();
        for page in 0..pages {
            let class = memory.classify(page);
            if !class.is_poolable() {
                return Err(KfenceError::Excluded {
                    offset: PhysAddr(phys_base.raw().saturating_add((page * PAGE) as u64)),
                    found: class,
                });
            }
        }
        let len = pages * PAGE;
        // SAFETY: `base..base + len` is within the memory handed to the pool
        // (checked against `pages()` above), which the PoolMemory contract
        // reserves for the pool; no reference into it exists yet.
        unsafe { sys::protect(base, len, false) }.map_err(|errno| KfenceError::Protect {
            addr: base,
            len,
            errno,
        })?;
        let seed = if config.seed != 0 {
            config.seed
        } else {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ (base as u64).rotate_left(32) | 1
        };
        let shared = Arc::new(Shared {
            base,
            len,
            phys_base: phys_base.raw(),
            objects: config.objects,
            slots: (0..config.objects).map(|_| Slot::new()).collect(),
            guard_open: (0..=config.objects)
                .map(|_| AtomicBool::new(false))
                .collect(),
            counters: Counters::default(),
            feeders: AtomicUsize::new(0),
            registered: AtomicBool::new(false),
            pending: (0..PENDING_FAULTS)
                .map(|_| PendingFault {
                    state: AtomicU8::new(EMPTY),
                    addr: AtomicUsize::new(0),
                    ip: AtomicUsize::new(0),
                    code: AtomicU64::new(0),
                })
                .collect(),
            epoch: Instant::now(),
        });
        Ok(Pool {
            shared,
            inner: Mutex::new(Inner {
                free: (0..config.objects).collect(),
                rng: seed,
            }),
            sink: RwLock::new(Arc::new(StderrSink)),
            symbolize: config.symbolize_stacks,
            memory: Some(memory),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Number of object slots.
    pub fn capacity(&self) -> usize {
        self.shared.objects
    }

    /// The pool's arena ranges (object and guard pages), for the image's
    /// KFENCE section.
    pub fn ranges(&self) -> Vec<PhysRange> {
        vec![PhysRange::new(
            PhysAddr(self.shared.phys_base),
            self.shared.len as u64,
        )]
    }

    /// Replaces the report sink (default: [`StderrSink`]).
    pub fn set_sink(&self, sink: Arc<dyn ReportSink>) {
        *self.sink.write().unwrap_or_else(|e| e.into_inner()) = sink;
    }

    /// Counts a bug found in normal context and delivers its report.
    fn emit(&self, report: &Report) {
        self.shared.counters.bugs.fetch_add(1, Ordering::Relaxed);
        self.deliver(report);
    }

    /// Gives a report to the sink, outside every pool lock.
    fn deliver(&self, report: &Report) {
        let sink = Arc::clone(&self.sink.read().unwrap_or_else(|e| e.into_inner()));
        sink.report(report);
    }

    /// First address and length in bytes of the pool's mapping.
    pub(crate) fn bounds(&self) -> (usize, usize) {
        (self.shared.base, self.shared.len)
    }

    /// Whether `ptr` points into the pool (object or guard pages).
    #[inline]
    pub fn owns(&self, ptr: *const u8) -> bool {
        self.shared.contains(ptr as usize)
    }

    /// Address of the pool byte at arena offset `addr`, if the pool covers
    /// it.
    pub fn ptr_of(&self, addr: PhysAddr) -> Option<*const u8> {
        let off = addr.checked_offset_from(PhysAddr(self.shared.phys_base))?;
        let off = usize::try_from(off).ok().filter(|&o| o < self.shared.len)?;
        Some((self.shared.base + off) as *const u8)
    }

    /// Arena offset of `ptr`, if it points into the pool.
    pub fn phys_addr(&self, ptr: *const u8) -> Option<PhysAddr> {
        self.shared.phys_of(ptr as usize)
    }

    /// The requested size of the live object starting at `ptr`.
    pub fn usable_size(&self, ptr: *const u8) -> Option<usize> {
        self.live_size(ptr as usize)
    }

    /// State of the slot whose object page holds `ptr`.
    pub fn state_of(&self, ptr: *const u8) -> Option<ObjectState> {
        self.slot_of(ptr as usize).map(|(_, s)| s.state())
    }

    /// Snapshot of the object whose page holds `ptr`, if that slot was ever
    /// used.
    pub fn object_info(&self, ptr: *const u8) -> Option<ObjectInfo> {
        let (index, _) = self.slot_of(ptr as usize)?;
        self.shared.snapshot(index)
    }

    fn slot_of(&self, addr: usize) -> Option<(usize, &Slot)> {
        if !self.shared.contains(addr) {
            return None;
        }
        let page = (addr - self.shared.base) / PAGE;
        if page % 2 == 0 {
            return None;
        }
        let index = page / 2;
        self.shared.slots.get(index).map(|s| (index, s))
    }

    /// Current statistics.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            enabled: self.shared.feeders.load(Ordering::Relaxed) > 0,
            allocated: c.allocated.load(Ordering::Relaxed),
            total_allocs: c.allocs.load(Ordering::Relaxed),
            total_frees: c.frees.load(Ordering::Relaxed),
            bugs: c.bugs.load(Ordering::Relaxed),
            skipped_incompatible: c.skip_incompatible.load(Ordering::Relaxed),
            skipped_capacity: c.skip_capacity.load(Ordering::Relaxed),
            skipped_busy: c.skip_busy.load(Ordering::Relaxed),
            skipped_protect: c.skip_protect.load(Ordering::Relaxed),
            skipped_excluded: c.skip_excluded.load(Ordering::Relaxed),
            retired: c.retired.load(Ordering::Relaxed),
        }
    }

    /// Allocates a guarded object of `size` bytes (at most one page) aligned
    /// to `align` (a power of two, at most one page; 0 means 1). The object
    /// is zeroed and placed at the left or right edge of its page at random.
    ///
    /// Returns `None`, counting the reason in [`Stats`], if the request is
    /// incompatible, the pool is busy with another allocation or free (an
    /// allocation never waits for the pool lock), no slot is free, the
    /// slot's page is no longer (or cannot be told without waiting to be)
    /// general or KFENCE memory, or its protection cannot be changed. The
    /// allocation stack is captured only once a slot is reserved. This is
    /// a safe point: fault reports recorded by the handler are delivered to
    /// the sink first.
    pub fn alloc(&self, size: usize, align: usize, cache: CacheTag) -> Option<NonNull<u8>> {
        self.deliver_faults();
        let align = align.max(1);
        if !self.compatible(size, align) {
            return None;
        }
        let reserved = {
            let mut inner = match self.inner.try_lock() {
                Ok(g) => g,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    self.shared
                        .counters
                        .skip_busy
                        .fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            };
            self.reserve(&mut inner)?
        };
        let mut stack_text = Vec::new();
        stack::render(self.symbolize, &mut stack_text);
        Some(self.place(reserved, size, align, cache, &stack_text))
    }

    /// Whether a request fits a pool object; counted if not.
    fn compatible(&self, size: usize, align: usize) -> bool {
        let ok = size <= PAGE && align <= PAGE && align.is_power_of_two();
        if !ok {
            self.shared
                .counters
                .skip_incompatible
                .fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Takes a free slot and makes its object page accessible, under the
    /// pool lock. `None`, counted, if there is no usable slot.
    fn reserve(&self, inner: &mut Inner) -> Option<Reserved> {
        let c = &self.shared.counters;
        let Some(index) = inner.free.pop_front() else {
            c.skip_capacity.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // Exclusion, again for this object, without waiting: a page
        // preserved or reclassified since construction is never handed out
        // (the slot is retired); one that cannot be checked now is not
        // handed out this time.
        let class = self
            .memory
            .as_ref()
            .and_then(|m| m.try_classify(2 * index + 1));
        match class {
            Some(class) if class.is_poolable() => {}
            Some(_) => {
                c.skip_excluded.fetch_add(1, Ordering::Relaxed);
                c.retired.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            None => {
                inner.free.push_front(index);
                c.skip_excluded.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        let page = self.shared.object_page(index);
        // SAFETY: the page is this slot's object page inside the pool, and the
        // slot is off the free list, so nobody else uses it.
        if unsafe { sys::protect(page, PAGE, true) }.is_err() {
            inner.free.push_front(index);
            c.skip_protect.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        for g in [index, index + 1] {
            if let Some(flag) = self.shared.guard_open.get(g) {
                if flag.swap(false, Ordering::AcqRel) {
                    // SAFETY: guard page `g` lies inside the pool and holds no
                    // objects, so closing it invalidates no reference. A
                    // failure leaves it open: detection degrades, nothing else.
                    let _ = unsafe { sys::protect(self.shared.page_addr(2 * g), PAGE, false) };
                }
            }
        }
        inner.rng ^= inner.rng << 13;
        inner.rng ^= inner.rng >> 7;
        inner.rng ^= inner.rng << 17;
        Some(Reserved {
            index,
            page,
            right: inner.rng & 1 == 1,
        })
    }

    /// Lays out an object of `size` bytes in a reserved slot (canary around
    /// it, itself zeroed) and publishes it as allocated.
    fn place(
        &self,
        r: Reserved,
        size: usize,
        align: usize,
        cache: CacheTag,
        stack_text: &[u8],
    ) -> NonNull<u8> {
        let c = &self.shared.counters;
        let page = r.page;
        let footprint = size.max(1);
        let addr = if r.right {
            (page + PAGE - footprint) & !(align - 1)
        } else {
            page
        };
        let end = addr + size;
        // SAFETY: `page..addr` lies in the object page made accessible by
        // `reserve`, which only this call uses until the slot is published.
        unsafe { sys::fill_canary(page, addr - page) };
        // SAFETY: as above, `addr..end` lies in the same page.
        unsafe { sys::zero(addr, size) };
        // SAFETY: as above, `end..page + PAGE` lies in the same page.
        unsafe { sys::fill_canary(end, page + PAGE - end) };
        let slot = &self.shared.slots[r.index];
        slot.addr.store(addr, Ordering::Relaxed);
        slot.size.store(size, Ordering::Relaxed);
        slot.placement.store(u8::from(r.right), Ordering::Relaxed);
        slot.cache.store(cache.name().as_bytes());
        slot.alloc_tid.store(sys::thread_id(), Ordering::Relaxed);
        slot.alloc_ns.store(self.shared.now_ns(), Ordering::Relaxed);
        slot.alloc_stack.store(stack_text);
        slot.free_stack.clear();
        slot.state.store(ALLOCATED, Ordering::Release);
        c.allocs.fetch_add(1, Ordering::Relaxed);
        c.allocated.fetch_add(1, Ordering::Relaxed);
        // `addr` is inside the pool mapping, hence not null.
        NonNull::new(addr as *mut u8).unwrap_or(NonNull::dangling())
    }

    /// Frees the pool object at `ptr`.
    ///
    /// Checks that `ptr` is the start of a live object (otherwise an invalid
    /// or double free is reported and nothing changes) and that the canary
    /// around the object is intact (otherwise a corruption is reported; the
    /// object is freed all the same). The object's bytes are zeroed and its
    /// page made inaccessible. Reports go to the sink and are returned. This
    /// is a safe point (see [`Pool::alloc`]).
    ///
    /// # Safety
    ///
    /// If `ptr` is the start of a live object of this pool, the caller gives
    /// the object up: no reference into it may be live, and nothing may
    /// access it during or after the call. (The pool writes zeros over it
    /// and makes its page inaccessible.) Any other `ptr` is only compared,
    /// never accessed, and carries no requirement.
    pub unsafe fn free(&self, ptr: *const u8) -> std::result::Result<(), Report> {
        self.deliver_faults();
        let mut stack_text = Vec::new();
        let first = stack::render(self.symbolize, &mut stack_text).unwrap_or_default();
        let site = Site::Stack {
            first: &first,
            stack: &stack_text,
        };
        let report = self.free_locked(&mut lock(&self.inner), ptr as usize, &site, &stack_text);
        match report {
            None => Ok(()),
            Some(r) => {
                self.emit(&r);
                Err(r)
            }
        }
    }

    /// The free of `addr` under the pool lock: the report it gives, if any.
    fn free_locked(
        &self,
        inner: &mut Inner,
        addr: usize,
        site: &Site<'_>,
        stack_text: &[u8],
    ) -> Option<Report> {
        let c = &self.shared.counters;
        let Some((index, slot)) = self.slot_of(addr) else {
            // A guard page (or outside the pool): name the object beside it,
            // live or freed, as the kernel does for an invalid free.
            let near = self
                .shared
                .neighbour(addr, |st| st == ObjectState::Allocated)
                .or_else(|| self.shared.neighbour(addr, |st| st == ObjectState::Freed))
                .and_then(|(i, ..)| self.shared.snapshot(i));
            return Some(report::build(ReportKind::InvalidFree, addr, site, near));
        };
        match slot.state() {
            ObjectState::Unused => {
                return Some(report::build(ReportKind::InvalidFree, addr, site, None));
            }
            ObjectState::Freed => {
                let obj = self.shared.snapshot(index);
                return Some(report::build(ReportKind::DoubleFree, addr, site, obj));
            }
            ObjectState::Allocated => {}
        }
        let obj_addr = slot.addr.load(Ordering::Relaxed);
        if obj_addr != addr {
            let obj = self.shared.snapshot(index);
            return Some(report::build(ReportKind::InvalidFree, addr, site, obj));
        }
        let page = self.shared.object_page(index);
        let end = obj_addr + slot.size.load(Ordering::Relaxed);
        // SAFETY: `page..obj_addr` is canary area of this live slot's
        // accessible page; callers only write the object itself, and we hold
        // the pool lock.
        let mut bad = unsafe { sys::find_corruption(page, obj_addr - page) }.map(|a| (a, obj_addr));
        if bad.is_none() {
            // SAFETY: as above, for `end..page + PAGE`.
            bad = unsafe { sys::find_corruption(end, page + PAGE - end) }.map(|a| (a, page + PAGE));
        }
        let corruption = bad.map(|(first_bad, limit)| {
            let mut window = [0u8; 16];
            let n = (limit - first_bad).min(16);
            let w = window.get_mut(..n).unwrap_or(&mut []);
            // SAFETY: `first_bad..first_bad + n` lies in the same canary area,
            // bounded by `limit`.
            unsafe { sys::read_bytes(first_bad, w) };
            let mut bytes = [None; 16];
            for (i, (b, out)) in window.iter().zip(bytes.iter_mut()).take(n).enumerate() {
                if *b != sys::canary_byte(first_bad + i) {
                    *out = Some(*b);
                }
            }
            (first_bad, bytes)
        });
        // Scrub the object (init-on-free): a stale pointer that still reads
        // it, in report-only mode, sees zeros, not the old contents.
        // SAFETY: `obj_addr..end` is the live object, in its accessible page;
        // the caller gave it up (the contract of `free` and `realloc`), and
        // we hold the pool lock.
        unsafe { sys::zero(obj_addr, end - obj_addr) };
        slot.free_tid.store(sys::thread_id(), Ordering::Relaxed);
        slot.free_ns.store(self.shared.now_ns(), Ordering::Relaxed);
        slot.free_stack.store(stack_text);
        slot.state.store(FREED, Ordering::Release);
        // SAFETY: the object page belongs to this slot, which is now freed:
        // the caller gave up the object, and no pool-internal reference into
        // the page remains.
        let _ = unsafe { sys::protect(page, PAGE, false) };
        inner.free.push_back(index);
        c.frees.fetch_add(1, Ordering::Relaxed);
        c.allocated.fetch_sub(1, Ordering::Relaxed);
        corruption.map(|(first_bad, bytes)| {
            let obj = self.shared.snapshot(index);
            report::build(ReportKind::Corruption { bytes }, first_bad, site, obj)
        })
    }

    /// Moves the live object at `ptr` into a new pool object of `new_size`
    /// bytes, copying the common prefix, then frees the old one (its page
    /// becomes inaccessible, so stale uses fault as use-after-free). The
    /// pool lock is held from the check of `ptr` to the free, so no other
    /// free can interleave.
    ///
    /// Returns `Ok(None)`, leaving the old object untouched, when the pool
    /// cannot serve the new size; `Err` (reported as the free it implies)
    /// when `ptr` is not a live object. A canary corruption found while
    /// freeing the old object goes to the sink; the new object is valid
    /// either way.
    ///
    /// # Safety
    ///
    /// As for [`Pool::free`]: if `ptr` is a live object and the move
    /// succeeds, the caller gives the old object up.
    pub unsafe fn realloc(
        &self,
        ptr: *const u8,
        new_size: usize,
        align: usize,
        cache: CacheTag,
    ) -> std::result::Result<Option<NonNull<u8>>, Report> {
        self.deliver_faults();
        let addr = ptr as usize;
        let align = align.max(1);
        let mut inner = lock(&self.inner);
        let Some(old_size) = self.live_size(addr) else {
            let mut stack_text = Vec::new();
            let first = stack::render(self.symbolize, &mut stack_text).unwrap_or_default();
            let site = Site::Stack {
                first: &first,
                stack: &stack_text,
            };
            let report = self.free_locked(&mut inner, addr, &site, &stack_text);
            drop(inner);
            return match report {
                Some(r) => {
                    self.emit(&r);
                    Err(r)
                }
                None => Ok(None),
            };
        };
        if !self.compatible(new_size, align) {
            return Ok(None);
        }
        let Some(reserved) = self.reserve(&mut inner) else {
            return Ok(None);
        };
        let mut stack_text = Vec::new();
        let first = stack::render(self.symbolize, &mut stack_text).unwrap_or_default();
        let new = self.place(reserved, new_size, align, cache, &stack_text);
        // SAFETY: `addr..addr + old_size` is the live object (checked above,
        // under the lock still held, so no free of it can interleave) and
        // `new..new + min` lies in the fresh object; they are on different
        // pages, hence disjoint, and the caller does not access the old one.
        unsafe { sys::copy(addr, new.as_ptr() as usize, old_size.min(new_size)) };
        let site = Site::Stack {
            first: &first,
            stack: &stack_text,
        };
        let corruption = self.free_locked(&mut inner, addr, &site, &stack_text);
        drop(inner);
        if let Some(r) = corruption {
            self.emit(&r);
        }
        Ok(Some(new))
    }

    /// Size of the live object starting at `addr`.
    fn live_size(&self, addr: usize) -> Option<usize> {
        let (_, slot) = self.slot_of(addr)?;
        (slot.state() == ObjectState::Allocated && slot.addr.load(Ordering::Relaxed) == addr)
            .then(|| slot.size.load(Ordering::Relaxed))
    }

    /// Delivers to the sink, and returns, the fault reports the handler
    /// recorded since the last safe point (each with a snapshot of its
    /// object as it is now). The handler already wrote their text to its
    /// file descriptor; the sink cannot run in signal context, so it gets
    /// them here or at the pool's next allocation or free, whichever comes
    /// first.
    pub fn drain_faults(&self) -> Vec<Report> {
        let reports = self.take_faults();
        for r in &reports {
            self.deliver(r);
        }
        reports
    }

    /// The safe point of allocation and free: pending fault reports to the
    /// sink.
    fn deliver_faults(&self) {
        if self.shared.has_pending() {
            self.drain_faults();
        }
    }

    fn take_faults(&self) -> Vec<Report> {
        let mut out = Vec::new();
        for p in self.shared.pending.iter() {
            if p.state
                .compare_exchange(FULL, READING, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let addr = p.addr.load(Ordering::Relaxed);
            let ip = p.ip.load(Ordering::Relaxed);
            let fault = Fault::decode(p.code.load(Ordering::Relaxed));
            p.state.store(EMPTY, Ordering::Release);
            let obj = fault.slot.and_then(|s| self.shared.snapshot(s));
            out.push(report::build(fault.kind, addr, &Site::Ip(ip), obj));
        }
        out
    }
}

/// A slot taken off the free list, its page accessible, not yet published.
struct Reserved {
    index: usize,
    page: usize,
    right: bool,
}

impl Drop for Pool {
    fn drop(&mut self) {
        if !crate::fault::deregister(&self.shared) {
            // A fault handler still runs on this pool (stuck, say, writing
            // its report to a full pipe): keep the metadata and the memory
            // for the rest of the process rather than let it change the
            // protection of whatever is mapped here next.
            std::mem::forget(Arc::clone(&self.shared));
            std::mem::forget(self.memory.take());
            return;
        }
        // Hand the memory back accessible, as it was given.
        // SAFETY: the range is the pool's memory; the pool is being dropped,
        // so no object of it may be used any more, and no fault handler uses
        // it (deregistered above).
        let _ = unsafe { sys::protect(self.shared.base, self.shared.len, true) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kfence::{AnonMemory, PageClass, PoolMemory};

    /// Anonymous pool memory whose pages can be made "cannot tell now".
    struct Undecided {
        memory: AnonMemory,
        undecided: Arc<AtomicBool>,
    }

    // SAFETY: delegates to the AnonMemory, which upholds the contract.
    unsafe impl PoolMemory for Undecided {
        fn base(&self) -> *mut u8 {
            self.memory.base()
        }
        fn pages(&self) -> usize {
            self.memory.pages()
        }
        fn phys_base(&self) -> PhysAddr {
            self.memory.phys_base()
        }
        fn classify(&self, page: usize) -> PageClass {
            self.memory.classify(page)
        }
        fn try_classify(&self, page: usize) -> Option<PageClass> {
            (!self.undecided.load(Ordering::Relaxed)).then(|| self.memory.classify(page))
        }
    }

    fn renders() -> usize {
        stack::RENDERS.with(std::cell::Cell::get)
    }

    #[test]
    #[cfg_attr(miri, ignore)]
    fn refusals_are_counted_apart_and_take_no_stack() {
        let undecided = Arc::new(AtomicBool::new(false));
        let memory = Undecided {
            memory: AnonMemory::new(PoolConfig::pages_for(1)).unwrap(),
            undecided: Arc::clone(&undecided),
        };
        let pool = Pool::new(
            Box::new(memory),
            PoolConfig {
                objects: 1,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        let tag = CacheTag::named("t");
        let before = renders();
        // Busy: another allocation or free holds the pool.
        {
            let _held = lock(&pool.inner);
            assert!(pool.alloc(8, 8, tag).is_none());
        }
        // The page cannot be checked now: refused, the slot kept.
        undecided.store(true, Ordering::Relaxed);
        assert!(pool.alloc(8, 8, tag).is_none());
        undecided.store(false, Ordering::Relaxed);
        // mprotect fails: refused, the slot kept.
        sys::FAIL_PROTECT.with(|f| f.set(true));
        assert!(pool.alloc(8, 8, tag).is_none());
        assert_eq!(renders(), before, "a refused request took a stack");
        let p = pool.alloc(8, 8, tag).expect("the one slot, still usable");
        assert_eq!(renders(), before + 1);
        // Capacity: no free slot.
        assert!(pool.alloc(8, 8, tag).is_none());
        assert_eq!(renders(), before + 1);
        let s = pool.stats();
        assert_eq!(
            (
                s.skipped_busy,
                s.skipped_excluded,
                s.skipped_protect,
                s.skipped_capacity,
                s.retired
            ),
            (1, 1, 1, 1, 0)
        );
        // SAFETY: `p` is a live object of this pool, not used afterwards.
        unsafe { pool.free(p.as_ptr()) }.unwrap();
    }

    #[test]
    fn size_classes() {
        assert_eq!(CacheTag::size_class(0).name(), "size-8");
        assert_eq!(CacheTag::size_class(9).name(), "size-16");
        assert_eq!(CacheTag::size_class(4096).name(), "size-4096");
        assert_eq!(CacheTag::size_class(4097).name(), "size-large");
        assert_eq!(CacheTag::size_class(usize::MAX).name(), "size-large");
    }

    #[test]
    fn fault_encoding_round_trips() {
        for f in [
            Fault {
                kind: ReportKind::OutOfBounds {
                    access: Access::Write,
                    side: Side::Right,
                    distance: 4096,
                },
                slot: Some(254),
            },
            Fault {
                kind: ReportKind::UseAfterFree {
                    access: Access::Read,
                },
                slot: Some(0),
            },
            Fault {
                kind: ReportKind::InvalidAccess {
                    access: Access::Unknown,
                },
                slot: None,
            },
        ] {
            assert_eq!(Fault::decode(f.encode()), f);
        }
    }
}
