//! The arena: one contiguous mapping with two superblock slots.
//!
//! Opening an existing arena locks the file, then reads the superblock
//! pages with ordinary reads and validates them before anything is mapped;
//! a foreign, truncated or doubly corrupt file is reported with a typed
//! error and never modified.
//!
//! # One arena per file
//!
//! The bytes of a file arena are handed out as Rust slices, so no two
//! arenas may map one file while either can write it. Every file arena
//! holds an `flock` of its file (exclusive when writable, shared when
//! read-only) for its whole life, taken without waiting: a conflicting
//! open is [`Error::Busy`]. The lock belongs to the open file description,
//! so a descriptor inherited across `exec` hands it to the successor
//! ([`Arena::open_file`]); within one process a table of open files also
//! refuses a second arena over a duplicated descriptor.
//!
//! What the lock cannot exclude, and callers must not do:
//!
//! - write or truncate the file other than through its arena: `flock` is
//!   advisory, so another program (or [`Arena::file`] used directly) can
//!   change bytes under a live slice, and shrinking a file under a mapping
//!   makes accesses fault with `SIGBUS` (memfd arenas are sealed against
//!   resizing, regular files cannot be);
//! - keep using an arena after handing its descriptor to a successor, or
//!   in both processes after `fork`: they share the open file description
//!   and so the lock.
//!
//! A handover image is committed in three separable steps, so that callers
//! can inject faults between them:
//!
//! 1. write the image bytes into arena memory that the current image does
//!    not use (the heap allocates a fresh folio for that);
//! 2. [`Arena::sync`] the image range (`msync(MS_SYNC)`);
//! 3. [`Arena::publish`] a superblock pointing at it into the slot that is
//!    *not* current, with the generation incremented, and `msync` that page.
//!
//! A crash before step 3 completes leaves the previous slot, and therefore
//! the previous image, current; a slot torn by a crash fails its CRC and is
//! ignored. A publish whose `msync` fails puts the slot page's previous
//! bytes back before returning the error, so no half-published slot stays
//! in the mapping. [`Arena::commit_image`] runs steps 2 and 3. The steps
//! carry the [`FaultPoint`]s of the commit
//! protocol.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use kho_core::{Pfn, PhysAddr, PhysRange, PAGE_SIZE};
use zerocopy::IntoBytes;

#[cfg(test)]
use crate::error::SlotError;
use crate::error::{Error, Result};
use crate::layout::{ArenaConfig, Layout, Region, MIN_ARENA_SIZE, SUPERBLOCK_PAGES};
use crate::mapping::{LockKind, Mapping};
use crate::raw;
use crate::session::fault::{self, FaultPoint};
use crate::superblock::{ImageLocation, Superblock, FLAG_RESTORED};

#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Index (0 or 1) of the current slot.
    slot: usize,
    /// Its contents.
    sb: Superblock,
}

/// A mapped arena with validated geometry.
///
/// ```
/// use kho_alloc::{Arena, ArenaConfig, Region};
/// use kho_core::Pfn;
///
/// let arena = Arena::heap(&ArenaConfig::with_size(16 << 20))?;
/// assert_eq!(arena.region_of(Pfn(0)), Some(Region::Superblock));
/// assert_eq!(arena.region_of(arena.layout().general.start), Some(Region::General));
/// assert_eq!(arena.generation(), 1);
/// # Ok::<(), kho_alloc::Error>(())
/// ```
#[derive(Debug)]
pub struct Arena {
    map: Mapping,
    layout: Layout,
    file: Option<File>,
    meta: Mutex<Meta>,
    /// This process's claim on the file, released after the mapping is
    /// gone.
    _claim: Option<Claim>,
}

/// A file held by an arena of this process: `flock` cannot tell two
/// arenas apart when they share one open file description (a duplicated
/// descriptor), so the process keeps its own table as well.
#[derive(Debug)]
struct OpenFile {
    dev: u64,
    ino: u64,
    writers: u32,
    readers: u32,
}

static OPEN_FILES: Mutex<Vec<OpenFile>> = Mutex::new(Vec::new());

fn open_files() -> MutexGuard<'static, Vec<OpenFile>> {
    OPEN_FILES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An arena's hold on its file: an entry in [`OPEN_FILES`] and an `flock`
/// of the file (exclusive for a writable arena, shared for a read-only
/// one). The entry goes on drop; the `flock` goes with the last descriptor
/// of its open file description (see [`crate::mapping::try_lock`]).
#[derive(Debug)]
struct Claim {
    dev: u64,
    ino: u64,
    writable: bool,
}

impl Claim {
    fn take(file: &File, writable: bool, path: impl Fn() -> PathBuf) -> Result<Claim> {
        use std::os::unix::fs::MetadataExt;

        let meta = file.metadata().map_err(Error::io("fstat"))?;
        let (dev, ino) = (meta.dev(), meta.ino());
        {
            let mut open = open_files();
            match open.iter_mut().find(|o| o.dev == dev && o.ino == ino) {
                Some(o) if o.writers > 0 => {
                    return Err(Error::Busy {
                        path: path(),
                        holder: "a writable arena of this process",
                    })
                }
                Some(_) if writable => {
                    return Err(Error::Busy {
                        path: path(),
                        holder: "a read-only arena of this process",
                    })
                }
                Some(o) => o.readers += 1,
                None => open.push(OpenFile {
                    dev,
                    ino,
                    writers: u32::from(writable),
                    readers: u32::from(!writable),
                }),
            }
        }
        // From here on, dropping `claim` undoes the entry.
        let claim = Claim { dev, ino, writable };
        let kind = if writable {
            LockKind::Exclusive
        } else {
            LockKind::Shared
        };
        if !crate::mapping::try_lock(file, kind).map_err(Error::io("flock"))? {
            return Err(Error::Busy {
                path: path(),
                holder: if writable {
                    "locked by another open of the file (another process or descriptor)"
                } else {
                    "locked by a writable arena"
                },
            });
        }
        Ok(claim)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut open = open_files();
        if let Some(i) = open
            .iter()
            .position(|o| o.dev == self.dev && o.ino == self.ino)
        {
            let o = &mut open[i];
            if self.writable {
                o.writers = o.writers.saturating_sub(1);
            } else {
                o.readers = o.readers.saturating_sub(1);
            }
            if o.writers == 0 && o.readers == 0 {
                open.swap_remove(i);
            }
        }
    }
}

/// What `/proc/self/fd` says `file` is, for messages.
fn descriptor_path(file: &File) -> PathBuf {
    use std::os::fd::AsRawFd;

    let fd = file.as_raw_fd();
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .unwrap_or_else(|_| PathBuf::from(format!("descriptor {fd}")))
}

impl Arena {
    /// Create (or truncate) the file at `path` and format a new arena in
    /// it. An arena open on the file (in this process or another) makes
    /// this [`Error::Busy`], and the file is then left as it was.
    pub fn create_file(path: impl AsRef<Path>, config: &ArenaConfig) -> Result<Arena> {
        let path = path.as_ref();
        let layout = config.layout()?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(Error::io("open"))?;
        let claim = Claim::take(&file, true, || path.to_owned())?;
        // Only now that no other arena can have the file mapped: shrinking
        // a file under someone's mapping turns their accesses into SIGBUS.
        file.set_len(0).map_err(Error::io("ftruncate"))?;
        file.set_len(layout.size())
            .map_err(Error::io("ftruncate"))?;
        Self::format_file(file, layout, claim)
    }

    /// Create a memfd (inheritable across `exec`) and format a new arena in
    /// it. Pass [`Arena::inheritable_fd`] to the successor. The memfd's
    /// size is sealed: no holder of the descriptor can shrink or grow it.
    pub fn create_memfd(name: &str, config: &ArenaConfig) -> Result<Arena> {
        let layout = config.layout()?;
        let file = crate::mapping::memfd(name).map_err(Error::io("memfd_create"))?;
        let claim = Claim::take(&file, true, || PathBuf::from(format!("memfd:{name}")))?;
        file.set_len(layout.size())
            .map_err(Error::io("ftruncate"))?;
        crate::mapping::seal_size(&file).map_err(Error::io("fcntl"))?;
        Self::format_file(file, layout, claim)
    }

    fn format_file(file: File, layout: Layout, claim: Claim) -> Result<Arena> {
        let len = Self::usize_len(&layout)?;
        let map = Mapping::file(&file, len, true).map_err(Error::io("mmap"))?;
        Self::format(map, layout, Some((file, claim)))
    }

    /// A new arena in private anonymous memory (heap memory under Miri).
    pub fn anonymous(config: &ArenaConfig) -> Result<Arena> {
        let layout = config.layout()?;
        let map = Mapping::anonymous(Self::usize_len(&layout)?).map_err(Error::io("mmap"))?;
        Self::format(map, layout, None)
    }

    /// A new arena in ordinary heap memory: no `mmap`, usable under Miri.
    pub fn heap(config: &ArenaConfig) -> Result<Arena> {
        let layout = config.layout()?;
        let map = Mapping::heap(Self::usize_len(&layout)?).map_err(Error::io("alloc"))?;
        Self::format(map, layout, None)
    }

    fn usize_len(layout: &Layout) -> Result<usize> {
        usize::try_from(layout.size()).map_err(|_| Error::InvalidConfig {
            what: "size",
            value: layout.size(),
            limit: usize::MAX as u64,
        })
    }

    fn format(map: Mapping, layout: Layout, file: Option<(File, Claim)>) -> Result<Arena> {
        let first = Superblock {
            layout,
            generation: 1,
            image: None,
            flags: 0,
        };
        let (file, claim) = file.unzip();
        let arena = Arena {
            map,
            layout,
            file,
            meta: Mutex::new(Meta { slot: 0, sb: first }),
            _claim: claim,
        };
        // Both slots valid: slot 1 at generation 0, slot 0 current.
        arena.write_slot(
            1,
            &Superblock {
                generation: 0,
                ..first
            },
            false,
        )?;
        arena.write_slot(0, &first, false)?;
        Ok(arena)
    }

    /// Open an existing arena file read-write. The file is locked first
    /// (an arena open on it elsewhere gives [`Error::Busy`]), then its
    /// superblocks are validated with ordinary reads before anything is
    /// mapped; nothing is written.
    pub fn open(path: impl AsRef<Path>) -> Result<Arena> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Error::io("open"))?;
        Self::open_with(file, true, Some(path))
    }

    /// Open an arena from an already open read-write descriptor, such as a
    /// memfd inherited across `exec` (see
    /// [`session::inherited_arena`](crate::session::inherited_arena)).
    ///
    /// The lock is taken on `file`'s open file description. A descriptor
    /// inherited from the predecessor shares the predecessor's, so the
    /// predecessor's lock passes to the successor; reopening the same file
    /// by path (`/proc/self/fd/N` included) makes a new description, which
    /// the predecessor's lock excludes.
    pub fn open_file(file: File) -> Result<Arena> {
        Self::open_with(file, true, None)
    }

    /// Open an arena for inspection only: mapped read-only, every write
    /// refused with [`Error::ReadOnly`]. Read-only arenas share the file
    /// with each other but not with a writable one ([`Error::Busy`]).
    pub fn open_readonly(path: impl AsRef<Path>) -> Result<Arena> {
        let path = path.as_ref();
        let file = File::open(path).map_err(Error::io("open"))?;
        Self::open_with(file, false, Some(path))
    }

    fn open_with(file: File, writable: bool, path: Option<&Path>) -> Result<Arena> {
        let claim = Claim::take(&file, writable, || match path {
            Some(p) => p.to_owned(),
            None => descriptor_path(&file),
        })?;
        // Read under the lock: no other arena can publish a slot from here
        // on, so the superblock kept in `meta` stays the current one.
        let (slot, sb) = Self::probe(&file)?;
        let len = Self::usize_len(&sb.layout)?;
        let map = Mapping::file(&file, len, writable).map_err(Error::io("mmap"))?;
        Ok(Arena {
            map,
            layout: sb.layout,
            file: Some(file),
            meta: Mutex::new(Meta { slot, sb }),
            _claim: Some(claim),
        })
    }

    /// Read and validate both superblock slots of `file`.
    fn probe(file: &File) -> Result<(usize, Superblock)> {
        let len = file.metadata().map_err(Error::io("fstat"))?.len();
        if len < MIN_ARENA_SIZE {
            return Err(Error::TooSmall {
                len,
                min: MIN_ARENA_SIZE,
            });
        }
        let mut pages = vec![0u8; (SUPERBLOCK_PAGES * PAGE_SIZE) as usize];
        file.read_exact_at(&mut pages, 0)
            .map_err(Error::io("read"))?;
        let (p0, p1) = pages.split_at(PAGE_SIZE as usize);
        crate::superblock::select(p0, p1, len)
    }

    fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The geometry.
    #[inline]
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Arena size in bytes.
    #[inline]
    pub fn size(&self) -> u64 {
        self.layout.size()
    }

    /// Pages in the arena.
    #[inline]
    pub fn pages(&self) -> u64 {
        self.layout.pages
    }

    /// The region of `pfn`, or `None` past the end.
    #[inline]
    pub fn region_of(&self, pfn: Pfn) -> Option<Region> {
        self.layout.region_of(pfn)
    }

    /// Whether the arena is mapped writable.
    pub fn is_writable(&self) -> bool {
        self.map.writable()
    }

    /// The backing file, if any (`None` for anonymous and heap arenas).
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Clear `FD_CLOEXEC` on the backing file and return its descriptor
    /// number, for a successor started with `exec`.
    pub fn inheritable_fd(&self) -> Result<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let file = self.file.as_ref().ok_or(Error::InvalidConfig {
            what: "arena has no backing file",
            value: 0,
            limit: 0,
        })?;
        crate::mapping::clear_cloexec(file).map_err(Error::io("fcntl"))?;
        Ok(file.as_raw_fd())
    }

    /// The current superblock.
    pub fn superblock(&self) -> Superblock {
        self.meta().sb
    }

    /// Generation of the current superblock.
    pub fn generation(&self) -> u64 {
        self.meta().sb.generation
    }

    /// Location of the current handover image, if one is committed.
    pub fn current_image(&self) -> Option<ImageLocation> {
        self.meta().sb.image
    }

    /// Whether the current image was already restored by a successor.
    pub fn image_restored(&self) -> bool {
        self.meta().sb.flags & FLAG_RESTORED != 0
    }

    /// Base pointer of the mapping, for the KFENCE pool.
    #[inline]
    #[allow(dead_code)] // used by the KFENCE pool
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.map.ptr()
    }

    /// The mapping, for page protection by the KFENCE pool.
    #[inline]
    #[allow(dead_code)] // used by the KFENCE pool
    pub(crate) fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// Check that `range` lies inside the arena; returns `(offset, len)`.
    pub(crate) fn check(&self, range: PhysRange) -> Result<(usize, usize)> {
        let oob = Error::OutOfBounds {
            offset: range.start,
            len: range.len,
            size: self.size(),
        };
        match range.end() {
            Some(end) if end.0 <= self.size() => {
                let off = usize::try_from(range.start).map_err(|_| oob)?;
                let len = usize::try_from(range.len).map_err(|_| Error::OutOfBounds {
                    offset: range.start,
                    len: range.len,
                    size: self.size(),
                })?;
                Ok((off, len))
            }
            _ => Err(oob),
        }
    }

    /// Read-only view of `range`. On a writable arena the superblock pages
    /// are excluded (they change under [`publish`](Self::publish)); read them
    /// through [`superblock`](Self::superblock) instead.
    pub fn bytes(&self, range: PhysRange) -> Result<&[u8]> {
        let (off, len) = self.check(range)?;
        let sb_end = SUPERBLOCK_PAGES * PAGE_SIZE;
        if self.map.writable() && len > 0 && range.start < sb_end {
            return Err(Error::OutOfBounds {
                offset: range.start,
                len: range.len,
                size: self.size(),
            });
        }
        // SAFETY:
        // - `off + len <= size`, checked above, and the mapping lives as long
        //   as `&self`.
        // - Writes through `&self` only touch the superblock pages, excluded
        //   above for writable arenas; all other writes need `&mut self`, or
        //   happen inside a `Heap` that owns this arena and never lends out
        //   `&Arena`.
        // - No other arena writes the file while this one lives: a file
        //   arena holds its file's lock (module docs), which excludes every
        //   writable arena but one; writers outside kho are excluded by
        //   contract (module docs).
        Ok(unsafe { raw::slice(self.map.ptr(), off, len) })
    }

    /// Read-only view of one page.
    pub fn page_bytes(&self, pfn: Pfn) -> Result<&[u8]> {
        let addr = pfn.addr().ok_or(Error::OutOfBounds {
            offset: u64::MAX,
            len: PAGE_SIZE,
            size: self.size(),
        })?;
        self.bytes(PhysRange::new(addr, PAGE_SIZE))
    }

    /// Mutable view of `range`, which must not touch the superblock pages.
    pub fn bytes_mut(&mut self, range: PhysRange) -> Result<&mut [u8]> {
        let (off, len) = self.check_writable(range)?;
        // SAFETY:
        // - In bounds and writable, checked above.
        // - `&mut self` excludes every other reference into the mapping.
        Ok(unsafe { raw::slice_mut(self.map.ptr(), off, len) })
    }

    /// Copy `bytes` to `at`.
    pub fn write(&mut self, at: PhysAddr, bytes: &[u8]) -> Result<()> {
        self.bytes_mut(PhysRange::new(at, bytes.len() as u64))?
            .copy_from_slice(bytes);
        Ok(())
    }

    fn check_writable(&self, range: PhysRange) -> Result<(usize, usize)> {
        if !self.map.writable() {
            return Err(Error::ReadOnly);
        }
        let (off, len) = self.check(range)?;
        if len > 0 && range.start < SUPERBLOCK_PAGES * PAGE_SIZE {
            return Err(Error::OutOfBounds {
                offset: range.start,
                len: range.len,
                size: self.size(),
            });
        }
        Ok((off, len))
    }

    /// Mutable view of `range` through a shared reference.
    ///
    /// # Safety
    ///
    /// - No other reference to any byte of `range` exists while the result
    ///   lives (the caller owns those bytes through its allocator state).
    #[allow(clippy::mut_from_ref, dead_code)]
    pub(crate) unsafe fn slice_mut_shared(&self, range: PhysRange) -> Result<&mut [u8]> {
        let (off, len) = self.check_writable(range)?;
        // SAFETY:
        // - In bounds and writable, checked above.
        // - Exclusivity is the caller's contract.
        Ok(unsafe { raw::slice_mut(self.map.ptr(), off, len) })
    }

    /// Shared view of `range` through a shared reference, including on
    /// writable arenas.
    ///
    /// # Safety
    ///
    /// - Nothing writes any byte of `range` while the result lives.
    pub(crate) unsafe fn slice_shared(&self, range: PhysRange) -> Result<&[u8]> {
        let (off, len) = self.check(range)?;
        // SAFETY:
        // - In bounds, checked above; no concurrent writes (caller).
        Ok(unsafe { raw::slice(self.map.ptr(), off, len) })
    }

    /// Make `range` durable: `msync(MS_SYNC)` of the pages it touches (a
    /// no-op for anonymous and heap arenas).
    pub fn sync(&self, range: PhysRange) -> Result<()> {
        self.check(range)?;
        let (first, end) = range.pfns().ok_or(Error::OutOfBounds {
            offset: range.start,
            len: range.len,
            size: self.size(),
        })?;
        let off = (first.0 * PAGE_SIZE) as usize;
        let len = ((end.0 - first.0) * PAGE_SIZE) as usize;
        self.map.flush_range(off, len).map_err(Error::io("msync"))
    }

    /// Write `sb` into slot `slot` and `msync` its page. If the `msync`
    /// fails, the page's previous bytes are put back (and synced as far as
    /// the system allows), so that a failed publish leaves no new slot in
    /// the mapping for a later reader or writeback to pick up.
    ///
    /// `publishing` enables the fault points of a publish (not of
    /// [`format`](Self::format)).
    fn write_slot(&self, slot: usize, sb: &Superblock, publishing: bool) -> Result<()> {
        if !self.map.writable() {
            return Err(Error::ReadOnly);
        }
        let raw = sb.encode();
        let raw = raw.as_bytes();
        let off = slot * PAGE_SIZE as usize;
        // SAFETY:
        // - `off + PAGE_SIZE <= size` because every arena has at least
        //   `MIN_ARENA_SIZE` bytes, and the mapping is writable (checked).
        // - Superblock pages are written only here, under the `meta` lock
        //   (or before the arena is shared, in `format`), and `bytes` never
        //   lends them out on a writable arena.
        let page = unsafe { raw::slice_mut(self.map.ptr(), off, PAGE_SIZE as usize) };
        let mut old = [0u8; PAGE_SIZE as usize];
        old.copy_from_slice(page);
        let sync = |page: &mut [u8], fault: Option<FaultPoint>| {
            let injected = match fault {
                Some(point) => fault::hit(point),
                None => Ok(()),
            };
            let synced = injected.and_then(|()| self.map.flush_range(off, PAGE_SIZE as usize));
            if let Err(e) = synced {
                page.copy_from_slice(&old);
                let _ = self.map.flush_range(off, PAGE_SIZE as usize);
                return Err(Error::Io {
                    op: "msync",
                    source: e,
                });
            }
            Ok(())
        };
        if publishing && fault::armed(FaultPoint::TornSuperblock) {
            // What a crash in the middle of the slot write leaves: the
            // first half of the new slot over the old one, durable.
            let half = raw.len() / 2;
            page[..half].copy_from_slice(&raw[..half]);
            let _ = self.map.flush_range(off, PAGE_SIZE as usize);
            sync(page, Some(FaultPoint::TornSuperblock))?;
        }
        page.fill(0);
        page[..raw.len()].copy_from_slice(raw);
        sync(page, publishing.then_some(FaultPoint::BeforeSlotSync))
    }

    /// Step 3 of a commit: write the superblock for `image` (or no image)
    /// into the non-current slot with the next generation, `msync` it, and
    /// make it current. Returns the new generation. The caller must have
    /// made the image bytes durable first ([`sync`](Self::sync)). On error
    /// the previous slot stays current and the other slot's bytes are
    /// unchanged.
    pub fn publish(&self, image: Option<ImageLocation>) -> Result<u64> {
        self.check_image_location(image)?;
        let mut meta = self.meta();
        self.publish_locked(&mut meta, image, 0)
    }

    fn check_image_location(&self, image: Option<ImageLocation>) -> Result<()> {
        if let Some(loc) = image {
            let range = PhysRange::new(PhysAddr(loc.offset), loc.len);
            self.check(range)?;
            if loc.offset < SUPERBLOCK_PAGES * PAGE_SIZE {
                return Err(Error::OutOfBounds {
                    offset: loc.offset,
                    len: loc.len,
                    size: self.size(),
                });
            }
        }
        Ok(())
    }

    fn publish_locked(
        &self,
        meta: &mut Meta,
        image: Option<ImageLocation>,
        flags: u32,
    ) -> Result<u64> {
        let next = Superblock {
            layout: self.layout,
            generation: meta.sb.generation.wrapping_add(1),
            image,
            flags,
        };
        let slot = 1 - meta.slot;
        self.write_slot(slot, &next, true)?;
        *meta = Meta { slot, sb: next };
        // The slot is durable: nothing after this point fails the publish.
        let _ = fault::hit(FaultPoint::AfterPublish);
        Ok(next.generation)
    }

    /// Give up the current handover image without restoring it: publish a
    /// superblock without an image (the next generation) and return its
    /// generation. Without an image nothing is written.
    pub fn discard_image(&self) -> Result<u64> {
        if self.current_image().is_none() {
            return Ok(self.generation());
        }
        self.publish(None)
    }

    /// Steps 2 and 3 of a commit: `msync` the image range, then publish.
    pub fn commit_image(&self, image: ImageLocation) -> Result<u64> {
        self.check_image_location(Some(image))?;
        self.sync(PhysRange::new(PhysAddr(image.offset), image.len))?;
        fault::hit(FaultPoint::AfterImageSync).map_err(Error::io("publish"))?;
        let mut meta = self.meta();
        self.publish_locked(&mut meta, Some(image), 0)
    }

    /// [`commit_image`](Self::commit_image) of an image that records
    /// `generation`: refused, with nothing written, unless that is the
    /// generation the publish produces (an image frozen before another
    /// commit would otherwise be published under a generation it does not
    /// record).
    pub(crate) fn commit_image_as(&self, image: ImageLocation, generation: u64) -> Result<u64> {
        self.check_image_location(Some(image))?;
        let next = self.generation().wrapping_add(1);
        if next != generation {
            return Err(Error::Inconsistent {
                addr: image.offset,
                what: "frozen image generation (another commit came first)",
                expected: next,
                found: generation,
            });
        }
        self.sync(PhysRange::new(PhysAddr(image.offset), image.len))?;
        fault::hit(FaultPoint::AfterImageSync).map_err(Error::io("publish"))?;
        let mut meta = self.meta();
        let next = meta.sb.generation.wrapping_add(1);
        if next != generation {
            return Err(Error::Inconsistent {
                addr: image.offset,
                what: "frozen image generation (another commit came first)",
                expected: next,
                found: generation,
            });
        }
        self.publish_locked(&mut meta, Some(image), 0)
    }

    /// Record that the current image has been restored, so that a second
    /// restore of it is refused. Reads and publishes under one lock.
    /// Returns the new generation.
    pub fn mark_restored(&self) -> Result<u64> {
        let mut meta = self.meta();
        let image = meta.sb.image;
        self.publish_locked(&mut meta, image, FLAG_RESTORED)
    }

    /// The bytes of the current image after checking its CRC32.
    pub fn image_bytes(&self) -> Result<&[u8]> {
        let loc = self.current_image().ok_or(Error::NoImage)?;
        let range = PhysRange::new(PhysAddr(loc.offset), loc.len);
        // SAFETY:
        // - The image range starts past the superblock pages (validated at
        //   open and at publish); image pages are owned by the arena's heap,
        //   which never writes a committed image.
        let bytes = unsafe { self.slice_shared(range) }?;
        let crc = crc32fast::hash(bytes);
        if crc != loc.crc {
            return Err(Error::Inconsistent {
                addr: loc.offset,
                what: "image crc32",
                expected: u64::from(loc.crc),
                found: u64::from(crc),
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn cfg() -> ArenaConfig {
        ArenaConfig::with_size(4 << 20)
    }

    #[test]
    #[cfg_attr(miri, ignore = "files, mmap and flock")]
    fn create_open_and_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        let loc = {
            let mut a = Arena::create_file(&path, &cfg()).unwrap();
            assert_eq!(a.generation(), 1);
            let at = a.layout().general.start.addr().unwrap();
            a.write(at, b"hello image").unwrap();
            let loc = ImageLocation {
                offset: at.0,
                len: 11,
                crc: crc32fast::hash(b"hello image"),
            };
            assert_eq!(a.commit_image(loc).unwrap(), 2);
            loc
        };
        let a = Arena::open(&path).unwrap();
        assert_eq!(a.generation(), 2);
        assert_eq!(a.current_image(), Some(loc));
        assert_eq!(a.image_bytes().unwrap(), b"hello image");
        assert_eq!(a.layout(), cfg().layout().as_ref().unwrap());
        assert!(!a.image_restored());
        a.mark_restored().unwrap();
        drop(a);
        let r = Arena::open_readonly(&path).unwrap();
        assert!(r.image_restored());
        assert_eq!(r.generation(), 3);
        assert!(r.page_bytes(Pfn(0)).is_ok());
        let mut r = r;
        assert!(matches!(
            r.write(PhysAddr(0x10000), b"x"),
            Err(Error::ReadOnly)
        ));
    }

    #[test]
    #[cfg_attr(miri, ignore = "files, mmap and flock")]
    fn torn_slot_falls_back_to_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        {
            let a = Arena::create_file(&path, &cfg()).unwrap();
            a.publish(None).unwrap(); // gen 2 in slot 1
        }
        // Corrupt slot 1 (the newest).
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 8], PAGE_SIZE + 0x60).unwrap();
        drop(f);
        let a = Arena::open(&path).unwrap();
        assert_eq!(a.generation(), 1);
        // The next publish overwrites the bad slot.
        assert_eq!(a.publish(None).unwrap(), 2);
        drop(a);
        assert_eq!(Arena::open(&path).unwrap().generation(), 2);
    }

    #[test]
    #[cfg_attr(miri, ignore = "files, mmap and flock")]
    fn a_failed_publish_leaves_no_new_slot() {
        use crate::session::{arm, disarm, FaultAction};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        let a = Arena::create_file(&path, &cfg()).unwrap();
        let pages = |p: &Path| std::fs::read(p).unwrap()[..2 * PAGE_SIZE as usize].to_vec();
        let before = pages(&path);
        for point in [FaultPoint::TornSuperblock, FaultPoint::BeforeSlotSync] {
            arm(point, FaultAction::Fail);
            let r = a.publish(None);
            disarm();
            assert!(
                matches!(r, Err(Error::Io { op: "msync", .. })),
                "{point}: {r:?}"
            );
            assert_eq!(a.generation(), 1, "{point}");
            assert_eq!(pages(&path), before, "{point}: the slot page changed");
        }
        // After the publish nothing fails it.
        arm(FaultPoint::AfterPublish, FaultAction::Fail);
        let r = a.publish(None);
        disarm();
        assert_eq!(r.unwrap(), 2);
        drop(a);
        assert_eq!(Arena::open(&path).unwrap().generation(), 2);
    }

    #[test]
    #[cfg_attr(miri, ignore = "files, mmap and flock")]
    fn bad_files_are_typed_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small");
        std::fs::write(&small, [0u8; 100]).unwrap();
        assert!(matches!(
            Arena::open(&small),
            Err(Error::TooSmall { len: 100, .. })
        ));

        let foreign = dir.path().join("foreign");
        let mut f = File::create(&foreign).unwrap();
        let junk: Vec<u8> = (0..MIN_ARENA_SIZE).map(|i| (i * 7) as u8).collect();
        f.write_all(&junk).unwrap();
        drop(f);
        assert!(matches!(
            Arena::open(&foreign),
            Err(Error::Foreign { offset: 0, .. })
        ));
        assert_eq!(std::fs::read(&foreign).unwrap(), junk);

        let both = dir.path().join("both");
        drop(Arena::create_file(&both, &cfg()).unwrap());
        let f = OpenOptions::new().write(true).open(&both).unwrap();
        f.write_all_at(&[1], 0x70).unwrap();
        f.write_all_at(&[1], PAGE_SIZE + 0x70).unwrap();
        drop(f);
        let before = std::fs::read(&both).unwrap();
        match Arena::open(&both) {
            Err(Error::BothSuperblocksBad { slot0, slot1 }) => {
                assert!(matches!(slot0, SlotError::BadCrc { offset: 0x7c, .. }));
                assert!(matches!(slot1, SlotError::BadCrc { offset: 0x107c, .. }));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&both).unwrap(), before);

        // A file whose length changed no longer matches the superblocks.
        let grown = dir.path().join("grown");
        drop(Arena::create_file(&grown, &cfg()).unwrap());
        let f = OpenOptions::new().write(true).open(&grown).unwrap();
        f.set_len((4 << 20) + PAGE_SIZE).unwrap();
        drop(f);
        assert!(matches!(
            Arena::open(&grown),
            Err(Error::BothSuperblocksBad { .. })
        ));
    }

    #[test]
    fn bounds_and_superblock_protection() {
        let mut a = Arena::anonymous(&cfg()).unwrap();
        let size = a.size();
        assert!(matches!(
            a.bytes(PhysRange::new(PhysAddr(size - 1), 2)),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(a.bytes(PhysRange::new(PhysAddr(u64::MAX), 2)).is_err());
        assert!(a.bytes(PhysRange::new(PhysAddr(0), 1)).is_err());
        assert!(a.write(PhysAddr(0), b"x").is_err());
        a.write(PhysAddr(size - 1), b"y").unwrap();
        assert_eq!(
            a.bytes(PhysRange::new(PhysAddr(size - 1), 1)).unwrap(),
            b"y"
        );
        assert!(matches!(a.image_bytes(), Err(Error::NoImage)));
    }

    #[test]
    #[cfg_attr(miri, ignore = "files, mmap and flock")]
    fn memfd_lock_passes_with_the_descriptor() {
        let a = Arena::create_memfd("kho-test", &cfg()).unwrap();
        let fd = a.inheritable_fd().unwrap();
        a.publish(None).unwrap();
        let proc_path = format!("/proc/self/fd/{fd}");
        assert!(matches!(
            Arena::open(&proc_path),
            Err(Error::Busy {
                holder: "a writable arena of this process",
                ..
            })
        ));
        // What a successor inherits: a descriptor of the same open file
        // description, which carries the lock.
        let inherited = a.file().unwrap().try_clone().unwrap();
        drop(a);
        // A new description of the memfd is still excluded by that lock.
        let proc_path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&inherited)
        );
        match Arena::open(&proc_path) {
            Err(Error::Busy { path, holder }) => {
                assert_eq!(path, PathBuf::from(&proc_path));
                assert!(holder.starts_with("locked by another open"), "{holder}");
            }
            other => panic!("{other:?}"),
        }
        let b = Arena::open_file(inherited).unwrap();
        assert_eq!(b.generation(), 2);
        // The size is sealed: nobody can truncate the memory under the map.
        assert!(b.file().unwrap().set_len(PAGE_SIZE).is_err());
        assert!(b.file().unwrap().set_len(b.size() * 2).is_err());
    }

    #[test]
    #[cfg_attr(miri, ignore = "files, mmap and flock")]
    fn one_writable_arena_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("arena");
        let a = Arena::create_file(&path, &cfg()).unwrap();
        a.publish(None).unwrap();
        let before = std::fs::read(&path).unwrap();
        let busy_here = |r: Result<Arena>| match r {
            Err(Error::Busy { path: p, holder }) => {
                assert_eq!(holder, "a writable arena of this process");
                p
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(busy_here(Arena::open(&path)), path);
        busy_here(Arena::open_readonly(&path));
        busy_here(Arena::create_file(&path, &cfg()));
        // A duplicated descriptor shares the `flock`; the process table
        // still refuses a second arena over it.
        let dup = a.file().unwrap().try_clone().unwrap();
        let p = busy_here(Arena::open_file(dup));
        assert!(p.ends_with("arena"), "{p:?}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        drop(a);

        // Readers share the file, and exclude a writer.
        let r1 = Arena::open_readonly(&path).unwrap();
        let r2 = Arena::open_readonly(&path).unwrap();
        assert!(matches!(
            Arena::open(&path),
            Err(Error::Busy {
                holder: "a read-only arena of this process",
                ..
            })
        ));
        drop((r1, r2));

        // Another open file description, as another process would hold.
        let other = File::open(&path).unwrap();
        assert!(crate::mapping::try_lock(&other, LockKind::Exclusive).unwrap());
        for r in [
            Arena::open(&path),
            Arena::create_file(&path, &cfg()),
            Arena::open_readonly(&path),
        ] {
            assert!(matches!(r, Err(Error::Busy { .. })), "{r:?}");
        }
        // `create_file` truncates only once it holds the lock.
        assert_eq!(std::fs::read(&path).unwrap(), before);
        drop(other);
        let other = File::open(&path).unwrap();
        assert!(crate::mapping::try_lock(&other, LockKind::Shared).unwrap());
        assert!(matches!(Arena::open(&path), Err(Error::Busy { .. })));
        let r = Arena::open_readonly(&path).unwrap();
        assert_eq!(r.generation(), 2);
        drop((r, other));
        assert_eq!(Arena::open(&path).unwrap().generation(), 2);
    }
}
