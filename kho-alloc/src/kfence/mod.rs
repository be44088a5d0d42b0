//! KFENCE-style sampling memory-safety detector.
//!
//! A small pool of object pages, each flanked by inaccessible guard pages,
//! serves a sampled fraction of the general allocator's requests. An access
//! past either end of a sampled object faults on a guard page; an access to a
//! freed sampled object faults on its protected page; a write into the unused
//! part of an object page is found on free by an address-dependent canary.
//!
//! ```text
//! pool page:  0       1        2       3        4            2N-1     2N
//!           | guard | obj #0 | guard | obj #1 | guard | ... | obj #N-1 | guard |
//!                   |canary|object|   (right placement)
//!                            |object|canary|   (left placement)
//! ```
//!
//! The pool is built only from pages that are neither scratch, nor
//! preservable, nor preserved (design problem 1): [`Pool::new`] walks every
//! page, and every sampled object's page is checked again before it is handed
//! out. Requests for preservable memory are never sampled.
//!
//! The [`Sampler`] decides which requests go to the pool: a time gate opened by
//! a background timer once per interval, or a per-thread randomized countdown.
//! The non-sampled path is one relaxed load of a process-wide counter of
//! active gates ([`may_sample`]) while no gate is open, plus one relaxed load
//! of the sampler's gate word or one thread-local decrement (count gate)
//! otherwise. [`Sampler::disable`] stops sampling and the timer in bounded
//! time: one atomic swap, no lock waited for, no thread joined, no
//! allocation awaited (design problem 3).
//!
//! In the heap, [`Heap::enable_kfence`](crate::Heap::enable_kfence) lays a
//! pool over the arena's KFENCE region ([`RegionMemory`]), `Heap::alloc`
//! offers each request to the sampler first (never a `PRESERVE` one, and
//! never a `NOWAIT` one, since a sampled allocation captures a stack),
//! `Heap::free` routes a sampled object back by its handle's kind, and
//! `Heap::freeze` disables sampling and records [`Pool::ranges`] in the
//! image's KFENCE section.
//!
//! Freeing or moving a pool object by raw pointer ([`Pool::free`],
//! [`Pool::realloc`], [`Sampler::free`]) is `unsafe`: the pool scrubs and
//! protects the object's page, which must not be in use. The heap's owned
//! handles make that safe for heap objects.
//!
//! Bugs are reported as a [`Report`] value, whose text follows the kernel's
//! KFENCE format, and to a [`ReportSink`] (standard error by default). The
//! opt-in fault handler in [`crate::fault`] reports guard-page and
//! use-after-free faults from signal context to a file descriptor; their
//! reports reach the sink at the next safe point (the pool's next
//! allocation or free, or [`Pool::drain_faults`]).
//!
//! ```
//! use kho_alloc::kfence::{AnonMemory, CacheTag, Pool, PoolConfig};
//!
//! let config = PoolConfig { objects: 4, ..PoolConfig::default() };
//! let memory = AnonMemory::new(PoolConfig::pages_for(4))?;
//! let pool = Pool::new(Box::new(memory), config)?;
//! let obj = pool.alloc(24, 8, CacheTag::size_class(24)).expect("a free slot");
//! assert!(pool.owns(obj.as_ptr()));
//! assert_eq!(pool.usable_size(obj.as_ptr()), Some(24));
//! // SAFETY: `obj` is a live pool object, not used after this free.
//! unsafe { pool.free(obj.as_ptr()) }?;
//! // A second free is a bug, reported and refused (the pointer is only
//! // compared, not accessed).
//! // SAFETY: `obj` is no longer a live object: nothing is given up.
//! let report = unsafe { pool.free(obj.as_ptr()) }.unwrap_err();
//! assert!(report.text().starts_with("BUG: KFENCE: double free"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#[allow(unsafe_code)]
mod memory;
#[allow(unsafe_code)]
mod pool;
#[allow(unsafe_code)]
mod region;
mod report;
#[allow(unsafe_code)]
mod sampler;
mod stack;
#[allow(unsafe_code)]
pub(crate) mod sys;
pub(crate) mod text;

pub use memory::{AnonMemory, PageClass, PoolMemory};
pub use pool::{CacheTag, ObjectState, Placement, Pool, PoolConfig, Stats};
pub use region::{PreservedQuery, RegionMemory};
pub use report::{Access, ObjectInfo, Report, ReportKind, ReportSink, Side, StderrSink};
pub use sampler::{may_sample, SampleMode, Sampler, DEFAULT_INTERVAL};

pub(crate) use pool::Shared;
pub(crate) use sampler::Pass;

/// The separator line printed around each report.
pub(crate) const fn report_separator() -> &'static str {
    report::SEPARATOR
}

use kho_core::PhysAddr;

/// Default number of object pages in a pool, as in the kernel.
pub const DEFAULT_OBJECTS: usize = 255;

/// Errors from building or configuring a KFENCE pool.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KfenceError {
    /// The pool memory does not start on a page boundary.
    #[error("pool memory at {found:#x} is not aligned to {expected:#x} bytes")]
    Misaligned {
        /// Required alignment in bytes.
        expected: u64,
        /// The address found.
        found: usize,
    },
    /// The pool memory is smaller than the pool needs.
    #[error("pool of {objects} objects needs {expected} pages, memory has {found}")]
    TooSmall {
        /// Objects requested.
        objects: usize,
        /// Pages needed: `2 * objects + 1`.
        expected: usize,
        /// Pages available.
        found: usize,
    },
    /// The requested object count is out of range.
    #[error("object count {found} is outside 1..={expected}")]
    ObjectCount {
        /// Largest accepted count.
        expected: usize,
        /// Count requested.
        found: usize,
    },
    /// A pool page is scratch, preservable, preserved or otherwise reserved.
    #[error("pool page at arena offset {offset:#x} is {found}, expected general or kfence memory")]
    Excluded {
        /// Arena offset of the page.
        offset: PhysAddr,
        /// What the page is.
        found: PageClass,
    },
    /// The host page size is not the arena page size, so guard pages
    /// cannot be protected one arena page at a time.
    #[error("host page size {found:#x} differs from the arena page size {expected:#x}")]
    PageSize {
        /// The arena page size.
        expected: u64,
        /// The host page size.
        found: u64,
    },
    /// `mprotect` failed.
    #[error("mprotect of {addr:#x}+{len:#x} failed with errno {errno}")]
    Protect {
        /// First byte.
        addr: usize,
        /// Length in bytes.
        len: usize,
        /// The OS error number.
        errno: i32,
    },
    /// Creating an anonymous mapping failed.
    #[error("anonymous mapping of {len:#x} bytes failed: {source}")]
    Map {
        /// Bytes requested.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The sampling timer thread could not be started.
    #[error("sampling timer thread could not be started: {source}")]
    Timer {
        /// The OS error.
        source: std::io::Error,
    },
    /// A sampling rate of zero was requested.
    #[error("sampling rate {found} is invalid, expected at least {expected}")]
    Rate {
        /// Smallest accepted value.
        expected: u64,
        /// Value requested.
        found: u64,
    },
    /// `sigaction` failed while installing the fault handler.
    #[error("sigaction for signal {signal} failed with errno {errno}")]
    Sigaction {
        /// The signal number.
        signal: i32,
        /// The OS error number.
        errno: i32,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, KfenceError>;
