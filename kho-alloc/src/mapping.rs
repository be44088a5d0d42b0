//! The raw memory behind an arena: a shared file mapping, an anonymous
//! mapping, or (for Miri and tests) a page-aligned heap allocation.
//!
//! This module owns the pointer and the `libc` calls (`memfd_create`,
//! `fcntl`, `mprotect`). Everything above it works with offsets and checked
//! slices.

use std::fs::File;
use std::io;
use std::ptr::NonNull;

use memmap2::{MmapOptions, MmapRaw};

/// Alignment of heap-backed arenas: one page.
const HEAP_ALIGN: usize = 4096;

enum Backing {
    // Under Miri every arena is heap memory.
    #[cfg_attr(miri, allow(dead_code))]
    Mmap(MmapRaw),
    Heap(std::alloc::Layout),
}

/// A contiguous region of memory addressed by offsets.
pub(crate) struct Mapping {
    backing: Backing,
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.backing {
            Backing::Mmap(_) => "mmap",
            Backing::Heap(_) => "heap",
        };
        f.debug_struct("Mapping")
            .field("kind", &kind)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

// SAFETY: the mapping is plain memory owned by this value; the pointer is
// never handed out with a lifetime longer than a borrow of the mapping, and
// callers synchronise access to the bytes themselves (see `raw.rs`). Other
// mappings of the same file are the arena's to exclude (its file lock, see
// `arena.rs`), not this type's.
unsafe impl Send for Mapping {}
// SAFETY: as for `Send`: `&Mapping` only exposes the base pointer and
// `msync`/`mprotect`, which the kernel serialises.
unsafe impl Sync for Mapping {}

/// Page protections for [`Mapping::protect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(dead_code)] // used by the KFENCE pool
pub(crate) enum Protection {
    /// No access: a guard page.
    None,
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

impl Mapping {
    /// Map `len` bytes of `file` shared, writable or read-only.
    #[cfg(not(miri))]
    pub(crate) fn file(file: &File, len: usize, writable: bool) -> io::Result<Self> {
        let mut opts = MmapOptions::new();
        opts.len(len);
        let raw = if writable {
            opts.map_raw(file)?
        } else {
            opts.map_raw_read_only(file)?
        };
        Self::from_raw(raw, len, writable)
    }

    /// Under Miri there is no `mmap`: file arenas are not supported.
    #[cfg(miri)]
    pub(crate) fn file(_file: &File, _len: usize, _writable: bool) -> io::Result<Self> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    #[cfg(not(miri))]
    fn from_raw(raw: MmapRaw, len: usize, writable: bool) -> io::Result<Self> {
        let ptr = NonNull::new(raw.as_mut_ptr()).ok_or(io::ErrorKind::InvalidData)?;
        Ok(Mapping {
            backing: Backing::Mmap(raw),
            ptr,
            len,
            writable,
        })
    }

    /// Zeroed private anonymous memory (heap memory under Miri).
    #[cfg(not(miri))]
    pub(crate) fn anonymous(len: usize) -> io::Result<Self> {
        let mm = MmapOptions::new().len(len).map_anon()?;
        Self::from_raw(MmapRaw::from(mm), len, true)
    }

    /// Zeroed heap memory: Miri has no `mmap`.
    #[cfg(miri)]
    pub(crate) fn anonymous(len: usize) -> io::Result<Self> {
        Self::heap(len)
    }

    /// Zeroed, page-aligned heap memory.
    pub(crate) fn heap(len: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), HEAP_ALIGN)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY:
        // - `layout` has a non-zero size (`len.max(1)`).
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(p).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(Mapping {
            backing: Backing::Heap(layout),
            ptr,
            len,
            writable: true,
        })
    }

    /// First byte.
    #[inline]
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    #[inline]
    #[allow(dead_code)] // used by the KFENCE pool
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether writes are allowed.
    #[inline]
    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// Whether the memory is a file or anonymous mapping (as opposed to heap).
    #[inline]
    #[allow(dead_code)] // used by the KFENCE pool
    pub(crate) fn is_mmap(&self) -> bool {
        matches!(self.backing, Backing::Mmap(_))
    }

    /// Make `[offset, offset + len)` durable (`msync(MS_SYNC)`); a no-op for
    /// heap memory. The caller checks bounds.
    pub(crate) fn flush_range(&self, offset: usize, len: usize) -> io::Result<()> {
        match &self.backing {
            Backing::Mmap(raw) if len > 0 => raw.flush_range(offset, len),
            _ => Ok(()),
        }
    }

    /// Change the protection of the page-aligned range
    /// `[offset, offset + len)`. Only mmap-backed memory can be protected.
    #[cfg(not(miri))]
    #[allow(dead_code)] // used by the KFENCE pool
    pub(crate) fn protect(&self, offset: usize, len: usize, prot: Protection) -> io::Result<()> {
        if !self.is_mmap() {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or(io::ErrorKind::InvalidInput)?;
        if offset % HEAP_ALIGN != 0 || end % HEAP_ALIGN != 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let flags = match prot {
            Protection::None => libc::PROT_NONE,
            Protection::Read => libc::PROT_READ,
            Protection::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        let addr = self.ptr().wrapping_add(offset);
        // SAFETY:
        // - `addr..addr + len` lies inside this mapping (checked above) and is
        //   page aligned, so `mprotect` touches no memory we do not own.
        // - Callers never hold Rust references into a range they protect
        //   `PROT_NONE` (the KFENCE pool owns its pages exclusively).
        let rc = unsafe { libc::mprotect(addr.cast(), len, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if let Backing::Heap(layout) = self.backing {
            // SAFETY:
            // - `ptr` was returned by `alloc_zeroed(layout)` in `heap` and is
            //   freed only here, once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// Create an anonymous memory file with `memfd_create`, without
/// `MFD_CLOEXEC` so that the descriptor survives `exec`, and with sealing
/// allowed so that its size can be fixed ([`seal_size`]).
pub(crate) fn memfd(name: &str) -> io::Result<File> {
    use std::os::fd::FromRawFd;

    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY:
    // - `cname` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY:
    // - `fd` was just returned by `memfd_create`, is open, and is owned by
    //   nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Seal the size of a memfd (`F_SEAL_SHRINK | F_SEAL_GROW`): no holder of
/// the descriptor, in this process or another, can truncate the memory
/// under a mapping of it (which would turn accesses into `SIGBUS`).
pub(crate) fn seal_size(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    // SAFETY:
    // - `file` keeps the descriptor open for the call; `F_ADD_SEALS` only
    //   changes the seals of the file, no memory of this process.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Kinds of [`try_lock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockKind {
    /// `LOCK_SH`: readers.
    Shared,
    /// `LOCK_EX`: one writer.
    Exclusive,
}

/// Take an advisory `flock` on `file` without waiting. Returns `false` if
/// another open file description holds a conflicting lock.
///
/// The lock belongs to the open file description: every descriptor
/// duplicated from `file` (`dup`, `try_clone`, inheritance across `fork`
/// and `exec`) holds it too, and it is released when the last of them is
/// closed. It is never released explicitly, so that a successor holding
/// an inherited descriptor keeps it after the predecessor closes its own.
pub(crate) fn try_lock(file: &File, kind: LockKind) -> io::Result<bool> {
    use std::os::fd::AsRawFd;

    let op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    };
    loop {
        // SAFETY:
        // - `file` keeps the descriptor open for the call; `flock` touches no
        //   memory of this process.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}

/// Clear `FD_CLOEXEC` on `file` so that a successor started with `exec`
/// inherits it.
pub(crate) fn clear_cloexec(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    let fd = file.as_raw_fd();
    // SAFETY:
    // - `fd` is open for the lifetime of `file`; `F_GETFD` reads its flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY:
    // - `fd` is open; `F_SETFD` only changes descriptor flags.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A whole file mapped private and read-only, for inspection tools such as
/// `kho check`: the bytes are read through the page cache on demand, so a
/// checker touches only what it looks at.
///
/// Nothing is ever written through it. The mapping reflects later writes to
/// the file by other processes; tools inspect files at rest.
pub struct ReadOnlyFile {
    map: Option<memmap2::Mmap>,
}

impl std::fmt::Debug for ReadOnlyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadOnlyFile")
            .field("len", &self.bytes().len())
            .finish()
    }
}

impl ReadOnlyFile {
    /// Map all of `file` read-only (an empty file maps to no bytes).
    pub fn map(file: &File) -> io::Result<ReadOnlyFile> {
        let len = file.metadata()?.len();
        if len == 0 {
            return Ok(ReadOnlyFile { map: None });
        }
        usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::FileTooLarge))?;
        // SAFETY:
        // - The mapping is read-only and private to this value; no Rust
        //   reference into it outlives `&self`.
        // - The file can still be changed by another process, which the OS
        //   reflects in the mapping; inspection tools run on files at rest and
        //   treat every byte as untrusted input, so a concurrent change can
        //   produce a wrong report but no out-of-bounds access (all reads go
        //   through the slice's bounds checks).
        let map = unsafe { MmapOptions::new().map(file) }?;
        Ok(ReadOnlyFile { map: Some(map) })
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}
