//! Opt-in SIGSEGV/SIGBUS handler for the KFENCE pool.
//!
//! A fault inside the registered pool is classified (guard page:
//! out-of-bounds against the nearest allocated object; freed object page:
//! use-after-free), reported in KFENCE format to a file descriptor (standard
//! error by default), and then either
//! - [`FaultMode::Reraise`] (default): handed to the previous handler, or,
//!   if there was none, the default action is restored and the faulting
//!   instruction re-executes, so the process dies of SIGSEGV as it would
//!   have without the pool; or
//! - [`FaultMode::ReportOnly`]: the page is made accessible and execution
//!   continues; the report is kept for [`Pool::drain_faults`].
//!
//! Faults outside the pool go to the previous handler unchanged.
//!
//! The handler is async-signal-safe: it takes no lock, allocates nothing, and
//! formats into a fixed stack buffer written with `write(2)`. It finds the
//! pool through an `AtomicPtr` to pool metadata that is intentionally leaked
//! once registered, so it stays valid for the life of the process.

use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::kfence::text::{FdOut, Out};
use crate::kfence::{Access, KfenceError, Pool, Result, Shared};

/// What happens after a pool fault has been reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultMode {
    /// Let the previous handler (or the default action) run: the process
    /// fails as it would have.
    #[default]
    Reraise,
    /// Make the faulting page accessible and continue.
    ReportOnly,
}

static POOL: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
static MODE: AtomicU8 = AtomicU8::new(0);
static FD: AtomicI32 = AtomicI32::new(2);
static PREVIOUS: OnceLock<Previous> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());

/// The actions that were in place before ours.
struct Previous {
    segv: libc::sigaction,
    bus: libc::sigaction,
}

/// Registers `pool` with the fault handler, installing the handler for
/// SIGSEGV and SIGBUS on first use (the actions found then become the
/// "previous" handlers). One pool is registered at a time; registering
/// another replaces it. The pool's metadata is leaked from this point on.
pub fn install(pool: &Pool, mode: FaultMode) -> Result<()> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    // What reports describe code addresses with, built in normal context.
    crate::kfence::sys::preload();
    MODE.store(
        match mode {
            FaultMode::Reraise => 0,
            FaultMode::ReportOnly => 1,
        },
        Ordering::Release,
    );
    let ptr = Arc::as_ptr(pool.shared()).cast_mut();
    if POOL.load(Ordering::Acquire) != ptr {
        // Leak one reference: the handler may read the metadata at any time
        // until the process exits.
        let leaked = Arc::into_raw(Arc::clone(pool.shared())).cast_mut();
        POOL.store(leaked, Ordering::Release);
    }
    if PREVIOUS.get().is_none() {
        let segv = query(libc::SIGSEGV)?;
        let bus = query(libc::SIGBUS)?;
        // Under INSTALL, so this is the only initialisation.
        let _ = PREVIOUS.set(Previous { segv, bus });
        set_handler(libc::SIGSEGV)?;
        set_handler(libc::SIGBUS)?;
    }
    Ok(())
}

/// Sets the file descriptor fault reports are written to (default 2).
pub fn set_report_fd(fd: i32) {
    FD.store(fd, Ordering::Relaxed);
}

/// Unregisters `shared` if it is the registered pool (its metadata stays
/// leaked; the handler then passes faults at its old addresses on).
pub(crate) fn deregister(shared: &Arc<Shared>) {
    let ptr = Arc::as_ptr(shared).cast_mut();
    let _ = POOL.compare_exchange(
        ptr,
        std::ptr::null_mut(),
        Ordering::AcqRel,
        Ordering::Relaxed,
    );
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn query(signal: i32) -> Result<libc::sigaction> {
    let mut old = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a null new action only queries; `old` is valid for writes.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), old.as_mut_ptr()) };
    if rc != 0 {
        return Err(KfenceError::Sigaction {
            signal,
            errno: errno(),
        });
    }
    // SAFETY: sigaction succeeded and filled `old`; all-zero was already a
    // valid value of this plain C struct.
    Ok(unsafe { old.assume_init() })
}

fn set_handler(signal: i32) -> Result<()> {
    let mut sa = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    let sa_ptr = sa.as_mut_ptr();
    // SAFETY: `sa_ptr` points to a zeroed sigaction we own; taking the
    // address of its mask field creates no reference.
    let mask = unsafe { std::ptr::addr_of_mut!((*sa_ptr).sa_mask) };
    // SAFETY: `mask` points to a valid sigset_t inside `sa`.
    unsafe { libc::sigemptyset(mask) };
    // SAFETY: all-zero is a valid sigaction (a plain C struct) and the mask
    // was initialised above.
    let mut sa = unsafe { sa.assume_init() };
    sa.sa_sigaction = on_fault as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `sa` is a fully initialised action whose handler has the
    // SA_SIGINFO signature; the old action is not requested.
    let rc = unsafe { libc::sigaction(signal, &sa, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(KfenceError::Sigaction {
            signal,
            errno: errno(),
        });
    }
    Ok(())
}

/// Restores the default action for `signal` (async-signal-safe).
fn reset_default(signal: i32) {
    let mut sa = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    let sa_ptr = sa.as_mut_ptr();
    // SAFETY: `sa_ptr` points to a zeroed sigaction we own; taking the
    // address of its mask field creates no reference.
    let mask = unsafe { std::ptr::addr_of_mut!((*sa_ptr).sa_mask) };
    // SAFETY: `mask` points to a valid sigset_t inside `sa`.
    unsafe { libc::sigemptyset(mask) };
    // SAFETY: all-zero is a valid sigaction, with SIG_DFL (0) as handler.
    let sa = unsafe { sa.assume_init() };
    // SAFETY: `sa` is a fully initialised action.
    unsafe { libc::sigaction(signal, &sa, std::ptr::null_mut()) };
}

/// The access kind and instruction pointer of a fault, from its context.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn decode_context(ctx: *mut libc::c_void) -> (Access, usize) {
    if ctx.is_null() {
        return (Access::Unknown, 0);
    }
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid ucontext_t
    // that lives for the handler's duration.
    let gregs = unsafe { &(*uc).uc_mcontext.gregs };
    let err = gregs.get(libc::REG_ERR as usize).copied().unwrap_or(0);
    let ip = gregs.get(libc::REG_RIP as usize).copied().unwrap_or(0);
    // Bit 1 of the page-fault error code: the access was a write.
    let access = if err & 2 != 0 {
        Access::Write
    } else {
        Access::Read
    };
    (access, ip as usize)
}

/// The access kind is not decoded on this platform.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn decode_context(_ctx: *mut libc::c_void) -> (Access, usize) {
    (Access::Unknown, 0)
}

extern "C" fn on_fault(signal: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: __errno_location has no preconditions.
    let errno_ptr = unsafe { libc::__errno_location() };
    // SAFETY: errno_ptr points to this thread's errno.
    let saved_errno = unsafe { *errno_ptr };
    if handle_pool_fault(info, ctx) {
        // SAFETY: as above.
        unsafe { *errno_ptr = saved_errno };
        return;
    }
    // SAFETY: as above.
    unsafe { *errno_ptr = saved_errno };
    chain(signal, info, ctx);
}

/// Reports a pool fault; returns whether execution may continue.
fn handle_pool_fault(info: *mut libc::siginfo_t, ctx: *mut libc::c_void) -> bool {
    if info.is_null() {
        return false;
    }
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid siginfo_t
    // (checked non-null above) that lives for the handler's duration.
    let info = unsafe { &*info };
    // SAFETY: si_addr is defined for SIGSEGV and SIGBUS, the only signals
    // this handler is installed for.
    let addr = unsafe { info.si_addr() } as usize;
    let ptr = POOL.load(Ordering::Acquire);
    if ptr.is_null() {
        return false;
    }
    // SAFETY: registered pointers come from Arc::into_raw and their
    // reference is never released, so the metadata is alive and shared-only.
    let shared = unsafe { &*ptr };
    let (access, ip) = decode_context(ctx);
    let Some(fault) = shared.classify_fault(addr, access) else {
        return false;
    };
    shared.counters.bugs.fetch_add(1, Ordering::Relaxed);
    let mut out = FdOut::new(FD.load(Ordering::Relaxed));
    out.s(crate::kfence::report_separator());
    shared.render_fault(&mut out, fault, addr, ip);
    out.s(crate::kfence::report_separator());
    out.flush();
    if MODE.load(Ordering::Acquire) == 1 {
        shared.record_fault(fault, addr, ip);
        return shared.open_page(addr);
    }
    false
}

/// Passes a signal to the previous handler, or restores the default action so
/// that the faulting instruction, re-executed, kills the process.
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(prev) = PREVIOUS.get() else {
        reset_default(signal);
        return;
    };
    let act = if signal == libc::SIGBUS {
        &prev.bus
    } else {
        &prev.segv
    };
    let handler = act.sa_sigaction;
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // An ignored SIGSEGV would re-fault forever: take the default.
        reset_default(signal);
        return;
    }
    if act.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous action was installed with SA_SIGINFO, so its
        // handler address is a function of this signature.
        let f = unsafe {
            std::mem::transmute::<
                usize,
                extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
            >(handler)
        };
        f(signal, info, ctx);
    } else {
        // SAFETY: the previous action was installed without SA_SIGINFO, so
        // its handler address is a function taking the signal number.
        let f = unsafe { std::mem::transmute::<usize, extern "C" fn(libc::c_int)>(handler) };
        f(signal);
    }
}
