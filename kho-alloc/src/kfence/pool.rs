//! The guarded object pool.

use std::collections::VecDeque;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
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
/// Faults recorded by the fault handler in report-only mode, awaiting
/// [`Pool::drain_faults`].
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
    pub(crate) skip_excluded: AtomicU64,
}

/// Pool statistics, as the kernel's `/sys/kernel/debug/kfence/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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
    /// Sampled requests refused because of their size or alignment.
    pub skipped_incompatible: u64,
    /// Sampled requests refused because no slot was free.
    pub skipped_capacity: u64,
    /// Sampled requests refused because they asked for preservable memory,
    /// or because the slot's page was no longer general or KFENCE memory.
    pub skipped_excluded: u64,
}

/// A fault recorded by the handler in report-only mode.
pub(crate) struct PendingFault {
    /// 0 empty, 1 being written, 2 full, 3 being read.
    state: AtomicU8,
    addr: AtomicUsize,
    ip: AtomicUsize,
    /// Encoded [`FaultKind`].
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
    pub(crate) enabled: AtomicBool,
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
        let g = page / 2;
        let mut best: Option<(usize, Side, usize)> = None;
        if let Some(left) = g.checked_sub(1) {
            if let Some(s) = self.slots.get(left) {
                if s.state() == ObjectState::Allocated {
                    let obj = s.addr.load(Ordering::Relaxed);
                    let end = obj.saturating_add(s.size.load(Ordering::Relaxed));
                    best = Some((addr.saturating_sub(end), Side::Right, left));
                }
            }
        }
        if let Some(s) = self.slots.get(g) {
            if s.state() == ObjectState::Allocated {
                let obj = s.addr.load(Ordering::Relaxed);
                let dist = obj.saturating_sub(addr);
                if best.is_none_or(|(d, _, _)| dist < d) {
                    best = Some((dist, Side::Left, g));
                }
            }
        }
        Some(match best {
            Some((_, side, slot)) => {
                let obj = self
                    .slots
                    .get(slot)
                    .map_or(0, |s| s.addr.load(Ordering::Relaxed));
                let distance = match side {
                    Side::Left => obj.saturating_sub(addr),
                    Side::Right => addr.saturating_sub(obj),
                };
                Fault {
                    kind: ReportKind::OutOfBounds {
                        access,
                        side,
                        distance,
                    },
                    slot: Some(slot),
                }
            }
            None => Fault {
                kind: ReportKind::InvalidAccess { access },
                slot: None,
            },
        })
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

    /// Records a fault for [`Pool::drain_faults`] (async-signal-safe).
    /// Drops it if the queue is full.
    pub(crate) fn record_fault(&self, fault: Fault, addr: usize, ip: usize) {
        for p in self.pending.iter() {
            if p.state
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                p.addr.store(addr, Ordering::Relaxed);
                p.ip.store(ip, Ordering::Relaxed);
                p.code.store(fault.encode(), Ordering::Relaxed);
                p.state.store(2, Ordering::Release);
                return;
            }
        }
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
    memory: Box<dyn PoolMemory>,
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
            enabled: AtomicBool::new(false),
            pending: (0..PENDING_FAULTS)
                .map(|_| PendingFault {
                    state: AtomicU8::new(0),
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
            memory,
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

    fn emit(&self, report: &Report) {
        self.shared.counters.bugs.fetch_add(1, Ordering::Relaxed);
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
        let (index, slot) = self.slot_of(ptr as usize)?;
        let _ = index;
        (slot.state() == ObjectState::Allocated
            && slot.addr.load(Ordering::Relaxed) == ptr as usize)
            .then(|| slot.size.load(Ordering::Relaxed))
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
            enabled: self.shared.enabled.load(Ordering::Relaxed),
            allocated: c.allocated.load(Ordering::Relaxed),
            total_allocs: c.allocs.load(Ordering::Relaxed),
            total_frees: c.frees.load(Ordering::Relaxed),
            bugs: c.bugs.load(Ordering::Relaxed),
            skipped_incompatible: c.skip_incompatible.load(Ordering::Relaxed),
            skipped_capacity: c.skip_capacity.load(Ordering::Relaxed),
            skipped_excluded: c.skip_excluded.load(Ordering::Relaxed),
        }
    }

    /// Allocates a guarded object of `size` bytes (at most one page) aligned
    /// to `align` (a power of two, at most one page; 0 means 1). The object
    /// is zeroed and placed at the left or right edge of its page at random.
    ///
    /// Returns `None`, counting the reason in [`Stats`], if the request is
    /// incompatible, no slot is free (or the pool is busy with another
    /// allocation or free: allocation never blocks, counted as capacity),
    /// or the slot's page is no longer general or KFENCE memory.
    pub fn alloc(&self, size: usize, align: usize, cache: CacheTag) -> Option<NonNull<u8>> {
        let c = &self.shared.counters;
        let align = align.max(1);
        if size > PAGE || align > PAGE || !align.is_power_of_two() {
            c.skip_incompatible.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut stack_text = Vec::new();
        stack::render(self.symbolize, &mut stack_text);
        // Never block an allocation on the pool: if another sampled
        // allocation or a free holds the lock, this request is not sampled.
        let mut inner = match self.inner.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                c.skip_capacity.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let Some(index) = inner.free.pop_front() else {
            c.skip_capacity.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        // Exclusion, again for this object: a page preserved or reclassified
        // since construction is never handed out (and the slot is retired).
        if !self.memory.classify(2 * index + 1).is_poolable() {
            c.skip_excluded.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let page = self.shared.object_page(index);
        // SAFETY: the page is this slot's object page inside the pool, and the
        // slot is off the free list, so nobody else uses it.
        if unsafe { sys::protect(page, PAGE, true) }.is_err() {
            inner.free.push_back(index);
            c.skip_capacity.fetch_add(1, Ordering::Relaxed);
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
        let right = inner.rng & 1 == 1;
        drop(inner);
        let footprint = size.max(1);
        let addr = if right {
            (page + PAGE - footprint) & !(align - 1)
        } else {
            page
        };
        let end = addr + size;
        // SAFETY: `page..addr` lies in the object page just made accessible,
        // which only this call uses until the slot is published below.
        unsafe { sys::fill_canary(page, addr - page) };
        // SAFETY: as above, `addr..end` lies in the same page.
        unsafe { sys::zero(addr, size) };
        // SAFETY: as above, `end..page + PAGE` lies in the same page.
        unsafe { sys::fill_canary(end, page + PAGE - end) };
        let slot = &self.shared.slots[index];
        slot.addr.store(addr, Ordering::Relaxed);
        slot.size.store(size, Ordering::Relaxed);
        slot.placement.store(u8::from(right), Ordering::Relaxed);
        slot.cache.store(cache.name().as_bytes());
        slot.alloc_tid.store(sys::thread_id(), Ordering::Relaxed);
        slot.alloc_ns.store(self.shared.now_ns(), Ordering::Relaxed);
        slot.alloc_stack.store(&stack_text);
        slot.free_stack.clear();
        slot.state.store(ALLOCATED, Ordering::Release);
        c.allocs.fetch_add(1, Ordering::Relaxed);
        c.allocated.fetch_add(1, Ordering::Relaxed);
        NonNull::new(addr as *mut u8)
    }

    /// Frees the pool object at `ptr`.
    ///
    /// Checks that `ptr` is the start of a live object (otherwise an invalid
    /// or double free is reported and nothing changes) and that the canary
    /// around the object is intact (otherwise a corruption is reported; the
    /// object is freed all the same). The object's bytes are zeroed and its
    /// page made inaccessible. Reports go to the sink and are
    /// returned.
    pub fn free(&self, ptr: *const u8) -> std::result::Result<(), Report> {
        let addr = ptr as usize;
        let mut stack_text = Vec::new();
        let first = stack::render(self.symbolize, &mut stack_text).unwrap_or_default();
        let site = Site::Stack {
            first: &first,
            stack: &stack_text,
        };
        let report = self.free_inner(addr, &site, &stack_text);
        match report {
            None => Ok(()),
            Some(r) => {
                self.emit(&r);
                Err(r)
            }
        }
    }

    fn free_inner(&self, addr: usize, site: &Site<'_>, stack_text: &[u8]) -> Option<Report> {
        let c = &self.shared.counters;
        let mut inner = lock(&self.inner);
        let Some((index, slot)) = self.slot_of(addr) else {
            return Some(report::build(ReportKind::InvalidFree, addr, site, None));
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
        // the caller is giving it up, and we hold the pool lock.
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
        drop(inner);
        c.frees.fetch_add(1, Ordering::Relaxed);
        c.allocated.fetch_sub(1, Ordering::Relaxed);
        corruption.map(|(first_bad, bytes)| {
            let obj = self.shared.snapshot(index);
            report::build(ReportKind::Corruption { bytes }, first_bad, site, obj)
        })
    }

    /// Moves the live object at `ptr` into a new pool object of `new_size`
    /// bytes, copying the common prefix, then frees the old one (its page
    /// becomes inaccessible, so stale uses fault as use-after-free).
    ///
    /// Returns `Ok(None)`, leaving the old object untouched, when the pool
    /// cannot serve the new size; `Err` when `ptr` is not a live object. A
    /// canary corruption found while freeing the old object goes to the sink.
    pub fn realloc(
        &self,
        ptr: *const u8,
        new_size: usize,
        align: usize,
        cache: CacheTag,
    ) -> std::result::Result<Option<NonNull<u8>>, Report> {
        let Some(old_size) = self.usable_size(ptr) else {
            // Not a live object: report as the free it implies.
            return self.free(ptr).map(|()| None);
        };
        let Some(new) = self.alloc(new_size, align, cache) else {
            return Ok(None);
        };
        // SAFETY: `ptr..ptr + old_size` is the live object (checked above) and
        // `new..new + min` lies in the fresh object; they are on different
        // pages, hence disjoint.
        unsafe { sys::copy(ptr as usize, new.as_ptr() as usize, old_size.min(new_size)) };
        // A corruption of the old object is reported to the sink by free; the
        // new object is valid either way.
        let _ = self.free(ptr);
        Ok(Some(new))
    }

    /// Reports recorded by the fault handler in report-only mode since the
    /// last call, with a snapshot of each object as it is now. The handler
    /// already wrote their text to its file descriptor.
    pub fn drain_faults(&self) -> Vec<Report> {
        let mut out = Vec::new();
        for p in self.shared.pending.iter() {
            if p.state
                .compare_exchange(2, 3, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let addr = p.addr.load(Ordering::Relaxed);
            let ip = p.ip.load(Ordering::Relaxed);
            let fault = Fault::decode(p.code.load(Ordering::Relaxed));
            p.state.store(0, Ordering::Release);
            let obj = fault.slot.and_then(|s| self.shared.snapshot(s));
            out.push(report::build(fault.kind, addr, &Site::Ip(ip), obj));
        }
        out
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        crate::fault::deregister(&self.shared);
        // Hand the memory back accessible, as it was given.
        // SAFETY: the range is the pool's memory; the pool is being dropped,
        // so no object of it may be used any more.
        let _ = unsafe { sys::protect(self.shared.base, self.shared.len, true) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
