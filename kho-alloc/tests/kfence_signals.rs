//! The KFENCE fault handler's manners towards everything that is not a
//! KFENCE fault: signals sent with `kill`, SIGBUS, faults outside the pool,
//! and the previous disposition (`SIG_DFL`, `SIG_IGN`, or a handler with its
//! mask and flags), which it must honour as the kernel would have.
//!
//! Every case runs in a child process (this binary re-executed for that
//! test alone, `KHO_KFENCE_SIGNAL_CHILD` naming it) that sets up the
//! previous disposition, installs the handler, raises the signal and prints
//! what it saw; the parent checks the output and how the child ended.

use std::ffi::c_void;
use std::os::fd::FromRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kho_alloc::fault::{self, FaultMode};
use kho_alloc::kfence::{AnonMemory, CacheTag, PageClass, Pool, PoolConfig, PoolMemory};
use kho_core::{PhysAddr, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
const CHILD: &str = "KHO_KFENCE_SIGNAL_CHILD";
const TAG: CacheTag = CacheTag::named("signals");
/// `si_code` of an access to a mapped page without permission.
const SEGV_ACCERR: i32 = 2;

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

fn is_child(name: &str) -> bool {
    std::env::var(CHILD).as_deref() == Ok(name)
}

fn spawn(name: &str) -> (Output, String) {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("spawn child");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

fn pool() -> Arc<Pool> {
    let memory = AnonMemory::with_phys_base(PoolConfig::pages_for(4), PhysAddr(0x60_0000))
        .expect("anonymous memory");
    let config = PoolConfig {
        objects: 4,
        ..PoolConfig::default()
    };
    Arc::new(Pool::new(Box::new(memory), config).expect("pool"))
}

fn read(addr: usize) -> u8 {
    // SAFETY: tests read mapped pages only, some of them protected on
    // purpose: the fault is the point.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// A guard page of `pool`: the page before a left-placed object, or the one
/// after a right-placed one.
fn guard_of(pool: &Pool) -> usize {
    let p = pool.alloc(PAGE, 1, TAG).expect("object").as_ptr() as usize;
    p - 1
}

/// One protected anonymous page outside any pool.
fn protected_page() -> usize {
    // SAFETY: a fresh private anonymous mapping; no existing memory is
    // affected.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    p as usize
}

/// Sets the action for `signal`, as a program would have before installing
/// the KFENCE handler.
fn set_action(signal: i32, handler: usize, flags: i32, masked: &[i32]) {
    let mut sa = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    let p = sa.as_mut_ptr();
    // SAFETY: `p` points to a zeroed sigaction we own; no reference is made.
    let mask = unsafe { std::ptr::addr_of_mut!((*p).sa_mask) };
    // SAFETY: `mask` points to a valid sigset_t.
    unsafe { libc::sigemptyset(mask) };
    for s in masked {
        // SAFETY: as above; `s` is a signal number.
        unsafe { libc::sigaddset(mask, *s) };
    }
    // SAFETY: all-zero is a valid sigaction and its mask was set above.
    let mut sa = unsafe { sa.assume_init() };
    sa.sa_sigaction = handler;
    sa.sa_flags = flags;
    // SAFETY: `sa` is fully initialised; a handler address passed here has
    // the signature `flags` says.
    let rc = unsafe { libc::sigaction(signal, &sa, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
}

/// Writes `msg` to standard error (async-signal-safe).
fn say(msg: &[u8]) {
    // SAFETY: the pointer and length come from a live slice.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

/// Whether `signal` is blocked in this thread (async-signal-safe).
fn blocked(signal: i32) -> bool {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: a null new set only reads the current mask into `set`.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), set.as_mut_ptr()) };
    // SAFETY: pthread_sigmask filled `set` (zeroed before, valid either way).
    unsafe { libc::sigismember(set.as_ptr(), signal) == 1 }
}

/// Sends `signal` to this process with `kill`, then gives it time to be
/// taken: any thread of the process may take it, and a signal that kills
/// or exits must do so before this returns.
fn send_self(signal: i32) {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    std::thread::sleep(std::time::Duration::from_secs(2));
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit ends the process at once; nothing else runs.
    unsafe { libc::_exit(code) }
}

/// The address a fault is expected at.
static EXPECT_ADDR: AtomicUsize = AtomicUsize::new(0);

/// A previous `SA_SIGINFO` handler: says what it was given, then exits 42.
extern "C" fn siginfo_handler(signal: i32, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    if signal == libc::SIGSEGV {
        say(b"custom: SIGSEGV\n");
    }
    // SAFETY: the kernel (or the chaining handler, passing it on) gives a
    // valid siginfo_t for the handler's duration.
    let info = unsafe { &*info };
    // SAFETY: si_addr is defined for SIGSEGV.
    let addr = unsafe { info.si_addr() } as usize;
    if info.si_code == SEGV_ACCERR && addr == EXPECT_ADDR.load(Ordering::SeqCst) {
        say(b"custom: fault at the expected address\n");
    }
    // SAFETY: si_pid is defined for a signal sent with kill.
    if info.si_code == libc::SI_USER && unsafe { info.si_pid() } == unsafe { libc::getpid() } {
        say(b"custom: sent by this process\n");
    }
    if !ctx.is_null() {
        say(b"custom: with context\n");
    }
    if blocked(libc::SIGUSR1) {
        say(b"custom: SIGUSR1 blocked\n");
    }
    if blocked(libc::SIGSEGV) {
        say(b"custom: SIGSEGV blocked\n");
    }
    exit_now(42);
}

/// Runs the `SA_SIGINFO` case: the previous handler masks SIGUSR1; the
/// child faults at `target` (or is sent SIGSEGV) after installing.
fn custom_handler_child(target: impl FnOnce(&Pool) -> Option<usize>) {
    set_action(
        libc::SIGSEGV,
        siginfo_handler as *const () as usize,
        libc::SA_SIGINFO,
        &[libc::SIGUSR1],
    );
    let pool = pool();
    fault::install(&pool, FaultMode::Reraise).expect("install");
    match target(&pool) {
        Some(addr) => {
            EXPECT_ADDR.store(addr, Ordering::SeqCst);
            read(addr);
        }
        None => {
            send_self(libc::SIGSEGV);
        }
    }
    eprintln!("custom handler not called");
}

fn assert_custom_saw(stderr: &str, out: &Output, lines: &[&str]) {
    assert_eq!(out.status.code(), Some(42), "{:?}\n{stderr}", out.status);
    for line in lines {
        assert!(stderr.contains(line), "missing {line:?}:\n{stderr}");
    }
    // Its own mask (SIGUSR1) and the signal itself, as the kernel would
    // have blocked them.
    assert!(stderr.contains("custom: SIGUSR1 blocked"), "{stderr}");
    assert!(stderr.contains("custom: SIGSEGV blocked"), "{stderr}");
}

/// A KFENCE fault is reported, then handed to a previous `SA_SIGINFO`
/// handler with its original siginfo, context and mask.
#[test]
fn pool_fault_is_reported_then_chained_to_a_siginfo_handler() {
    require_pool_pages!();
    let name = "pool_fault_is_reported_then_chained_to_a_siginfo_handler";
    if is_child(name) {
        custom_handler_child(|pool| Some(guard_of(pool)));
        return;
    }
    let (out, stderr) = spawn(name);
    assert_custom_saw(
        &stderr,
        &out,
        &[
            "custom: fault at the expected address",
            "custom: with context",
        ],
    );
    let report = stderr.find("BUG: KFENCE: out-of-bounds").expect("report");
    let custom = stderr.find("custom: SIGSEGV").expect("custom handler");
    assert!(report < custom, "report before chaining:\n{stderr}");
}

/// A fault outside the pool goes to the previous handler, unreported.
#[test]
fn fault_outside_the_pool_reaches_a_siginfo_handler() {
    require_pool_pages!();
    let name = "fault_outside_the_pool_reaches_a_siginfo_handler";
    if is_child(name) {
        custom_handler_child(|_| Some(protected_page()));
        return;
    }
    let (out, stderr) = spawn(name);
    assert_custom_saw(&stderr, &out, &["custom: fault at the expected address"]);
    assert!(!stderr.contains("KFENCE"), "{stderr}");
}

/// A SIGSEGV sent with `kill` is not a fault, whatever its `si_addr`
/// field happens to hold: it goes to the previous handler as sent.
#[test]
fn sent_sigsegv_reaches_a_siginfo_handler() {
    require_pool_pages!();
    let name = "sent_sigsegv_reaches_a_siginfo_handler";
    if is_child(name) {
        custom_handler_child(|_| None);
        return;
    }
    let (out, stderr) = spawn(name);
    assert_custom_saw(&stderr, &out, &["custom: sent by this process"]);
    assert!(!stderr.contains("KFENCE"), "{stderr}");
}

/// With the default action before, a SIGSEGV sent with `kill` kills the
/// process, as it would have without the handler (it must not be lost).
#[test]
fn sent_sigsegv_takes_the_default_action() {
    require_pool_pages!();
    let name = "sent_sigsegv_takes_the_default_action";
    if is_child(name) {
        set_action(libc::SIGSEGV, libc::SIG_DFL, 0, &[]);
        let pool = pool();
        fault::install(&pool, FaultMode::ReportOnly).expect("install");
        send_self(libc::SIGSEGV);
        eprintln!("survived");
        return;
    }
    let (out, stderr) = spawn(name);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(!stderr.contains("survived"), "{stderr}");
    assert!(!stderr.contains("KFENCE"), "{stderr}");
}

/// With SIGSEGV ignored before, a sent SIGSEGV is dropped as it would have
/// been; a real fault is not ignorable (the kernel kills), so a KFENCE
/// fault is reported and then kills.
#[test]
fn ignored_before_drops_sent_signals_but_not_faults() {
    require_pool_pages!();
    let name = "ignored_before_drops_sent_signals_but_not_faults";
    if is_child(name) {
        set_action(libc::SIGSEGV, libc::SIG_IGN, 0, &[]);
        let pool = pool();
        fault::install(&pool, FaultMode::Reraise).expect("install");
        send_self(libc::SIGSEGV);
        eprintln!("sent signal ignored");
        read(guard_of(&pool));
        eprintln!("survived the fault");
        return;
    }
    let (out, stderr) = spawn(name);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(stderr.contains("sent signal ignored"), "{stderr}");
    assert!(stderr.contains("BUG: KFENCE: out-of-bounds"), "{stderr}");
    assert!(!stderr.contains("survived the fault"), "{stderr}");
}

static CALLS: AtomicUsize = AtomicUsize::new(0);
static OPEN_ON_FAULT: AtomicUsize = AtomicUsize::new(0);

/// A previous plain (`sa_handler`) handler that repairs the fault by
/// opening the page, so the access completes.
extern "C" fn plain_handler(signal: i32) {
    CALLS.fetch_add(1, Ordering::SeqCst);
    if signal == libc::SIGSEGV {
        say(b"plain: SIGSEGV\n");
    }
    if !blocked(libc::SIGSEGV) {
        say(b"plain: SIGSEGV not blocked\n");
    }
    let page = OPEN_ON_FAULT.load(Ordering::SeqCst);
    // SAFETY: `page` is the test's own protected anonymous page.
    unsafe { libc::mprotect(page as *mut c_void, PAGE, libc::PROT_READ) };
}

/// `SA_NODEFER` leaves the signal unblocked in the previous handler and
/// `SA_RESETHAND` makes it run once: the second fault takes the default
/// action.
#[test]
fn previous_handler_flags_are_honoured() {
    require_pool_pages!();
    let name = "previous_handler_flags_are_honoured";
    if is_child(name) {
        set_action(
            libc::SIGSEGV,
            plain_handler as *const () as usize,
            libc::SA_NODEFER | libc::SA_RESETHAND,
            &[],
        );
        let pool = pool();
        fault::install(&pool, FaultMode::Reraise).expect("install");
        let first = protected_page();
        OPEN_ON_FAULT.store(first, Ordering::SeqCst);
        assert_eq!(read(first), 0);
        eprintln!(
            "first fault repaired, calls {}",
            CALLS.load(Ordering::SeqCst)
        );
        let second = protected_page();
        OPEN_ON_FAULT.store(second, Ordering::SeqCst);
        read(second);
        eprintln!("second fault repaired");
        return;
    }
    let (out, stderr) = spawn(name);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(stderr.contains("first fault repaired, calls 1"), "{stderr}");
    assert_eq!(stderr.matches("plain: SIGSEGV\n").count(), 1, "{stderr}");
    assert!(stderr.contains("plain: SIGSEGV not blocked"), "{stderr}");
    assert!(!stderr.contains("second fault repaired"), "{stderr}");
}

/// Pool memory in a memfd, so that truncating the file makes a live
/// object's page raise SIGBUS.
struct FileMemory {
    map: memmap2::MmapMut,
    pages: usize,
}

// SAFETY: the mapping is page aligned (mmap), readable and writable until
// the value is dropped, reached only through the pool, and its geometry is
// fixed.
unsafe impl PoolMemory for FileMemory {
    fn base(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }
    fn pages(&self) -> usize {
        self.pages
    }
    fn phys_base(&self) -> PhysAddr {
        PhysAddr(0)
    }
    fn classify(&self, _page: usize) -> PageClass {
        PageClass::Kfence
    }
}

/// SIGBUS is never a KFENCE report, even at a pool address (the backing
/// file lost the page): it is noted and passed on, and a sent SIGBUS takes
/// the default action.
#[test]
fn sigbus_is_not_claimed() {
    require_pool_pages!();
    let name = "sigbus_is_not_claimed";
    if is_child(name) {
        let pages = PoolConfig::pages_for(2);
        // SAFETY: the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"kfence-sigbus".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len((pages * PAGE) as u64).unwrap();
        // SAFETY: the file is private to this test and not resized while
        // mapped, until the deliberate truncation below.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.unwrap();
        let pool = Pool::new(
            Box::new(FileMemory { map, pages }),
            PoolConfig {
                objects: 2,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        fault::install(&pool, FaultMode::ReportOnly).expect("install");
        let p = pool.alloc(64, 8, TAG).unwrap().as_ptr() as usize;
        assert_eq!(read(p), 0);
        file.set_len(0).unwrap();
        eprintln!("reading a truncated page");
        read(p);
        eprintln!("survived");
        return;
    }
    let (out, stderr) = spawn(name);
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{stderr}");
    assert!(stderr.contains("reading a truncated page"), "{stderr}");
    assert!(
        stderr.contains("SIGBUS at 0x") && stderr.contains("not a KFENCE report"),
        "{stderr}"
    );
    assert!(!stderr.contains("BUG: KFENCE"), "{stderr}");
    assert!(!stderr.contains("survived"), "{stderr}");
}

/// A SIGBUS sent with `kill` is passed on too: with the default action
/// before, it kills.
#[test]
fn sent_sigbus_takes_the_default_action() {
    require_pool_pages!();
    let name = "sent_sigbus_takes_the_default_action";
    if is_child(name) {
        set_action(libc::SIGBUS, libc::SIG_DFL, 0, &[]);
        let pool = pool();
        fault::install(&pool, FaultMode::ReportOnly).expect("install");
        send_self(libc::SIGBUS);
        eprintln!("survived");
        return;
    }
    let (out, stderr) = spawn(name);
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{stderr}");
    assert!(!stderr.contains("survived"), "{stderr}");
}
