//! The KFENCE pool: a port of the case list of Linux's `mm/kfence/kfence_test.c`,
//! plus exclusion, sampling-gate and disable tests.
//!
//! Cases that must fault run in a child process: the test re-executes this
//! binary for itself alone with `KHO_KFENCE_CHILD` naming it; the child sets
//! up the pool and the fault handler, prints what the report must contain,
//! then makes the bad access. The parent checks the report text on the
//! child's standard error and that the child died of SIGSEGV.
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
/// others (as the kernel test loops until KFENCE serves the request).
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
            std::mem::forget(sampler);
            return p;
        }
        pool.free(p.as_ptr()).expect("free");
    }
    panic!("no {side:?} placement in 200 allocations");
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
    let rw = if write_access { "write" } else { "read" };
    expect_line(&format!(
        "Out-of-bounds {rw} at {target:#x} ({distance}B {} of kfence-#{}):",
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
    ($name:ident, $source:expr, $write:expr, $side:expr, $title:expr) => {
        #[test]
        fn $name() {
            if is_child(stringify!($name)) {
                oob_child($source, $write, $side);
                return;
            }
            let report = run_faulting(stringify!($name), $title);
            assert!(!report.contains("freed by thread"), "{report}");
        }
    };
}

oob_case!(
    out_of_bounds_read_left,
    Source::General,
    false,
    Side::Left,
    "BUG: KFENCE: out-of-bounds read in 0x"
);
oob_case!(
    out_of_bounds_read_right,
    Source::General,
    false,
    Side::Right,
    "BUG: KFENCE: out-of-bounds read in 0x"
);
oob_case!(
    out_of_bounds_write_left,
    Source::General,
    true,
    Side::Left,
    "BUG: KFENCE: out-of-bounds write in 0x"
);
oob_case!(
    out_of_bounds_write_right,
    Source::General,
    true,
    Side::Right,
    "BUG: KFENCE: out-of-bounds write in 0x"
);
oob_case!(
    out_of_bounds_read_left_memcache,
    Source::Named,
    false,
    Side::Left,
    "BUG: KFENCE: out-of-bounds read in 0x"
);
oob_case!(
    out_of_bounds_read_right_memcache,
    Source::Named,
    false,
    Side::Right,
    "BUG: KFENCE: out-of-bounds read in 0x"
);
oob_case!(
    out_of_bounds_write_left_memcache,
    Source::Named,
    true,
    Side::Left,
    "BUG: KFENCE: out-of-bounds write in 0x"
);
oob_case!(
    out_of_bounds_write_right_memcache,
    Source::Named,
    true,
    Side::Right,
    "BUG: KFENCE: out-of-bounds write in 0x"
);

fn uaf_child(source: Source, write_access: bool) {
    let pool = child_pool(true);
    let p = alloc_at(&pool, source, 48, 8, Placement::Left).as_ptr() as usize;
    let index = pool.object_info(p as *const u8).unwrap().index;
    pool.free(p as *const u8).expect("free");
    let rw = if write_access { "write" } else { "read" };
    expect_line(&format!(
        "Use-after-free {rw} at {:#x} (in kfence-#{index}):",
        p + 5
    ));
    expect_line("freed by thread ");
    if write_access {
        write(p + 5, 1);
    } else {
        read(p + 5);
    }
    eprintln!("no fault");
}

macro_rules! uaf_case {
    ($name:ident, $source:expr, $write:expr, $title:expr) => {
        #[test]
        fn $name() {
            if is_child(stringify!($name)) {
                uaf_child($source, $write);
                return;
            }
            let report = run_faulting(stringify!($name), $title);
            assert!(report.contains("allocated by thread"), "{report}");
        }
    };
}

uaf_case!(
    use_after_free_read,
    Source::General,
    false,
    "BUG: KFENCE: use-after-free read in 0x"
);
uaf_case!(
    use_after_free_write,
    Source::General,
    true,
    "BUG: KFENCE: use-after-free write in 0x"
);
uaf_case!(
    use_after_free_read_memcache,
    Source::Named,
    false,
    "BUG: KFENCE: use-after-free read in 0x"
);

/// Symbolized allocation and free stacks name the functions that allocated
/// and freed (when the binary has debug info, as test builds do).
#[test]
fn use_after_free_report_has_symbolized_stacks() {
    let name = "use_after_free_report_has_symbolized_stacks";
    if is_child(name) {
        uaf_child(Source::General, false);
        return;
    }
    let report = run_faulting(name, "BUG: KFENCE: use-after-free read");
    let alloc = report.split("allocated by thread").nth(1).unwrap();
    assert!(alloc.contains("alloc_at"), "{report}");
    let freed = report.split("freed by thread").nth(1).unwrap();
    assert!(freed.contains("uaf_child"), "{report}");
}

/// `krealloc`-style: after moving an object, its old page is protected, so a
/// stale read faults as use-after-free; the contents moved with it.
#[test]
fn realloc_then_use_old_pointer() {
    let name = "realloc_then_use_old_pointer";
    if is_child(name) {
        let pool = child_pool(false);
        let old = pool.alloc(16, 8, NAMED).unwrap().as_ptr() as usize;
        for i in 0..16 {
            write(old + i, i as u8 + 1);
        }
        let index = pool.object_info(old as *const u8).unwrap().index;
        let new = pool
            .realloc(old as *const u8, 64, 8, NAMED)
            .unwrap()
            .unwrap();
        assert_eq!(pool.usable_size(new.as_ptr()), Some(64));
        for i in 0..16 {
            assert_eq!(read(new.as_ptr() as usize + i), i as u8 + 1);
        }
        assert_eq!(read(new.as_ptr() as usize + 16), 0);
        expect_line(&format!(
            "Use-after-free read at {old:#x} (in kfence-#{index}):"
        ));
        read(old);
        eprintln!("no fault");
        return;
    }
    run_faulting(name, "BUG: KFENCE: use-after-free read");
}

/// A zero-size object has no bytes: the first byte past it, at the right
/// edge of its page, is on the guard page.
#[test]
fn zero_size_read_faults() {
    let name = "zero_size_read_faults";
    if is_child(name) {
        let pool = child_pool(false);
        let p = alloc_at(&pool, Source::General, 0, 1, Placement::Right).as_ptr() as usize;
        assert_eq!(pool.usable_size(p as *const u8), Some(0));
        let index = pool.object_info(p as *const u8).unwrap().index;
        expect_line(&format!(
            "Out-of-bounds read at {:#x} (1B right of kfence-#{index}):",
            p + 1
        ));
        read(p + 1);
        eprintln!("no fault");
        return;
    }
    run_faulting(name, "BUG: KFENCE: out-of-bounds read");
}

/// `test_kmalloc_aligned_oob_read`: with alignment, a right-placed object
/// may end before the page does; the first bytes past it are canary (no
/// fault), the page end faults.
#[test]
fn aligned_out_of_bounds_read() {
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
            "Out-of-bounds read at {page_end:#x} ({}B right of kfence-#{index}):",
            page_end - p
        ));
        read(page_end);
        eprintln!("no fault");
        return;
    }
    run_faulting(name, "BUG: KFENCE: out-of-bounds read");
}

/// `test_invalid_access`: pool memory that holds no object.
#[test]
fn invalid_access() {
    let name = "invalid_access";
    if is_child(name) {
        let pool = child_pool(false);
        // The last guard page, with no allocated neighbour.
        let info = pool.ranges()[0];
        let p = pool.alloc(8, 8, NAMED).unwrap().as_ptr() as usize;
        let base = p - (pool.phys_addr(p as *const u8).unwrap().raw() - info.start) as usize;
        let last_guard = base + info.len as usize - PAGE;
        expect_line(&format!("Invalid read at {:#x}:", last_guard + 7));
        read(last_guard + 7);
        eprintln!("no fault");
        return;
    }
    run_faulting(name, "BUG: KFENCE: invalid read");
}

/// Faults outside the pool reach the previous handler (here the default
/// action) unchanged, with no KFENCE report.
#[test]
fn fault_outside_pool_is_passed_on() {
    let name = "fault_outside_pool_is_passed_on";
    if is_child(name) {
        let _pool = child_pool(false);
        // A second pool, not registered with the handler: its guard pages
        // fault like any PROT_NONE page outside the registered pool.
        let config = PoolConfig {
            objects: 1,
            ..PoolConfig::default()
        };
        let memory = AnonMemory::new(PoolConfig::pages_for(1)).unwrap();
        let unregistered = Pool::new(Box::new(memory), config).unwrap();
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
/// is available afterwards.
#[test]
fn report_only_mode_continues() {
    let name = "report_only_mode_continues";
    if is_child(name) {
        let pool = Arc::new(pool_with(4, 0x40_0000, false));
        fault::install(&pool, FaultMode::ReportOnly).unwrap();
        let p = pool.alloc(24, 8, NAMED).unwrap().as_ptr() as usize;
        pool.free(p as *const u8).unwrap();
        read(p);
        let q = pool.alloc(24, 8, NAMED).unwrap().as_ptr() as usize;
        let side = pool.object_info(q as *const u8).unwrap().placement;
        let guard = if side == Placement::Left {
            q - 1
        } else {
            q + 24
        };
        read(guard);
        let reports = pool.drain_faults();
        assert_eq!(reports.len(), 2);
        assert_eq!(
            reports[0].kind(),
            ReportKind::UseAfterFree {
                access: Access::Read
            }
        );
        assert_eq!(reports[0].addr(), p);
        assert!(matches!(
            reports[1].kind(),
            ReportKind::OutOfBounds {
                access: Access::Read,
                ..
            }
        ));
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
        stderr.contains("BUG: KFENCE: use-after-free read"),
        "{stderr}"
    );
    assert!(
        stderr.contains("BUG: KFENCE: out-of-bounds read"),
        "{stderr}"
    );
}

/// `test_init_on_free`: a freed object is scrubbed; a stale read (reported,
/// then let through in report-only mode) sees zeros, not the old contents.
#[test]
fn freed_objects_are_scrubbed() {
    let name = "freed_objects_are_scrubbed";
    if is_child(name) {
        let pool = Arc::new(pool_with(2, 0x50_0000, false));
        fault::install(&pool, FaultMode::ReportOnly).unwrap();
        let size = 200;
        let p = pool.alloc(size, 8, NAMED).unwrap().as_ptr() as usize;
        for i in 0..size {
            write(p + i, 0xa5);
        }
        pool.free(p as *const u8).unwrap();
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
        stderr.matches("BUG: KFENCE: use-after-free read").count(),
        1,
        "{stderr}"
    );
}

// ---- Cases checked on free, in process ----

fn double_free_case(source: Source) {
    let pool = Arc::new(pool(4));
    let seen = collect(&pool);
    let p = alloc_at(&pool, source, 40, 8, Placement::Left);
    pool.free(p.as_ptr()).unwrap();
    let r = pool.free(p.as_ptr()).unwrap_err();
    assert_eq!(r.kind(), ReportKind::DoubleFree);
    assert!(r.title().starts_with("BUG: KFENCE: double free in "), "{r}");
    let obj = r.object().unwrap();
    assert_eq!(obj.state, ObjectState::Freed);
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
    double_free_case(Source::General);
}

#[test]
fn double_free_memcache() {
    double_free_case(Source::Named);
}

fn invalid_addr_free_case(source: Source) {
    let pool = Arc::new(pool(4));
    let seen = collect(&pool);
    let p = alloc_at(&pool, source, 40, 8, Placement::Left).as_ptr();
    // Interior pointer: refused, object unchanged.
    let r = pool.free(p.wrapping_add(1)).unwrap_err();
    assert_eq!(r.kind(), ReportKind::InvalidFree);
    assert!(r.title().starts_with("BUG: KFENCE: invalid free in "));
    let index = r.object().unwrap().index;
    assert!(r.text().contains(&format!(
        "Invalid free of {:#x} (in kfence-#{index}):",
        p as usize + 1
    )));
    assert_eq!(pool.state_of(p), Some(ObjectState::Allocated));
    // A guard page and a foreign pointer.
    let guard = p.wrapping_sub(1);
    assert!(pool.owns(guard));
    let r = pool.free(guard).unwrap_err();
    assert!(r.text().contains("(not a KFENCE object)"), "{r}");
    let outside = Box::new(0u8);
    assert!(!pool.owns(&*outside));
    assert_eq!(
        pool.free(&*outside).unwrap_err().kind(),
        ReportKind::InvalidFree
    );
    assert_eq!(seen.lock().unwrap().len(), 3);
    pool.free(p).unwrap();
    assert_eq!(pool.stats().bugs, 3);
}

#[test]
fn invalid_addr_free() {
    invalid_addr_free_case(Source::General);
}

#[test]
fn invalid_addr_free_memcache() {
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
    let r = pool.free(p as *const u8).unwrap_err();
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
    corruption_case(Source::General, Placement::Left);
}

#[test]
fn corruption_right_placed() {
    corruption_case(Source::General, Placement::Right);
}

#[test]
fn corruption_memcache() {
    corruption_case(Source::Named, Placement::Left);
    corruption_case(Source::Named, Placement::Right);
}

/// `test_kmalloc_aligned_oob_write`: a write into the alignment slack past a
/// right-placed object is not a fault, but is found on free.
#[test]
fn aligned_out_of_bounds_write_is_corruption() {
    let pool = Arc::new(pool(4));
    let _seen = collect(&pool);
    let size = 73;
    let p = alloc_at(&pool, Source::General, size, 16, Placement::Right).as_ptr() as usize;
    write(p + size, 0xff);
    let r = pool.free(p as *const u8).unwrap_err();
    assert_eq!(r.addr(), p + size);
    assert!(matches!(r.kind(), ReportKind::Corruption { .. }));
}

/// A zero-size object: any byte written at it is corruption.
#[test]
fn zero_size_write_is_corruption() {
    let pool = Arc::new(pool(4));
    let _seen = collect(&pool);
    let p = alloc_at(&pool, Source::General, 0, 1, Placement::Left).as_ptr() as usize;
    assert_eq!(pool.usable_size(p as *const u8), Some(0));
    write(p, 1);
    let r = pool.free(p as *const u8).unwrap_err();
    assert_eq!(r.addr(), p);
    let obj = r.object().unwrap();
    assert_eq!(obj.size, 0);
}

/// `test_gfpzero`: every object comes zeroed, also when its slot is reused.
#[test]
fn objects_are_zeroed_on_reuse() {
    let pool = pool(1);
    let p = pool.alloc(PAGE, 1, NAMED).unwrap().as_ptr() as usize;
    for i in 0..PAGE {
        write(p + i, 0xee);
    }
    pool.free(p as *const u8).unwrap();
    let q = pool.alloc(PAGE, 1, NAMED).unwrap().as_ptr() as usize;
    assert_eq!(q, p, "one slot, reused");
    assert!((0..PAGE).all(|i| read(q + i) == 0));
    pool.free(q as *const u8).unwrap();
}

/// `test_free_bulk` and `test_memcache_alloc_bulk`: fill the pool, check
/// placement, canary and bookkeeping for every object, then free in bulk.
#[test]
fn bulk_alloc_and_free() {
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
        (s.allocated, s.total_allocs, s.skipped_capacity),
        (16, 16, 1)
    );
    for p in objs {
        pool.free(p.as_ptr()).unwrap();
    }
    let s = pool.stats();
    assert_eq!((s.allocated, s.total_frees, s.bugs), (0, 16, 0));
}

/// Freed slots go to the tail of the free list: the most recently freed
/// object is reused last, keeping its page protected as long as possible.
#[test]
fn freed_slots_are_reused_last() {
    let pool = pool(3);
    let a = pool.alloc(8, 8, NAMED).unwrap();
    let a_index = pool.object_info(a.as_ptr()).unwrap().index;
    pool.free(a.as_ptr()).unwrap();
    let mut indices = Vec::new();
    for _ in 0..3 {
        let p = pool.alloc(8, 8, NAMED).unwrap();
        indices.push(pool.object_info(p.as_ptr()).unwrap().index);
    }
    assert_eq!(indices.last(), Some(&a_index));
}

#[test]
fn incompatible_requests_are_skipped() {
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
                        sampler.free(a as *const u8).unwrap();
                    }
                }
                for (a, _) in mine {
                    sampler.free(a as *const u8).unwrap();
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
    struct Shared(Arc<AnonMemory>);
    // SAFETY: delegates to the AnonMemory, which upholds the contract; the
    // test keeps the Arc only to reclassify pages, never touching the bytes.
    unsafe impl kho_alloc::kfence::PoolMemory for Shared {
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
    use kho_alloc::kfence::PoolMemory;
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
            sampler.free(p.as_ptr()).unwrap();
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
    // Every PRESERVE request, plus one refusal per reclassified slot (which is
    // then retired).
    assert_eq!(s.skipped_excluded, preserve_requests + 3);
    assert!(preserve_requests > 15_000);
}

// ---- Sampling gates and disable ----

#[test]
fn interval_gate_samples_once_per_opening() {
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
    sampler.free(p.as_ptr()).unwrap();
    sampler.disable();
    assert!(!pool.stats().enabled);
    assert!(sampler.alloc(16, 8, NAMED, false).is_none());
}

#[test]
fn count_gate_rate() {
    let pool = Arc::new(pool(64));
    let sampler = Sampler::new(Arc::clone(&pool), SampleMode::Count(100)).unwrap();
    let mut sampled = 0;
    for _ in 0..20_000 {
        if let Some(p) = sampler.alloc(8, 8, NAMED, false) {
            sampled += 1;
            sampler.free(p.as_ptr()).unwrap();
        }
    }
    assert!(
        (150..=250).contains(&sampled),
        "{sampled} of 20000 at rate 100"
    );
    assert!(Sampler::new(pool, SampleMode::Count(0)).is_err());
}

/// Disable with no allocation traffic at all, while the timer sleeps on a
/// long interval: returns promptly (design problem 3).
#[test]
fn disable_without_traffic_is_prompt() {
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
