//! The raw operations of the KFENCE pool: page protection, byte access to
//! pool pages, `write(2)` and stack capture. Every `unsafe` of the pool
//! proper is here; callers uphold the documented preconditions.

use std::ffi::CStr;

/// The canary byte expected at `addr`: depends on the address, so a shifted
/// copy of valid canary bytes is still caught.
#[inline]
pub(crate) const fn canary_byte(addr: usize) -> u8 {
    0xaa ^ (addr & 7) as u8
}

/// The host's page size.
pub(crate) fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).unwrap_or(0)
}

/// The calling thread's kernel thread id.
pub(crate) fn thread_id() -> u64 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    u64::try_from(tid).unwrap_or(0)
}

/// Makes `addr..addr + len` accessible (read/write) or inaccessible.
/// Async-signal-safe. Returns the errno on failure.
///
/// # Safety
///
/// - `addr..addr + len` must be page-aligned memory owned by the caller's
///   pool (see [`PoolMemory`](super::PoolMemory)): no Rust reference other
///   than the pool's own transient ones may point into it when it is made
///   inaccessible.
pub(crate) unsafe fn protect(addr: usize, len: usize, accessible: bool) -> Result<(), i32> {
    let prot = if accessible {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_NONE
    };
    // SAFETY: the caller guarantees the range belongs to the pool, so changing
    // its protection cannot invalidate memory anyone else relies on.
    let rc = unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Writes the canary pattern over `addr..addr + len`.
///
/// # Safety
///
/// - the range must be accessible pool memory that no other thread accesses
///   for the duration of the call.
pub(crate) unsafe fn fill_canary(addr: usize, len: usize) {
    // SAFETY: the caller guarantees the range is accessible and unshared, so
    // a unique slice over it is valid for the duration of the call.
    let bytes = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = canary_byte(addr.wrapping_add(i));
    }
}

/// The first byte of `addr..addr + len` that does not hold its canary.
///
/// # Safety
///
/// - the range must be accessible pool memory that no other thread writes
///   for the duration of the call.
pub(crate) unsafe fn find_corruption(addr: usize, len: usize) -> Option<usize> {
    // SAFETY: the caller guarantees the range is accessible and not written
    // concurrently, so a shared slice over it is valid during the call.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
    bytes
        .iter()
        .enumerate()
        .find(|&(i, &b)| b != canary_byte(addr.wrapping_add(i)))
        .map(|(i, _)| addr.wrapping_add(i))
}

/// Copies `out.len()` bytes starting at `addr` into `out`.
///
/// # Safety
///
/// - the range must be accessible pool memory that no other thread writes
///   for the duration of the call.
pub(crate) unsafe fn read_bytes(addr: usize, out: &mut [u8]) {
    // SAFETY: the caller guarantees the range is accessible and not written
    // concurrently, so a shared slice over it is valid during the call.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, out.len()) };
    out.copy_from_slice(bytes);
}

/// Zeroes `addr..addr + len`.
///
/// # Safety
///
/// - the range must be accessible pool memory that no other thread accesses
///   for the duration of the call.
pub(crate) unsafe fn zero(addr: usize, len: usize) {
    // SAFETY: the caller guarantees the range is accessible and unshared, so
    // a unique slice over it is valid for the duration of the call.
    let bytes = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    bytes.fill(0);
}

/// Copies `len` bytes from `src` to `dst`.
///
/// # Safety
///
/// - both ranges must be accessible memory, `src` readable and `dst`
///   writable, not overlapping, and not written by another thread during the
///   call.
pub(crate) unsafe fn copy(src: usize, dst: usize, len: usize) {
    // SAFETY: the caller guarantees both ranges are valid, accessible and
    // disjoint.
    unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
}

/// Writes all of `bytes` to `fd`, retrying on short writes and `EINTR`,
/// giving up on any other error. Async-signal-safe.
pub(crate) fn write_all(fd: i32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length come from a live slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n > 0 {
            bytes = bytes.get(n as usize..).unwrap_or(&[]);
        } else if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return;
        }
    }
}

/// Captures up to `out.len()` return addresses of the calling thread's stack,
/// innermost first. Not async-signal-safe (the first call loads the unwinder).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn capture_ips(out: &mut [usize]) -> usize {
    let mut frames = [std::ptr::null_mut::<libc::c_void>(); 64];
    let want = out.len().min(frames.len());
    let want_c = libc::c_int::try_from(want).unwrap_or(0);
    // SAFETY: `frames` has room for `want` entries, which bounds what
    // backtrace writes.
    let got = unsafe { libc::backtrace(frames.as_mut_ptr(), want_c) };
    let got = usize::try_from(got).unwrap_or(0).min(want);
    for (o, f) in out.iter_mut().zip(frames.iter().take(got)) {
        *o = *f as usize;
    }
    got
}

/// Captures no frames where glibc's `backtrace` is unavailable.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn capture_ips(_out: &mut [usize]) -> usize {
    0
}

/// Where a code address lies, as far as the dynamic loader knows.
pub(crate) struct IpInfo {
    /// File name (without directories) of the object holding the address.
    pub(crate) object: String,
    /// Offset of the address from the object's load base.
    pub(crate) offset: usize,
    /// Nearest exported symbol and the offset from it.
    pub(crate) symbol: Option<(String, usize)>,
}

/// Describes the code address `ip`.
pub(crate) fn describe_ip(ip: usize) -> Option<IpInfo> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `info` is a valid, writable Dl_info; dladdr only reads the
    // address value.
    let rc = unsafe { libc::dladdr(ip as *const libc::c_void, info.as_mut_ptr()) };
    if rc == 0 {
        return None;
    }
    // SAFETY: dladdr returned non-zero, so it filled in `info`.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is non-null and points to a NUL-terminated string
    // owned by the loader, valid while the object stays loaded.
    let fname = unsafe { CStr::from_ptr(info.dli_fname) };
    let fname = fname.to_string_lossy();
    let base = fname.rsplit('/').next().unwrap_or(&fname).to_owned();
    let off = ip.wrapping_sub(info.dli_fbase as usize);
    let symbol = if info.dli_sname.is_null() {
        None
    } else {
        // SAFETY: dli_sname is non-null and points to a NUL-terminated
        // string owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dli_sname) };
        Some((
            name.to_string_lossy().into_owned(),
            ip.wrapping_sub(info.dli_saddr as usize),
        ))
    };
    Some(IpInfo {
        object: base,
        offset: off,
        symbol,
    })
}
