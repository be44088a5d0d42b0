//! The few system calls of sessions: a clock shared across `exec`, taking
//! an inherited descriptor, descriptor flags, and killing the process at a
//! fault point.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// `CLOCK_MONOTONIC` in nanoseconds. Unlike [`std::time::Instant`] the
/// value means the same in a process started by `exec`, so a predecessor
/// can pass its freeze start to its successor.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists on
    // every supported system.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Whether `fd` is an open descriptor of this process.
fn is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor flags; any integer is
    // accepted and an unknown one gives EBADF.
    let rc = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    rc >= 0
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// Set (`on`) or clear `FD_CLOEXEC` on `fd`.
pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD only reads the descriptor flags; an invalid `fd`
    // gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let want = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    if want == flags {
        return Ok(());
    }
    // SAFETY: F_SETFD only changes descriptor flags of `fd`.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, want) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `FD_CLOEXEC` is set on `fd` (`None`: not an open descriptor).
pub fn cloexec(fd: RawFd) -> Option<bool> {
    // SAFETY: F_GETFD only reads the descriptor flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    (flags >= 0).then_some(flags & libc::FD_CLOEXEC != 0)
}

/// Take ownership of the inherited descriptor `fd` and set `FD_CLOEXEC` on
/// it again, so that the process's own children do not inherit the arena.
/// Refuses the standard streams, closed descriptors, and a second call in
/// the same process.
pub(crate) fn take_inherited(fd: RawFd) -> Result<OwnedFd, &'static str> {
    if fd < 3 {
        return Err("a standard stream, not an arena");
    }
    if !is_open(fd) {
        return Err("not an open descriptor");
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err("the inherited arena was already taken");
    }
    if set_cloexec(fd, true).is_err() {
        return Err("FD_CLOEXEC cannot be set on it");
    }
    // SAFETY:
    // - `fd` is open (checked) and was left to this process by its
    //   predecessor for exactly this purpose; nothing else in the process
    //   owns it, and `TAKEN` makes this the only transfer of ownership.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Die by SIGKILL, as a crash would: no unwinding, no atexit handlers.
pub(crate) fn kill_self() -> ! {
    // SAFETY: raising a signal has no memory-safety preconditions.
    unsafe { libc::raise(libc::SIGKILL) };
    // SIGKILL cannot be caught; should raise fail, abort instead.
    std::process::abort()
}
