//! Opt-in SIGSEGV/SIGBUS handler for the KFENCE pool.
//!
//! The handler claims only what the kernel raises for an access to a
//! protected pool page: a SIGSEGV with `si_code == SEGV_ACCERR` at an address
//! inside the registered pool. It classifies that fault (guard page:
//! out-of-bounds against the nearest allocated object; freed object page:
//! use-after-free, with the offset into the object), writes a KFENCE-format
//! report to a file descriptor (standard error by default), records it for
//! the pool's [report sink](crate::kfence::ReportSink), and then either
//! - [`FaultMode::Reraise`] (default): passes the signal on as below, so the
//!   process fails as it would have without the pool; or
//! - [`FaultMode::ReportOnly`]: makes the page accessible and continues.
//!
//! The sink cannot run in signal context: recorded reports reach it at the
//! next safe point, the pool's next allocation or free, or
//! [`Pool::drain_faults`].
//!
//! Everything else is passed on as the previous disposition (the one found
//! when the handler was first installed) would have handled it: faults
//! outside the pool, other fault codes, every SIGBUS (a SIGBUS at a pool
//! address means its backing file lost the page, which is noted in one line
//! but is not a KFENCE bug), and signals sent by a process (`kill`, `raise`,
//! `sigqueue`: `si_code <= 0`). Passing on honours the previous action:
//! - `SIG_DFL`: the default action is restored; a fault then re-executes
//!   and takes it, a sent signal is raised again and takes it on return;
//! - `SIG_IGN`: a sent signal is dropped; a fault takes the default action,
//!   as the kernel does for an ignored synchronous fault;
//! - a handler: called with the original `siginfo_t` and context, under the
//!   mask the kernel would have set (the interrupted mask, plus its
//!   `sa_mask`, plus the signal unless `SA_NODEFER`), with `SA_SIGINFO`
//!   deciding its signature and `SA_RESETHAND` making it run once;
//!   `SA_RESTART` is copied onto this handler's own action.
//!
//! The handler is async-signal-safe: it takes no lock, allocates nothing, and
//! formats into a fixed stack buffer written with `write(2)`. It finds the
//! pool through an atomic pointer to the pool's metadata, counted in and out
//! of every use, and a pool being dropped waits (boundedly) until no handler
//! is inside it, so the handler never touches metadata or memory that is
//! gone.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::kfence::text::{FdOut, Out};
use crate::kfence::{sys, Access, KfenceError, Pool, Result, Shared};

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

/// Linux's `si_code` for an access to a mapped page without permission.
const SEGV_ACCERR: i32 = 2;
/// How long dropping a pool waits for a handler still inside it.
const QUIESCE: Duration = Duration::from_secs(1);

static POOL: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());
/// Handlers between their look at [`POOL`] and their last use of it.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static MODE: AtomicU8 = AtomicU8::new(0);
static FD: AtomicI32 = AtomicI32::new(2);
static PREVIOUS: OnceLock<Previous> = OnceLock::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);
static INSTALL: Mutex<()> = Mutex::new(());

/// The actions that were in place before ours.
struct Previous {
    segv: Chained,
    bus: Chained,
}

/// One previous action.
struct Chained {
    action: libc::sigaction,
    /// Whether its `SA_RESETHAND` took effect: it is `SIG_DFL` from then on.
    reset: AtomicBool,
}

/// Registers `pool` with the fault handler, installing the handler for
/// SIGSEGV and SIGBUS on first use (the actions found then become the
/// "previous" ones). One pool is registered at a time; registering another
/// replaces it. Dropping the pool unregisters it.
pub fn install(pool: &Pool, mode: FaultMode) -> Result<()> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    // Build what reports describe code addresses with, now, in normal
    // context: the handler only reads it.
    sys::preload();
    if !INSTALLED.load(Ordering::Acquire) {
        if PREVIOUS.get().is_none() {
            let segv = query(libc::SIGSEGV)?;
            let bus = query(libc::SIGBUS)?;
            // Under INSTALL, so this is the only initialisation; set before
            // the handler can run.
            let _ = PREVIOUS.set(Previous {
                segv: Chained {
                    action: segv,
                    reset: AtomicBool::new(false),
                },
                bus: Chained {
                    action: bus,
                    reset: AtomicBool::new(false),
                },
            });
        }
        let Some(prev) = PREVIOUS.get() else {
            return Err(KfenceError::Sigaction {
                signal: libc::SIGSEGV,
                errno: 0,
            });
        };
        set_handler(libc::SIGSEGV, &prev.segv.action)?;
        if let Err(e) = set_handler(libc::SIGBUS, &prev.bus.action) {
            restore(libc::SIGSEGV, &prev.segv.action);
            return Err(e);
        }
        INSTALLED.store(true, Ordering::Release);
    }
    MODE.store(
        match mode {
            FaultMode::Reraise => 0,
            FaultMode::ReportOnly => 1,
        },
        Ordering::Release,
    );
    pool.shared().registered.store(true, Ordering::Release);
    POOL.store(Arc::as_ptr(pool.shared()).cast_mut(), Ordering::SeqCst);
    Ok(())
}

/// Sets the file descriptor fault reports are written to (default 2).
pub fn set_report_fd(fd: i32) {
    FD.store(fd, Ordering::Relaxed);
}

/// Unregisters `shared` if it is the registered pool, then waits until no
/// handler can still be using it. Returns `false` if a handler was still
/// inside after [`QUIESCE`]: the caller must then keep the pool's metadata
/// and memory alive for good.
pub(crate) fn deregister(shared: &Arc<Shared>) -> bool {
    if !shared.registered.load(Ordering::Acquire) {
        return true;
    }
    let ptr = Arc::as_ptr(shared).cast_mut();
    let _ = POOL.compare_exchange(
        ptr,
        std::ptr::null_mut(),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    // A handler that read the old pointer (this pool, or an earlier one
    // replaced by `install`) counted itself in first.
    quiesce(QUIESCE)
}

/// Waits up to `limit` for [`IN_FLIGHT`] to drop to zero.
fn quiesce(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while IN_FLIGHT.load(Ordering::SeqCst) != 0 {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    true
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

/// An action with an empty mask, the given handler and flags.
fn action(handler: usize, flags: i32) -> libc::sigaction {
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
    sa.sa_sigaction = handler;
    sa.sa_flags = flags;
    sa
}

fn set_handler(signal: i32, prev: &libc::sigaction) -> Result<()> {
    // The interrupted system call restarts as it would have under the
    // previous action.
    let flags = libc::SA_SIGINFO | libc::SA_ONSTACK | (prev.sa_flags & libc::SA_RESTART);
    let sa = action(on_fault as *const () as usize, flags);
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

/// Puts `act` back for `signal` (async-signal-safe).
fn restore(signal: i32, act: &libc::sigaction) {
    // SAFETY: `act` is a fully initialised action (one sigaction returned,
    // or one built by `action`).
    unsafe { libc::sigaction(signal, act, std::ptr::null_mut()) };
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

/// The access kind and instruction pointer are not decoded on this
/// platform: reports say "access" and give no instruction pointer.
#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
fn decode_context(_ctx: *mut libc::c_void) -> (Access, usize) {
    (Access::Unknown, 0)
}

extern "C" fn on_fault(signal: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: __errno_location has no preconditions.
    let errno_ptr = unsafe { libc::__errno_location() };
    // SAFETY: errno_ptr points to this thread's errno.
    let saved_errno = unsafe { *errno_ptr };
    // SAFETY: for an SA_SIGINFO handler the kernel passes a valid siginfo_t
    // (or null, handled) that lives for the handler's duration.
    let info_ref = unsafe { info.as_ref() };
    // A code <= 0 means a process sent the signal: never a fault.
    let code = info_ref.map_or(0, |i| i.si_code);
    let resume = match info_ref {
        Some(i) if code > 0 => {
            // SAFETY: si_addr is defined for SIGSEGV and SIGBUS raised by the
            // kernel, the only signals this handler is installed for.
            let addr = unsafe { i.si_addr() } as usize;
            IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            let resume = handle_registered(signal, code, addr, ctx);
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
            resume
        }
        _ => false,
    };
    if !resume {
        chain(signal, code <= 0, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *errno_ptr = saved_errno };
}

/// Reports a fault in the registered pool; returns whether execution may
/// continue. Runs counted in [`IN_FLIGHT`].
fn handle_registered(signal: i32, code: i32, addr: usize, ctx: *mut libc::c_void) -> bool {
    let ptr = POOL.load(Ordering::SeqCst);
    // SAFETY: a registered pointer is an `Arc<Shared>` of a live pool: a pool
    // being dropped clears it and then waits for every handler counted in
    // IN_FLIGHT (as this one is, since before the load) before its metadata
    // is freed. Shared is only read here (atomics).
    let Some(shared) = (unsafe { ptr.as_ref() }) else {
        return false;
    };
    if !shared.contains(addr) {
        return false;
    }
    let mut out = FdOut::new(FD.load(Ordering::Relaxed));
    if signal == libc::SIGBUS {
        out.s("kho-alloc: SIGBUS at ");
        out.hex(addr as u64);
        out.s(" inside the KFENCE pool: its backing memory is gone (not a KFENCE report)\n");
        out.flush();
        return false;
    }
    if code != SEGV_ACCERR {
        return false;
    }
    let (access, ip) = decode_context(ctx);
    let Some(fault) = shared.classify_fault(addr, access) else {
        return false;
    };
    shared.counters.bugs.fetch_add(1, Ordering::Relaxed);
    out.s(crate::kfence::report_separator());
    shared.render_fault(&mut out, fault, addr, ip);
    out.s(crate::kfence::report_separator());
    out.flush();
    shared.record_fault(fault, addr, ip);
    MODE.load(Ordering::Acquire) == 1 && shared.open_page(addr)
}

/// Passes a signal on to the previous disposition (see the module
/// documentation). `sent`: raised by a process, not by a fault.
fn chain(signal: libc::c_int, sent: bool, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get().map(|p| {
        if signal == libc::SIGBUS {
            &p.bus
        } else {
            &p.segv
        }
    });
    let Some(prev) = prev else {
        default_action(signal, sent);
        return;
    };
    let act = &prev.action;
    let handler = if prev.reset.load(Ordering::Acquire) {
        libc::SIG_DFL
    } else {
        act.sa_sigaction
    };
    if handler == libc::SIG_IGN {
        if !sent {
            // The kernel does not let a synchronous fault be ignored.
            default_action(signal, false);
        }
        return;
    }
    if handler == libc::SIG_DFL {
        default_action(signal, sent);
        return;
    }
    if act.sa_flags & libc::SA_RESETHAND != 0 {
        prev.reset.store(true, Ordering::Release);
    }
    let old = set_mask_for(signal, act, ctx);
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
    if let Some(old) = old {
        // SAFETY: `old` is the mask read by `set_mask_for`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
}

/// Blocks what the kernel would have blocked while running `act` for
/// `signal`: the interrupted context's mask, `act`'s mask, and the signal
/// itself unless `SA_NODEFER`. Returns the mask to restore afterwards.
fn set_mask_for(
    signal: libc::c_int,
    act: &libc::sigaction,
    ctx: *mut libc::c_void,
) -> Option<libc::sigset_t> {
    let mut mask = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    let mut old = std::mem::MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: a null new mask only reads the current one into `old`.
    let rc =
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), old.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: pthread_sigmask filled `old`.
    let old = unsafe { old.assume_init() };
    let uc = ctx.cast::<libc::ucontext_t>();
    // SAFETY: for an SA_SIGINFO handler a non-null context is a valid
    // ucontext_t for the handler's duration; otherwise the current mask
    // stands in for the interrupted one.
    let base = unsafe { uc.as_ref() }.map_or(old, |uc| uc.uc_sigmask);
    // SAFETY: `mask` is a valid sigset_t to write.
    unsafe { mask.as_mut_ptr().write(base) };
    // Signals are numbered 1 to 64 on Linux.
    for s in 1..=64 {
        // SAFETY: `act.sa_mask` is a valid sigset_t; `s` is a signal number.
        if unsafe { libc::sigismember(&act.sa_mask, s) } == 1 {
            // SAFETY: `mask` is a valid sigset_t.
            unsafe { libc::sigaddset(mask.as_mut_ptr(), s) };
        }
    }
    if act.sa_flags & libc::SA_NODEFER == 0 {
        // SAFETY: as above.
        unsafe { libc::sigaddset(mask.as_mut_ptr(), signal) };
    } else {
        // SAFETY: as above.
        unsafe { libc::sigdelset(mask.as_mut_ptr(), signal) };
    }
    // SAFETY: `mask` was initialised from `base` above.
    let mask = unsafe { mask.assume_init() };
    // SAFETY: `mask` is a valid signal set; the old mask is not requested.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut()) };
    Some(old)
}

/// Takes the default action of `signal`: restores it, then, for a sent
/// signal, sends it again (it stays blocked until this handler returns); a
/// fault takes it when its instruction re-executes.
fn default_action(signal: libc::c_int, sent: bool) {
    restore(signal, &action(libc::SIG_DFL, 0));
    if sent {
        // SAFETY: raise has no memory-safety preconditions.
        unsafe { libc::raise(signal) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kfence::{AnonMemory, PoolConfig};

    fn pool() -> Pool {
        let memory = AnonMemory::new(PoolConfig::pages_for(2)).unwrap();
        Pool::new(
            Box::new(memory),
            PoolConfig {
                objects: 2,
                ..PoolConfig::default()
            },
        )
        .unwrap()
    }

    // One test, as the handler's registration is process-wide state.
    #[test]
    #[cfg_attr(miri, ignore)]
    fn registration_neither_leaks_nor_outruns_a_running_handler() {
        // Installing keeps no reference: dropping the pool frees it.
        let p = pool();
        let weak = Arc::downgrade(p.shared());
        install(&p, FaultMode::Reraise).unwrap();
        install(&p, FaultMode::Reraise).unwrap();
        assert_eq!(
            POOL.load(Ordering::SeqCst),
            Arc::as_ptr(p.shared()).cast_mut()
        );
        drop(p);
        assert!(weak.upgrade().is_none());
        assert!(POOL.load(Ordering::SeqCst).is_null());

        // A handler counted in holds a drop back until it leaves.
        let p = pool();
        install(&p, FaultMode::Reraise).unwrap();
        let weak = Arc::downgrade(p.shared());
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        let t = std::thread::spawn(move || {
            drop(p);
            d.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "dropped under a running handler"
        );
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        t.join().unwrap();
        assert!(weak.upgrade().is_none());

        // A handler that never leaves: the drop gives up after QUIESCE and
        // keeps the metadata (and memory) alive rather than free it.
        let p = pool();
        install(&p, FaultMode::Reraise).unwrap();
        let weak = Arc::downgrade(p.shared());
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        let t = Instant::now();
        drop(p);
        assert!(t.elapsed() >= QUIESCE);
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        assert!(weak.upgrade().is_some());

        // A pool never registered is dropped at once, handler or not.
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        let p = pool();
        let t = Instant::now();
        drop(p);
        assert!(t.elapsed() < QUIESCE);
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}
