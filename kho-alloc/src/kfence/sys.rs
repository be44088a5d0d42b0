//! The raw operations of the KFENCE pool: page protection, byte access to
//! pool pages, `write(2)` and stack capture. Every `unsafe` of the pool
//! proper is here; callers uphold the documented preconditions.

use std::borrow::Cow;
use std::ffi::CStr;
use std::sync::OnceLock;

/// The canary byte expected at `addr`: depends on the address, so a shifted
/// copy of valid canary bytes is still caught.
#[inline]
pub(crate) const fn canary_byte(addr: usize) -> u8 {
    0xaa ^ (addr & 7) as u8
}

/// Eight canary bytes starting at an 8-byte aligned address, as a native
/// word.
const CANARY_WORD: u64 = u64::from_ne_bytes([
    canary_byte(0),
    canary_byte(1),
    canary_byte(2),
    canary_byte(3),
    canary_byte(4),
    canary_byte(5),
    canary_byte(6),
    canary_byte(7),
]);

/// The host's page size.
pub(crate) fn host_page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).unwrap_or(0)
}

/// The calling thread's kernel thread id (cached per thread: one syscall
/// per thread, not per sampled allocation).
pub(crate) fn thread_id() -> u64 {
    thread_local! {
        static TID: u64 = {
            // SAFETY: gettid has no preconditions and cannot fail.
            let tid = unsafe { libc::gettid() };
            u64::try_from(tid).unwrap_or(0)
        };
    }
    TID.try_with(|t| *t).unwrap_or(0)
}

#[cfg(test)]
thread_local! {
    /// Makes this thread's next [`protect`] fail, for tests of that path.
    pub(crate) static FAIL_PROTECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
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
    #[cfg(test)]
    if FAIL_PROTECT.with(|f| f.replace(false)) {
        return Err(libc::ENOMEM);
    }
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
    let head = addr.wrapping_neg() % 8;
    let (head_bytes, rest) = bytes.split_at_mut(head.min(len));
    for (i, b) in head_bytes.iter_mut().enumerate() {
        *b = canary_byte(addr.wrapping_add(i));
    }
    // The rest starts 8-byte aligned, where the pattern is one fixed word.
    let word = CANARY_WORD.to_ne_bytes();
    let mut chunks = rest.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&word);
    }
    for (b, w) in chunks.into_remainder().iter_mut().zip(word) {
        *b = w;
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
    let first_bad = |from: usize, part: &[u8]| {
        part.iter()
            .enumerate()
            .find(|&(i, &b)| b != canary_byte(from.wrapping_add(i)))
            .map(|(i, _)| from.wrapping_add(i))
    };
    let head = addr.wrapping_neg() % 8;
    let (head_bytes, rest) = bytes.split_at(head.min(len));
    if let Some(a) = first_bad(addr, head_bytes) {
        return Some(a);
    }
    // Compare aligned words; only a mismatching word is searched byte-wise.
    let rest_addr = addr.wrapping_add(head_bytes.len());
    let word = CANARY_WORD.to_ne_bytes();
    let mut chunks = rest.chunks_exact(8);
    for (k, c) in (&mut chunks).enumerate() {
        if c != word {
            return first_bad(rest_addr.wrapping_add(8 * k), c);
        }
    }
    let tail = chunks.remainder();
    first_bad(rest_addr.wrapping_add(rest.len() - tail.len()), tail)
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
    pub(crate) object: Cow<'static, str>,
    /// Offset of the address from the object's load base.
    pub(crate) offset: usize,
    /// Nearest exported symbol and the offset from it.
    pub(crate) symbol: Option<(String, usize)>,
}

/// An executable segment of a loaded object.
struct Segment {
    start: usize,
    end: usize,
    base: usize,
    object: String,
}

/// Executable segments of the objects loaded when first needed, sorted by
/// address: resolving a return address is then a binary search, not a
/// `dladdr` symbol-table walk per frame.
static SEGMENTS: OnceLock<Vec<Segment>> = OnceLock::new();

fn segments() -> &'static [Segment] {
    SEGMENTS.get_or_init(|| {
        let mut v: Vec<Segment> = Vec::new();
        let data = std::ptr::addr_of_mut!(v).cast::<libc::c_void>();
        // SAFETY: the callback matches dl_iterate_phdr's signature and only
        // uses `data` as the `Vec<Segment>` passed here, which outlives the
        // call.
        unsafe { libc::dl_iterate_phdr(Some(collect_segment), data) };
        v.sort_by_key(|s| s.start);
        v
    })
}

/// `dl_iterate_phdr` callback: records the executable PT_LOAD segments of one
/// object.
///
/// # Safety
///
/// `info` must point to a valid `dl_phdr_info` and `data` to a live
/// `Vec<Segment>`, as `dl_iterate_phdr` guarantees for the call in
/// [`segments`].
unsafe extern "C" fn collect_segment(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: dl_iterate_phdr passes a valid info for the callback's duration.
    let info = unsafe { &*info };
    // SAFETY: `data` is the Vec passed by `segments`, not aliased elsewhere
    // during the iteration.
    let out = unsafe { &mut *data.cast::<Vec<Segment>>() };
    let object = if info.dlpi_name.is_null() {
        String::new()
    } else {
        // SAFETY: a non-null dlpi_name is a NUL-terminated string owned by the
        // loader, valid during the callback.
        let name = unsafe { CStr::from_ptr(info.dlpi_name) };
        name.to_string_lossy().into_owned()
    };
    let object = if object.is_empty() {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "exe".to_owned())
    } else {
        object.rsplit('/').next().unwrap_or(&object).to_owned()
    };
    let base = info.dlpi_addr as usize;
    for i in 0..usize::from(info.dlpi_phnum) {
        // SAFETY: dlpi_phdr points to an array of dlpi_phnum headers, and
        // `i < dlpi_phnum`.
        let ph = unsafe { info.dlpi_phdr.add(i) };
        // SAFETY: `ph` points into that array.
        let ph = unsafe { &*ph };
        if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_X != 0 {
            let start = base.wrapping_add(ph.p_vaddr as usize);
            out.push(Segment {
                start,
                end: start.wrapping_add(ph.p_memsz as usize),
                base,
                object: object.clone(),
            });
        }
    }
    0
}

/// Builds, in normal context, what [`describe_ip_loaded`] reads and what
/// stack capture loads on first use, so that the fault handler finds both
/// ready.
pub(crate) fn preload() {
    let _ = segments();
    let mut ips = [0usize; 1];
    let _ = capture_ips(&mut ips);
}

/// The loaded object holding `ip` and the offset from its load base, from
/// the segment table if [`preload`] built it. Async-signal-safe: it reads
/// the table and never loads, locks or allocates.
pub(crate) fn describe_ip_loaded(ip: usize) -> Option<(&'static str, usize)> {
    let segs = SEGMENTS.get()?;
    let i = segs.partition_point(|s| s.start <= ip);
    let seg = segs.get(i.checked_sub(1)?)?;
    (ip < seg.end).then(|| (seg.object.as_str(), ip - seg.base))
}

/// Describes the code address `ip`: the loaded object holding it and the
/// offset from the object's load base (what `addr2line -e object` takes).
pub(crate) fn describe_ip(ip: usize) -> Option<IpInfo> {
    let segs = segments();
    let i = segs.partition_point(|s| s.start <= ip);
    if let Some(seg) = i.checked_sub(1).and_then(|i| segs.get(i)) {
        if ip < seg.end {
            return Some(IpInfo {
                object: Cow::Borrowed(seg.object.as_str()),
                offset: ip - seg.base,
                symbol: None,
            });
        }
    }
    describe_ip_dladdr(ip)
}

/// Describes `ip` through `dladdr`, for objects loaded after the segment
/// table was built.
fn describe_ip_dladdr(ip: usize) -> Option<IpInfo> {
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
        object: Cow::Owned(base),
        offset: off,
        symbol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_fill_and_check_agree_at_every_alignment() {
        let mut buf = vec![0u8; 64];
        let base = buf.as_mut_ptr() as usize;
        for start in 0..9 {
            for len in 0..40 {
                buf.fill(0);
                // SAFETY: `start + len <= 49 <= 64`, inside `buf`, which is
                // not otherwise accessed during the calls.
                unsafe { fill_canary(base + start, len) };
                for i in 0..len {
                    assert_eq!(buf[start + i], canary_byte(base + start + i));
                }
                assert_eq!(buf.get(start + len).copied().unwrap_or(0), 0);
                // SAFETY: as above.
                assert_eq!(unsafe { find_corruption(base + start, len) }, None);
                for bad in 0..len {
                    buf[start + bad] ^= 0x10;
                    // SAFETY: as above.
                    let found = unsafe { find_corruption(base + start, len) };
                    assert_eq!(found, Some(base + start + bad));
                    buf[start + bad] ^= 0x10;
                }
            }
        }
    }
}
