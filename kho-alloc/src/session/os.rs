//! The few system calls of sessions: a clock shared across `exec`, taking
//! an inherited descriptor, and killing the process at a fault point.

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

/// Take ownership of the inherited descriptor `fd`. Refuses the standard
/// streams, closed descriptors, and a second call in the same process.
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
