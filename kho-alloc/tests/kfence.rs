//! The KFENCE pool: a port of the case list of Linux's `mm/kfence/kfence_test.c`,
//! plus exclusion, sampling-gate and disable tests. (The fault handler's
//! signal chaining is tested in `kfence_signals.rs`, the heap wiring in
//! `kfence_heap.rs`.)
//!
//! Cases of `kfence_test.c` and where they are here; each `KFENCE_KUNIT_CASE`
//! runs for a general size class (through a [`Sampler`]) and for a named
//! cache (`_memcache`, straight from the pool, since the heap's named caches
//! are preservable and never sampled):
//! - `test_out_of_bounds_read`/`_write`: `out_of_bounds_{read,write}_{left,right}[_memcache]`,
//!   and through the heap in `kfence_heap.rs`;
//! - `test_use_after_free_read` (and the write it implies):
//!   `use_after_free_{read,write}[_memcache]`;
//! - `test_use_after_free_read_nofault`: `report_only_mode_continues`;
//! - `test_double_free`, `test_invalid_addr_free`, `test_corruption`:
//!   `double_free[_memcache]`, `invalid_addr_free[_memcache]`,
//!   `corruption_*`;
//! - `test_free_bulk`, `test_memcache_alloc_bulk`: `bulk_alloc_and_free`;
//! - `test_init_on_free`: `freed_objects_are_scrubbed`;
//! - `test_kmalloc_aligned_oob_read`/`_write`: `aligned_out_of_bounds_*`;
//! - `test_invalid_access`: `invalid_access`; `test_gfpzero`:
//!   `objects_are_zeroed_on_reuse`;
//! - `test_krealloc`: `realloc_then_use_old_pointer[_memcache]`;
//! - zero-size objects: `zero_size_{read_faults,write_is_corruption}[_memcache]`.
//!
//! Left out, because this allocator has nothing they could test:
//! `test_shrink_memcache` (caches have no shrink operation and the pool is
//! not part of any cache), `test_memcache_ctor` (caches have no object
//! constructors), and `test_memcache_typesafe_by_rcu` (no cache defers its
//! frees past a grace period; the pool frees at once).
//!
//! Cases that must fault run in a child process: the test re-executes this
//! binary for itself alone with `KHO_KFENCE_CHILD` naming it; the child sets
//! up the pool and the fault handler, prints what the report must contain,
//! then makes the bad access. The parent checks the report text on the
//! child's standard error and that the child died of SIGSEGV.
//!
//! The pool needs 4 KiB host pages; elsewhere every test here returns at
//! once, saying so. The access kind (read or write) of a fault is decoded on
//! x86-64 only; elsewhere reports say "access", and so do the expectations.
// Under Miri: guard pages (mprotect), signals and child processes are
// unsupported.
#![cfg(not(miri))]

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kho_alloc::fault::{self, FaultMode};
use kho_alloc::kfence::{
    Access, AnonMemory, CacheTag, KfenceError, ObjectState, PageClass, Placement, Pool, PoolConfig,
    Report, ReportKind, SampleMode, Sampler, Side,
};
use kho_core::{PhysAddr, PhysRange, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
const CHILD: &str = "KHO_KFENCE_CHILD";
const NAMED: CacheTag = CacheTag::named("test-cache");

/// Returns from the test when the host cannot hold a pool.
macro_rules! require_pool_pages {
    () => {
        // SAFETY: sysconf has no memory-safety preconditions.
        let host = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if host != PAGE_SIZE as libc::c_long {
            eprintln!("skipped: host pages are {host} bytes, the pool needs {PAGE_SIZE}");
            return;
        }
    };
}

/// The access word a fault report uses.
fn rw(write: bool) -> &'static str {
    access(write).name()
}

/// The access a fault report records.
fn access(write: bool) -> Access {
    match (cfg!(target_arch = "x86_64"), write) {
        (false, _) => Access::Unknown,
        (true, false) => Access::Read,
        (true, true) => Access::Write,
    }
}

fn pool_with(objects: usize, phys: u64, symbolize: bool) -> Pool {
    let memory = AnonMemory::with_phys_base(PoolConfig::pages_for(objects), PhysAddr(phys))
        .expect("anonymous memory");
    let config = PoolConfig {
        objects,
        symbolize_stacks: symbolize,
        seed: 0x5eed,
    };
    Pool::new(Box::new(memory), config).expect("pool")
}

fn pool(objects: usize) -> Pool {
    pool_with(objects, 0x10_0000, false)
}

/// Frees through the pool.
fn free(pool: &Pool, p: *const u8) -> Result<(), Report> {
    // SAFETY: the tests free an object they own once and touch it afterwards
    // only to provoke a fault on purpose (which the handler reports before
    // the process dies, or lets through in report-only mode, on a page that
    // stays mapped); every other pointer they pass is not a live object and
    // is only compared.
    unsafe { pool.free(p) }
}

/// Collects reports instead of printing them.
fn collect(pool: &Pool) -> Arc<Mutex<Vec<Report>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    pool.set_sink(Arc::new(move |r: &Report| {
        sink.lock().unwrap().push(r.clone())
    }));
    seen
}

/// Where a request comes from: a general size class through the sampler, or
/// a named cache straight from the pool.
#[derive(Clone, Copy, Debug)]
enum Source {
    General,
    Named,
}

/// Allocates `size` bytes until the object is placed at `side`, freeing the
/// others (as the kernel test loops until KFENCE serves the request). The
/// sampler is gone on return; the object stays valid.
#[inline(never)]
fn alloc_at(
    pool: &Arc<Pool>,
    source: Source,
    size: usize,
    align: usize,
    side: Placement,
) -> NonNull<u8> {
    let sampler = Sampler::new(Arc::clone(pool), SampleMode::Count(1)).expect("sampler");
    for _ in 0..200 {
        let p = match source {
            Source::General => sampler.alloc(size, align, CacheTag::size_class(size), false),
            Source::Named => pool.alloc(size, align, NAMED),
        }
        .expect("pool object");
        let info = pool.object_info(p.as_ptr()).expect("info");
        if info.placement == side {
            return p;
        }
        free(pool, p.as_ptr()).expect("free");
    }
    panic!("no {side:?} placement in 200 allocations");
}

fn tag(source: Source, size: usize) -> CacheTag {
    match source {
        Source::General => CacheTag::size_class(size),
        Source::Named => NAMED,
    }
}

fn read(addr: usize) -> u8 {
    // SAFETY: tests only pass addresses inside the pool's mapping; when the
    // page is protected the fault handler reports and the process dies (or,
    // in report-only mode, the page is opened and the read completes).
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

fn write(addr: usize, v: u8) {
    // SAFETY: as in `read`.
    unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
}

/// In the child: whether this process is the child for `name`.
fn is_child(name: &str) -> bool {
    std::env::var(CHILD).as_deref() == Ok(name)
}

/// In the parent: runs this test binary for `name` alone as a child.
fn spawn(name: &str) -> Output {
    Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("spawn child")
}

/// Tells the parent what the report must say.
fn expect_line(line: &str) {
    eprintln!("EXPECT {line}");
}

/// Runs `name` in a child expected to die of SIGSEGV after a KFENCE report
/// with the given title; returns the report text. Every `EXPECT` line the
/// child printed must appear in the report.
fn run_faulting(name: &str, title: &str) -> String {
    let out = spawn(name);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "child {name} should die of SIGSEGV: {:?}\n{stderr}",
        out.status
    );
    let start = stderr
        .find("BUG: KFENCE: ")
        .unwrap_or_else(|| panic!("no report from {name}:\n{stderr}"));
    let report = &stderr[start..];
    assert!(report.starts_with(title), "{name}: title\n{report}");
    if cfg!(target_arch = "x86_64") {
        // The site is the faulting instruction, with its object and offset.
        let first = report.lines().next().unwrap_or("");
        assert!(first.contains(" in 0x") && first.ends_with(')'), "{first}");
    }
    for line in stderr.lines().filter_map(|l| l.strip_prefix("EXPECT ")) {
        assert!(
            report.contains(line),
            "{name}: missing {line:?} in\n{report}"
        );
    }
    assert_eq!(report.matches("BUG: KFENCE: ").count(), 1, "{report}");
    report.to_owned()
}

fn child_pool(symbolize: bool) -> Arc<Pool> {
    let pool = Arc::new(pool_with(8, 0x20_0000, symbolize));
    fault::install(&pool, FaultMode::Reraise).expect("install handler");
    pool
}

// ---- Cases that fault, in child processes ----

fn oob_child(source: Source, write_access: bool, side: Side) {
    let pool = child_pool(true);
    let size = 32;
    let placement = match side {
        Side::Left => Placement::Left,
        Side::Right => Placement::Right,
    };
    let p = alloc_at(&pool, source, size, 1, placement).as_ptr() as usize;
    let info = pool.object_info(p as *const u8).unwrap();
    let (target, distance) = match side {
        Side::Left => (p - 1, 1),
        Side::Right => (p + size, size),
    };
    expect_line(&format!(
        "Out-of-bounds {} at {target:#x} ({distance}B {} of kfence-#{}):",
        rw(write_access),
        side.name(),
        info.index
    ));
    expect_line(&format!(
        "kfence-#{}: {p:#x}-{:#x}, size=32, cache={}",
        info.index,
        p + size - 1,
        info.cache
    ));
    expect_line("allocated by thread ");
    if write_access {
        write(target, 0x42);
    } else {
        read(target);
    }
    eprintln!("no fault");
}

macro_rules! oob_case {
    ($name:ident, $source:expr, $write:expr, $side:expr) => {
        #[test]
        fn $name() {
            require_pool_pages!();
            if is_child(stringify!($name)) {
                oob_child($source, $write, $side);
                return;
            }
            let title = format!("BUG: KFENCE: out-of-bounds {}", rw($write));
            let report = run_faulting(stringify!($name), &title);
            assert!(!report.contains("freed by thread"), "{report}");
        }
    };
}

oob_case!(out_of_bounds_read_left, Source::General, false, Side::Left);
oob_case!(
    out_of_bounds_read_right,
    Source::General,
    false,
    Side::Right
);
oob_case!(out_of_bounds_write_left, Source::General, true, Side::Left);
oob_case!(
    out_of_bounds_write_right,
    Source::General,
    true,
    Side::Right
);
oob_case!(
    out_of_bounds_read_left_memcache,
    Source::Named,
    false,
    Side::Left
);
oob_case!(
    out_of_bounds_read_right_memcache,
    Source::Named,
    false,
    Side::Right
);
oob_case!(
    out_of_bounds_write_left_memcache,
    Source::Named,
    true,
    Side::Left
);
oob_case!(
    out_of_bounds_write_right_memcache,
    Source::Named,
    true,
    Side::Right
);

fn uaf_child(source: Source, write_access: bool) {
    let pool = child_pool(true);
    let p = alloc_at(&pool, source, 48, 8, Placement::Left).as_ptr() as usize;
    let info = pool.object_info(p as *const u8).unwrap();
    free(&pool, p as *const u8).expect("free");
    expect_line(&format!(
        "Use-after-free {} at {:#x} (5B into kfence-#{}):",
        rw(write_access),
        p + 5,
        info.index
    ));
    expect_line(&format!(", size=48, cache={}, ", info.cache));
    expect_line("freed by thread ");
    if write_access {
        write(p + 5, 1);
    } else {
        read(p + 5);
    }
    eprintln!("no fault");
}

macro_rules! uaf_case {
    ($name:ident, $source:expr, $write:expr) => {
        #[test]
        fn $name() {
            require_pool_pages!();
            if is_child(stringify!($name)) {
                uaf_child($source, $write);
                return;
            }
            let title = format!("BUG: KFENCE: use-after-free {}", rw($write));
            let report = run_faulting(stringify!($name), &title);
            assert!(report.contains("allocated by thread"), "{report}");
        }
    };
}

uaf_case!(use_after_free_read, Source::General, false);
uaf_case!(use_after_free_write, Source::General, true);
uaf_case!(use_after_free_read_memcache, Source::Named, false);
uaf_case!(use_after_free_write_memcache, Source::Named, true);

/// Symbolized allocation and free stacks name the functions that allocated
/// and freed (when the binary has debug info, as test builds do).
#[test]
fn use_after_free_report_has_symbolized_stacks() {
    require_pool_pages!();
    let name = "use_after_free_report_has_symbolized_stacks";
    if is_child(name) {
        uaf_child(Source::General, false);
        return;
    }
    let report = run_faulting(name, &format!("BUG: KFENCE: use-after-free {}", rw(false)));
    let alloc = report.split("allocated by thread").nth(1).unwrap();
    assert!(alloc.contains("alloc_at"), "{report}");
    let freed = report.split("freed by thread").nth(1).unwrap();
    assert!(freed.contains("uaf_child"), "{report}");
}

/// `test_krealloc`: grow, then shrink, keeping the contents, then free; the
/// first object's page stays protected, so a stale read of it faults as
/// use-after-free.
fn realloc_child(source: Source) {
    let pool = child_pool(false);
    let size = 32;
    let first = alloc_at(&pool, source, size, 8, Placement::Left).as_ptr() as usize;
    let index = pool.object_info(first as *const u8).unwrap().index;
    for i in 0..size {
        write(first + i, i as u8 + 1);
    }
    let realloc = |p: usize, n: usize| {
        // SAFETY: `p` is a live object this child owns; it is not used after
        // the move (until the deliberate stale read below).
        unsafe { pool.realloc(p as *const u8, n, 8, tag(source, n)) }
            .expect("live object")
            .expect("a free slot")
            .as_ptr() as usize
    };
    let grown = realloc(first, size * 3);
    assert_eq!(pool.usable_size(grown as *const u8), Some(size * 3));
    assert_eq!(pool.state_of(first as *const u8), Some(ObjectState::Freed));
    for i in 0..size {
        assert_eq!(read(grown + i), i as u8 + 1);
    }
    for i in size..size * 3 {
        assert_eq!(read(grown + i), 0, "grown part is zeroed");
        write(grown + i, i as u8 + 1);
    }
    let shrunk = realloc(grown, size * 2);
    assert_eq!(pool.usable_size(shrunk as *const u8), Some(size * 2));
    for i in 0..size * 2 {
        assert_eq!(read(shrunk + i), i as u8 + 1);
    }
    let info = pool.object_info(shrunk as *const u8).unwrap();
    assert_eq!(info.cache, tag(source, size * 2).name());
    free(&pool, shrunk as *const u8).unwrap();
    assert_eq!(pool.stats().bugs, 0);
    expect_line(&format!(
        "Use-after-free {} at {first:#x} (0B into kfence-#{index}):",
        rw(false)
    ));
    read(first);
    eprintln!("no fault");
}

#[test]
fn realloc_then_use_old_pointer() {
    require_pool_pages!();
    let name = "realloc_then_use_old_pointer";
    if is_child(name) {
        realloc_child(Source::General);
        return;
    }
    run_faulting(name, &format!("BUG: KFENCE: use-after-free {}", rw(false)));
}

#[test]
fn realloc_then_use_old_pointer_memcache() {
    require_pool_pages!();
    let name = "realloc_then_use_old_pointer_memcache";
    if is_child(name) {
        realloc_child(Source::Named);
        return;
    }
    run_faulting(name, &format!("BUG: KFENCE: use-after-free {}", rw(false)));
}

/// A zero-size object has no bytes: the first byte past it, at the right
/// edge of its page, is on the guard page.
fn zero_size_child(source: Source) {
    let pool = child_pool(false);
    let p = alloc_at(&pool, source, 0, 1, Placement::Right).as_ptr() as usize;
    assert_eq!(pool.usable_size(p as *const u8), Some(0));
    let index = pool.object_info(p as *const u8).unwrap().index;
    expect_line(&format!(
        "Out-of-bounds {} at {:#x} (1B right of kfence-#{index}):",
        rw(false),
        p + 1
    ));
    // An empty object is shown by its start alone.
    expect_line(&format!("kfence-#{index}: {p:#x}, size=0, "));
    read(p + 1);
    eprintln!("no fault");
}

#[test]
fn zero_size_read_faults() {
    require_pool_pages!();
    let name = "zero_size_read_faults";
    if is_child(name) {
        zero_size_child(Source::General);
        return;
    }
    run_faulting(name, &format!("BUG: KFENCE: out-of-bounds {}", rw(false)));
}

#[test]
fn zero_size_read_faults_memcache() {
    require_pool_pages!();
    let name = "zero_size_read_faults_memcache";
    if is_child(name) {
        zero_size_child(Source::Named);
        return;
    }
    run_faulting(name, &format!("BUG: KFENCE: out-of-bounds {}", rw(false)));
}

/// `test_kmalloc_aligned_oob_read`: with alignment, a right-placed object
/// may end before the page does; the first bytes past it are canary (no
/// fault), the page end faults.
#[test]
fn aligned_out_of_bounds_read() {
    require_pool_pages!();
    let name = "aligned_out_of_bounds_read";
    if is_child(name) {
        let pool = child_pool(false);
        let size = 73;
        let p = alloc_at(&pool, Source::General, size, 16, Placement::Right).as_ptr() as usize;
        assert_eq!(p % 16, 0);
        let page_end = (p & !(PAGE - 1)) + PAGE;
        assert!(p + size < page_end);
        // Inside the page: not detected by a fault.
        read(p + size);
        let index = pool.object_info(p as *const u8).unwrap().index;
        expect_line(&format!(
            "Out-of-bounds {} at {page_end:#x} ({}B right of kfence-#{index}):",
            rw(false),
            page_end - p
        ));
        read(page_end);
        eprintln!("no fault");
        return;
    }
    run_faulting(name, &format!("BUG: KFENCE: out-of-bounds {}", rw(false)));
}

/// `test_invalid_access`: pool memory that holds no object.
#[test]
fn invalid_access() {
    require_pool_pages!();
    let name = "invalid_access";
    if is_child(name) {
        let pool = child_pool(false);
        // The last guard page, with no allocated neighbour.
        let info = pool.ranges()[0];
        let p = pool.alloc(8, 8, NAMED).unwrap().as_ptr() as usize;
        let base = p - (pool.phys_addr(p as *const u8).unwrap().raw() - info.start) as usize;
        let last_guard = base + info.len as usize - PAGE;
        expect_line(&format!("Invalid {} at {:#x}:", rw(false), last_guard + 7));
        read(last_guard + 7);
        eprintln!("no fault");
        return;
    }
    run_faulting(name, &format!("BUG: KFENCE: invalid {}", rw(false)));
}

/// Faults outside the pool reach the previous handler (here the standard
/// library's, which takes the default action) unchanged, with no KFENCE
/// report.
#[test]
fn fault_outside_pool_is_passed_on() {
    require_pool_pages!();
    let name = "fault_outside_pool_is_passed_on";
    if is_child(name) {
        let _pool = child_pool(false);
        // A second pool, not registered with the handler: its guard pages
        // fault like any PROT_NONE page outside the registered pool.
        let unregistered = pool(1);
        let p = unregistered.alloc(8, 8, NAMED).unwrap().as_ptr() as usize;
        read((p & !(PAGE - 1)) - 1);
        eprintln!("no fault");
        return;
    }
    let out = spawn(name);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(!stderr.contains("KFENCE"), "{stderr}");
    assert!(!stderr.contains("no fault"), "{stderr}");
}

/// `test_use_after_free_read_nofault` in report-only mode: the report is
/// written, the page opened, execution continues, and the structured report
/// reaches the sink at the next safe point (the next allocation, or
/// `drain_faults`).
#[test]
fn report_only_mode_continues() {
    require_pool_pages!();
    let name = "report_only_mode_continues";
    if is_child(name) {
        let pool = Arc::new(pool_with(4, 0x40_0000, false));
        let seen = collect(&pool);
        fault::install(&pool, FaultMode::ReportOnly).unwrap();
        let p = pool.alloc(24, 8, NAMED).unwrap().as_ptr() as usize;
        free(&pool, p as *const u8).unwrap();
        read(p + 3);
        // Signal context cannot call the sink: nothing yet.
        assert!(seen.lock().unwrap().is_empty());
        let q = pool.alloc(24, 8, NAMED).unwrap().as_ptr() as usize;
        // The allocation was a safe point: the use-after-free is delivered.
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 1);
            assert_eq!(
                seen[0].kind(),
                ReportKind::UseAfterFree {
                    access: access(false)
                }
            );
            assert_eq!(seen[0].addr(), p + 3);
            assert_eq!(seen[0].offset(), Some(3));
            assert_eq!(seen[0].object().unwrap().state, ObjectState::Freed);
        }
        let side = pool.object_info(q as *const u8).unwrap().placement;
        let guard = if side == Placement::Left {
            q - 1
        } else {
            q + 24
        };
        read(guard);
        let reports = pool.drain_faults();
        assert_eq!(reports.len(), 1);
        assert!(matches!(
            reports[0].kind(),
            ReportKind::OutOfBounds { access: a, .. } if a == access(false)
        ));
        assert_eq!(seen.lock().unwrap().len(), 2);
        assert!(pool.drain_faults().is_empty());
        assert_eq!(pool.stats().bugs, 2);
        eprintln!("child done");
        return;
    }
    let out = spawn(name);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    assert!(stderr.contains("child done"), "{stderr}");
    assert_eq!(stderr.matches("BUG: KFENCE: ").count(), 2, "{stderr}");
    assert!(
        stderr.contains(&format!("BUG: KFENCE: use-after-free {}", rw(false))),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("BUG: KFENCE: out-of-bounds {}", rw(false))),
        "{stderr}"
    );
}

/// `test_init_on_free`: a freed object is scrubbed; a stale read (reported,
/// then let through in report-only mode) sees zeros, not the old contents.
#[test]
fn freed_objects_are_scrubbed() {
    require_pool_pages!();
    let name = "freed_objects_are_scrubbed";
    if is_child(name) {
        let pool = Arc::new(pool_with(2, 0x50_0000, false));
        let _seen = collect(&pool);
        fault::install(&pool, FaultMode::ReportOnly).unwrap();
        let size = 200;
        let p = pool.alloc(size, 8, NAMED).unwrap().as_ptr() as usize;
        for i in 0..size {
            write(p + i, 0xa5);
        }
        free(&pool, p as *const u8).unwrap();
        assert!((0..size).all(|i| read(p + i) == 0));
        assert_eq!(pool.drain_faults().len(), 1);
        eprintln!("child done");
        return;
    }
    let out = spawn(name);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    assert!(stderr.contains("child done"), "{stderr}");
    assert_eq!(
        stderr
            .matches(&format!("BUG: KFENCE: use-after-free {}", rw(false)))
            .count(),
        1,
        "{stderr}"
    );
}

// ---- Cases checked on free, in process ----

fn double_free_case(source: Source) {
    let pool = Arc::new(pool(4));
    let seen = collect(&pool);
    let p = alloc_at(&pool, source, 40, 8, Placement::Left);
    free(&pool, p.as_ptr()).unwrap();
    let r = free(&pool, p.as_ptr()).unwrap_err();
    assert_eq!(r.kind(), ReportKind::DoubleFree);
    assert!(r.title().starts_with("BUG: KFENCE: double free in "), "{r}");
    let obj = r.object().unwrap();
    assert_eq!(obj.state, ObjectState::Freed);
    assert_eq!(obj.cache, tag(source, 40).name());
    assert!(r.text().contains(&format!(
        "Double free of {:#x} (in kfence-#{}):",
        p.as_ptr() as usize,
        obj.index
    )));
    assert!(r.text().contains("freed by thread"));
    assert_eq!(seen.lock().unwrap().len(), 1);
    assert_eq!(pool.stats().bugs, 1);
    assert_eq!(pool.stats().total_frees, pool.stats().total_allocs);
}

#[test]
fn double_free() {
    require_pool_pages!();
    double_free_case(Source::General);
}

#[test]
fn double_free_memcache() {
    require_pool_pages!();
    double_free_case(Source::Named);
}

fn invalid_addr_free_case(source: Source) {
    let pool = Arc::new(pool(4));
    let seen = collect(&pool);
    let p = alloc_at(&pool, source, 40, 8, Placement::Left).as_ptr();
    // Interior pointer: refused, object unchanged.
    let r = free(&pool, p.wrapping_add(1)).unwrap_err();
    assert_eq!(r.kind(), ReportKind::InvalidFree);
    assert!(r.title().starts_with("BUG: KFENCE: invalid free in "));
    let index = r.object().unwrap().index;
    assert!(r.text().contains(&format!(
        "Invalid free of {:#x} (1B into kfence-#{index}):",
        p as usize + 1
    )));
    assert_eq!(r.offset(), Some(1));
    assert_eq!(pool.state_of(p), Some(ObjectState::Allocated));
    // A guard-page pointer names the object beside it, as the kernel does.
    let guard = p.wrapping_sub(1);
    assert!(pool.owns(guard));
    let r = free(&pool, guard).unwrap_err();
    assert_eq!(r.object().unwrap().index, index);
    assert!(
        r.text().contains(&format!(
            "Invalid free of {:#x} (1B left of kfence-#{index}):",
            guard as usize
        )),
        "{r}"
    );
    // The object page of a slot never used, and a foreign pointer.
    let info = pool.ranges()[0];
    let base = p as usize - (pool.phys_addr(p).unwrap().raw() - info.start) as usize;
    let unused = (0..4)
        .map(|i| base + (2 * i + 1) * PAGE)
        .find(|&a| pool.state_of(a as *const u8) == Some(ObjectState::Unused))
        .expect("an unused slot");
    let r = free(&pool, unused as *const u8).unwrap_err();
    assert!(r.text().contains("(not a KFENCE object)"), "{r}");
    let outside = Box::new(0u8);
    assert!(!pool.owns(&*outside));
    let r = free(&pool, &*outside).unwrap_err();
    assert_eq!(r.kind(), ReportKind::InvalidFree);
    assert!(r.object().is_none());
    assert_eq!(seen.lock().unwrap().len(), 4);
    free(&pool, p).unwrap();
    assert_eq!(pool.stats().bugs, 4);
}

#[test]
fn invalid_addr_free() {
    require_pool_pages!();
    invalid_addr_free_case(Source::General);
}

#[test]
fn invalid_addr_free_memcache() {
    require_pool_pages!();
    invalid_addr_free_case(Source::Named);
}

fn corruption_case(source: Source, side: Placement) {
    let pool = Arc::new(pool(4));
    let seen = collect(&pool);
    let size = 32;
    let p = alloc_at(&pool, source, size, 1, side).as_ptr() as usize;
    // The canary lies on the side away from the guard page.
    let bad = match side {
        Placement::Left => p + size,
        Placement::Right => p - 3,
    };
    write(bad, 0x2a);
    write(bad + 2, 0x00);
    let r = free(&pool, p as *const u8).unwrap_err();
    let ReportKind::Corruption { bytes } = r.kind() else {
        panic!("{r}");
    };
    assert_eq!(bytes[0], Some(0x2a));
    assert_eq!(bytes[1], None);
    assert_eq!(bytes[2], Some(0));
    assert_eq!(r.addr(), bad);
    assert!(r.title().starts_with("BUG: KFENCE: memory corruption in "));
    assert!(
        r.text()
            .contains(&format!("Corrupted memory at {bad:#x} [ 0x2a . 0x0 ")),
        "{r}"
    );
    // Freed regardless, and its page is protected.
    assert_eq!(pool.state_of(p as *const u8), Some(ObjectState::Freed));
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[test]
fn corruption_left_placed() {
    require_pool_pages!();
    corruption_case(Source::General, Placement::Left);
}

#[test]
fn corruption_right_placed() {
    require_pool_pages!();
    corruption_case(Source::General, Placement::Right);
}

#[test]
fn corruption_memcache() {
    require_pool_pages!();
    corruption_case(Source::Named, Placement::Left);
    corruption_case(Source::Named, Placement::Right);
}

/// `test_kmalloc_aligned_oob_write`: a write into the alignment slack past a
/// right-placed object is not a fault, but is found on free.
#[test]
fn aligned_out_of_bounds_write_is_corruption() {
    require_pool_pages!();
    let pool = Arc::new(pool(4));
    let _seen = collect(&pool);
    let size = 73;
    let p = alloc_at(&pool, Source::General, size, 16, Placement::Right).as_ptr() as usize;
    write(p + size, 0xff);
    let r = free(&pool, p as *const u8).unwrap_err();
    assert_eq!(r.addr(), p + size);
    assert!(matches!(r.kind(), ReportKind::Corruption { .. }));
}

/// A zero-size object: any byte written at it is corruption.
fn zero_size_write_case(source: Source) {
    let pool = Arc::new(pool(4));
    let _seen = collect(&pool);
    let p = alloc_at(&pool, source, 0, 1, Placement::Left).as_ptr() as usize;
    assert_eq!(pool.usable_size(p as *const u8), Some(0));
    write(p, 1);
    let r = free(&pool, p as *const u8).unwrap_err();
    assert_eq!(r.addr(), p);
    let obj = r.object().unwrap();
    assert_eq!(obj.size, 0);
    assert_eq!(obj.cache, tag(source, 0).name());
    assert!(
        r.text()
            .contains(&format!("kfence-#{}: {p:#x}, size=0, ", obj.index)),
        "{r}"
    );
}

#[test]
fn zero_size_write_is_corruption() {
    require_pool_pages!();
    zero_size_write_case(Source::General);
}

#[test]
fn zero_size_write_is_corruption_memcache() {
    require_pool_pages!();
    zero_size_write_case(Source::Named);
}

/// Moving an object that is not live is reported as the free it implies,
/// and a move the pool cannot serve leaves the object as it was.
#[test]
fn realloc_refusals() {
    require_pool_pages!();
    let pool = pool(1);
    let seen = collect(&pool);
    let p = pool.alloc(16, 8, NAMED).unwrap().as_ptr();
    write(p as usize, 7);
    // Too big for a pool object, and no second slot: nothing happens.
    // SAFETY: a refused move gives nothing up; `p` stays live and owned.
    let r = unsafe { pool.realloc(p, PAGE + 1, 8, NAMED) };
    assert!(matches!(r, Ok(None)));
    // SAFETY: as above.
    let r = unsafe { pool.realloc(p, 32, 8, NAMED) };
    assert!(matches!(r, Ok(None)));
    assert_eq!(read(p as usize), 7);
    assert_eq!(pool.usable_size(p), Some(16));
    let s = pool.stats();
    assert_eq!((s.skipped_incompatible, s.skipped_capacity), (1, 1));
    // An interior pointer, and after the free a stale one.
    // SAFETY: not a live object: only compared.
    let r = unsafe { pool.realloc(p.wrapping_add(1), 32, 8, NAMED) }.unwrap_err();
    assert_eq!(r.kind(), ReportKind::InvalidFree);
    free(&pool, p).unwrap();
    // SAFETY: as above.
    let r = unsafe { pool.realloc(p, 32, 8, NAMED) }.unwrap_err();
    assert_eq!(r.kind(), ReportKind::DoubleFree);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// `test_gfpzero`: every object comes zeroed, also when its slot is reused.
#[test]
fn objects_are_zeroed_on_reuse() {
    require_pool_pages!();
    let pool = pool(1);
    let p = pool.alloc(PAGE, 1, NAMED).unwrap().as_ptr() as usize;
    for i in 0..PAGE {
        write(p + i, 0xee);
    }
    free(&pool, p as *const u8).unwrap();
    let q = pool.alloc(PAGE, 1, NAMED).unwrap().as_ptr() as usize;
    assert_eq!(q, p, "one slot, reused");
    assert!((0..PAGE).all(|i| read(q + i) == 0));
    free(&pool, q as *const u8).unwrap();
}

/// `test_free_bulk` and `test_memcache_alloc_bulk`: fill the pool, check
/// placement, canary and bookkeeping for every object, then free in bulk.
#[test]
fn bulk_alloc_and_free() {
    require_pool_pages!();
    let pool = pool(16);
    let mut objs = Vec::new();
    for i in 0..16usize {
        let size = 1 + i * 97 % PAGE;
        let align = 1usize << (i % 5);
        let p = pool.alloc(size, align, CacheTag::size_class(size)).unwrap();
        let info = pool.object_info(p.as_ptr()).unwrap();
        assert_eq!(info.size, size);
        assert_eq!(p.as_ptr() as usize % align, 0);
        let page = p.as_ptr() as usize & !(PAGE - 1);
        match info.placement {
            Placement::Left => assert_eq!(p.as_ptr() as usize, page),
            Placement::Right => assert!(page + PAGE - (p.as_ptr() as usize + size) < align),
        }
        objs.push(p);
    }
    // Both placements occur.
    let lefts = objs
        .iter()
        .filter(|p| pool.object_info(p.as_ptr()).unwrap().placement == Placement::Left)
        .count();
    assert!(lefts > 0 && lefts < 16, "{lefts}");
    assert!(pool.alloc(8, 8, NAMED).is_none());
    let s = pool.stats();
    assert_eq!(
        (
            s.allocated,
            s.total_allocs,
            s.skipped_capacity,
            s.skipped_busy
        ),
        (16, 16, 1, 0)
    );
    for p in objs {
        free(&pool, p.as_ptr()).unwrap();
    }
    let s = pool.stats();
    assert_eq!((s.allocated, s.total_frees, s.bugs), (0, 16, 0));
}

/// Freed slots go to the tail of the free list: the most recently freed
/// object is reused last, keeping its page protected as long as possible.
#[test]
fn freed_slots_are_reused_last() {
    require_pool_pages!();
    let pool = pool(3);
    let a = pool.alloc(8, 8, NAMED).unwrap();
    let a_index = pool.object_info(a.as_ptr()).unwrap().index;
    free(&pool, a.as_ptr()).unwrap();
    let mut indices = Vec::new();
    for _ in 0..3 {
        let p = pool.alloc(8, 8, NAMED).unwrap();
        indices.push(pool.object_info(p.as_ptr()).unwrap().index);
    }
    assert_eq!(indices.last(), Some(&a_index));
}

#[test]
fn incompatible_requests_are_skipped() {
    require_pool_pages!();
    let pool = pool(2);
    assert!(pool.alloc(PAGE + 1, 1, NAMED).is_none());
    assert!(pool.alloc(8, 2 * PAGE, NAMED).is_none());
    assert!(pool.alloc(8, 3, NAMED).is_none());
    assert_eq!(pool.stats().skipped_incompatible, 3);
    assert_eq!(pool.stats().total_allocs, 0);
}

/// Several threads allocate and free through one sampler: no slot is ever
/// handed to two owners (each object keeps the pattern its owner wrote), and
/// the counters balance.
#[test]
fn concurrent_sampling_keeps_objects_private() {
    require_pool_pages!();
    let pool = Arc::new(pool(16));
    let sampler = Arc::new(Sampler::new(Arc::clone(&pool), SampleMode::Count(1)).unwrap());
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let sampler = Arc::clone(&sampler);
            std::thread::spawn(move || {
                let mut got = 0u32;
                let mut mine: Vec<(usize, usize)> = Vec::new();
                for i in 0..3000usize {
                    let size = 1 + (i * 37 + usize::from(t) * 11) % 300;
                    if let Some(p) = sampler.alloc(size, 8, NAMED, false) {
                        let a = p.as_ptr() as usize;
                        for k in 0..size {
                            write(a + k, t ^ k as u8);
                        }
                        mine.push((a, size));
                        got += 1;
                    }
                    if mine.len() > 3 || (i % 2 == 0 && !mine.is_empty()) {
                        let (a, size) = mine.remove(0);
                        for k in 0..size {
                            assert_eq!(read(a + k), t ^ k as u8, "object shared between threads");
                        }
                        free(sampler.pool(), a as *const u8).unwrap();
                    }
                }
                for (a, _) in mine {
                    free(sampler.pool(), a as *const u8).unwrap();
                }
                got
            })
        })
        .collect();
    let got: u32 = threads.into_iter().map(|h| h.join().unwrap()).sum();
    let s = pool.stats();
    assert!(got > 1000, "{got}");
    assert_eq!(s.total_allocs, u64::from(got));
    assert_eq!((s.total_frees, s.allocated, s.bugs), (u64::from(got), 0, 0));
}

// ---- Exclusion ----

#[test]
fn pool_over_scratch_is_refused() {
    require_pool_pages!();
    for class in [
        PageClass::Scratch,
        PageClass::Preservable,
        PageClass::Preserved,
        PageClass::Reserved,
    ] {
        let memory =
            AnonMemory::with_phys_base(PoolConfig::pages_for(8), PhysAddr(0x8_0000)).unwrap();
        memory.set_class(5, 1, class);
        let config = PoolConfig {
            objects: 8,
            ..PoolConfig::default()
        };
        match Pool::new(Box::new(memory), config) {
            Err(KfenceError::Excluded { offset, found }) => {
                assert_eq!(offset, PhysAddr(0x8_0000 + 5 * PAGE_SIZE));
                assert_eq!(found, class);
            }
            other => panic!("{class}: {other:?}"),
        }
    }
    let memory = AnonMemory::new(PoolConfig::pages_for(8)).unwrap();
    memory.set_class(0, PoolConfig::pages_for(8), PageClass::General);
    assert!(Pool::new(
        Box::new(memory),
        PoolConfig {
            objects: 8,
            ..PoolConfig::default()
        }
    )
    .is_ok());
    let small = AnonMemory::new(4).unwrap();
    assert!(matches!(
        Pool::new(
            Box::new(small),
            PoolConfig {
                objects: 8,
                ..PoolConfig::default()
            }
        ),
        Err(KfenceError::TooSmall {
            expected: 17,
            found: 4,
            ..
        })
    ));
}

#[test]
fn ranges_cover_the_pool() {
    require_pool_pages!();
    let pool = pool_with(8, 0x30_0000, false);
    assert_eq!(
        pool.ranges(),
        vec![PhysRange::new(PhysAddr(0x30_0000), 17 * PAGE_SIZE)]
    );
    let p = pool.alloc(8, 8, NAMED).unwrap();
    let phys = pool.phys_addr(p.as_ptr()).unwrap();
    assert!(pool.ranges()[0].contains(phys));
    assert_eq!(pool.object_info(p.as_ptr()).unwrap().phys, phys);
}

/// With every request sampled, 100,000 mixed allocations (a fifth of them
/// preservable) never put a sampled object in scratch, preservable or
/// preserved memory, even when pool pages are reclassified mid-run.
#[test]
fn sampled_objects_never_land_in_excluded_memory() {
    require_pool_pages!();
    use kho_alloc::kfence::PoolMemory;
    struct Shared(Arc<AnonMemory>);
    // SAFETY: delegates to the AnonMemory, which upholds the contract; the
    // test keeps the Arc only to reclassify pages, never touching the bytes.
    unsafe impl PoolMemory for Shared {
        fn base(&self) -> *mut u8 {
            self.0.base()
        }
        fn pages(&self) -> usize {
            self.0.pages()
        }
        fn phys_base(&self) -> PhysAddr {
            self.0.phys_base()
        }
        fn classify(&self, page: usize) -> PageClass {
            self.0.classify(page)
        }
    }
    let objects = 32;
    let memory = Arc::new(
        AnonMemory::with_phys_base(PoolConfig::pages_for(objects), PhysAddr(0x100_0000)).unwrap(),
    );
    let pool = Arc::new(
        Pool::new(
            Box::new(Shared(Arc::clone(&memory))),
            PoolConfig {
                objects,
                seed: 7,
                ..PoolConfig::default()
            },
        )
        .unwrap(),
    );
    let sampler = Sampler::new(Arc::clone(&pool), SampleMode::Count(1)).unwrap();
    // Non-sampled requests are served by a stand-in general allocator: the
    // system heap.
    enum Obj {
        Sampled(NonNull<u8>),
        Heap(Box<[u8]>),
    }
    let mut live: Vec<Obj> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut sampled = 0u64;
    let mut preserve_requests = 0u64;
    let release = |obj: Obj| match obj {
        Obj::Sampled(p) => {
            assert!(sampler.owns(p.as_ptr()));
            free(&pool, p.as_ptr()).unwrap();
        }
        Obj::Heap(b) => assert!(!sampler.owns(b.as_ptr())),
    };
    for i in 0..100_000u64 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        if i == 30_000 {
            // Object pages of slots 3, 4 and 5 become preserved, preservable
            // and scratch: they must never be handed out again.
            memory.set_class(7, 1, PageClass::Preserved);
            memory.set_class(9, 1, PageClass::Preservable);
            memory.set_class(11, 1, PageClass::Scratch);
        }
        let preserve = rng % 5 == 0;
        preserve_requests += u64::from(preserve);
        let size = (rng >> 8) as usize % 600 + 1;
        match sampler.alloc(size, 8, CacheTag::size_class(size), preserve) {
            Some(p) => {
                assert!(!preserve, "a PRESERVE request was sampled");
                sampled += 1;
                let phys = pool.phys_addr(p.as_ptr()).unwrap();
                let page = ((phys.raw() - 0x100_0000) / PAGE_SIZE) as usize;
                let class = memory.classify(page);
                assert!(class.is_poolable(), "object in {class} memory");
                live.push(Obj::Sampled(p));
            }
            None => live.push(Obj::Heap(vec![0u8; size].into_boxed_slice())),
        }
        if live.len() > 40 || rng % 3 == 0 {
            let idx = (rng >> 20) as usize % live.len();
            release(live.swap_remove(idx));
        }
    }
    for obj in live.drain(..) {
        release(obj);
    }
    let s = pool.stats();
    assert!(sampled > 20_000, "{sampled}");
    assert_eq!(s.total_allocs, sampled);
    assert_eq!(s.allocated, 0);
    assert_eq!(s.bugs, 0);
    // Every PRESERVE request, plus one refusal per reclassified slot, which
    // is then retired (and counted as such).
    assert_eq!(s.skipped_excluded, preserve_requests + 3);
    assert_eq!(s.retired, 3);
    assert!(preserve_requests > 15_000);
}

// ---- Sampling gates and disable ----

#[test]
fn interval_gate_samples_once_per_opening() {
    require_pool_pages!();
    let pool = Arc::new(pool(8));
    let sampler = Sampler::new(
        Arc::clone(&pool),
        SampleMode::Interval(Duration::from_millis(5)),
    )
    .unwrap();
    assert!(pool.stats().enabled);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sampler.gate_open() {
        assert!(Instant::now() < deadline, "gate never opened");
        std::thread::sleep(Duration::from_millis(1));
    }
    // A preservable request does not consume the open gate.
    assert!(sampler.alloc(16, 8, NAMED, true).is_none());
    assert!(sampler.gate_open());
    let p = sampler.alloc(16, 8, NAMED, false).expect("sampled");
    // The gate closed behind it.
    if !sampler.gate_open() {
        assert!(sampler.alloc(16, 8, NAMED, false).is_none());
    }
    free(&pool, p.as_ptr()).unwrap();
    sampler.disable();
    assert!(!pool.stats().enabled);
    assert!(sampler.alloc(16, 8, NAMED, false).is_none());
}

#[test]
fn count_gate_rate() {
    require_pool_pages!();
    let pool = Arc::new(pool(64));
    let sampler = Sampler::new(Arc::clone(&pool), SampleMode::Count(100)).unwrap();
    let mut sampled = 0;
    for _ in 0..20_000 {
        if let Some(p) = sampler.alloc(8, 8, NAMED, false) {
            sampled += 1;
            free(&pool, p.as_ptr()).unwrap();
        }
    }
    assert!(
        (140..=260).contains(&sampled),
        "{sampled} of 20000 at rate 100"
    );
    assert!(Sampler::new(pool, SampleMode::Count(0)).is_err());
}

/// Each count-gate sampler (and each enable of one) has its own countdown:
/// a long countdown of one does not delay another, nor the same sampler
/// switched to a shorter rate, on the same thread.
#[test]
fn count_gate_countdowns_are_per_sampler() {
    require_pool_pages!();
    let pool = Arc::new(pool(4));
    let slow = Sampler::new(Arc::clone(&pool), SampleMode::Count(u32::MAX)).unwrap();
    // Draws this thread's countdown for `slow`: practically never reached.
    let drawn = slow.alloc(8, 8, NAMED, false);
    let every = Sampler::new(Arc::clone(&pool), SampleMode::Count(1)).unwrap();
    for _ in 0..3 {
        let p = every
            .alloc(8, 8, NAMED, false)
            .expect("Count(1) samples every request");
        free(&pool, p.as_ptr()).unwrap();
        assert!(slow.alloc(8, 8, NAMED, false).is_none());
    }
    slow.enable(SampleMode::Count(1)).unwrap();
    let p = slow
        .alloc(8, 8, NAMED, false)
        .expect("the new rate applies at once");
    free(&pool, p.as_ptr()).unwrap();
    if let Some(p) = drawn {
        free(&pool, p.as_ptr()).unwrap();
    }
}

/// An invalid mode is refused and leaves the sampler as it was; `enabled`
/// counts the samplers feeding a pool.
#[test]
fn enable_refuses_invalid_modes_without_effect() {
    require_pool_pages!();
    let pool = Arc::new(pool(2));
    let a = Sampler::new(Arc::clone(&pool), SampleMode::Count(3)).unwrap();
    let b = Sampler::new(Arc::clone(&pool), SampleMode::Off).unwrap();
    assert!(matches!(
        a.enable(SampleMode::Count(0)),
        Err(KfenceError::Rate { found: 0, .. })
    ));
    assert!(a.enable(SampleMode::Interval(Duration::ZERO)).is_err());
    assert!(a.is_enabled());
    assert!(!b.is_enabled());
    b.enable(SampleMode::Count(2)).unwrap();
    a.disable();
    assert!(pool.stats().enabled, "b still feeds the pool");
    b.disable();
    b.disable();
    assert!(!pool.stats().enabled);
}

/// Disable with no allocation traffic at all, while the timer sleeps on a
/// long interval: returns promptly (design problem 3).
#[test]
fn disable_without_traffic_is_prompt() {
    require_pool_pages!();
    let pool = Arc::new(pool(2));
    let sampler = Sampler::new(
        Arc::clone(&pool),
        SampleMode::Interval(Duration::from_secs(3600)),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    sampler.disable();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!sampler.is_enabled());
    // Also with the gate open and nobody taking it.
    sampler
        .enable(SampleMode::Interval(Duration::from_millis(1)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sampler.gate_open() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = Instant::now();
    drop(sampler);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

/// Threads of this process named like the sampling timer.
fn timer_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.trim_end() == "kfence-timer")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Enables and disables racing on one sampler end in the state of the last
/// one, with every timer thread stopped: none is left opening the gate.
#[test]
fn racing_enable_and_disable_leave_no_timer_behind() {
    require_pool_pages!();
    let name = "racing_enable_and_disable_leave_no_timer_behind";
    if is_child(name) {
        let pool = Arc::new(pool(4));
        let sampler = Arc::new(Sampler::new(Arc::clone(&pool), SampleMode::Off).unwrap());
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let s = Arc::clone(&sampler);
                std::thread::spawn(move || {
                    for i in 0..200u32 {
                        match (i + t) % 3 {
                            0 => s
                                .enable(SampleMode::Interval(Duration::from_millis(1)))
                                .unwrap(),
                            1 => s.enable(SampleMode::Count(5)).unwrap(),
                            _ => s.disable(),
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        sampler
            .enable(SampleMode::Interval(Duration::from_millis(1)))
            .unwrap();
        sampler.disable();
        assert!(!sampler.is_enabled());
        assert!(!pool.stats().enabled);
        let deadline = Instant::now() + Duration::from_secs(10);
        while timer_threads() != 0 {
            assert!(Instant::now() < deadline, "{} timers left", timer_threads());
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!sampler.gate_open());
        assert!(!kho_alloc::kfence::may_sample());
        eprintln!("child done");
        return;
    }
    let out = spawn(name);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}\n{stderr}", out.status);
    assert!(stderr.contains("child done"), "{stderr}");
}

/// In a forked child the timer thread does not exist: disabling (and
/// dropping) the sampler there must still return, as it joins nothing.
#[test]
fn disable_in_a_forked_child_returns() {
    require_pool_pages!();
    let pool = Arc::new(pool(2));
    let sampler = Sampler::new(
        Arc::clone(&pool),
        SampleMode::Interval(Duration::from_secs(3600)),
    )
    .unwrap();
    // SAFETY: the child only disables and drops the sampler (atomics, a
    // try-lock, an unpark, munmap) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        sampler.disable();
        drop(sampler);
        drop(pool);
        // SAFETY: _exit ends the child without running the parent's
        // destructors or atexit handlers.
        unsafe { libc::_exit(0) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut status = 0;
    loop {
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if Instant::now() > deadline {
            // SAFETY: `pid` is our child, still running.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            // SAFETY: as above.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            panic!("disable hung in the forked child");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    sampler.disable();
}
