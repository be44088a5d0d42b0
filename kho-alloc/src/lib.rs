//! # kho-alloc
//!
//! The memory half of kho: a file-backed arena, the allocators over it,
//! and the handover of preserved memory to a successor process.
//!
//! ```text
//! page 0      1      2 ...                                          pages
//!     | sb 0 | sb 1 | scratch | kfence | preservable pool | general  |
//!        \______/                 |          |                 |
//!   superblock slots    KFENCE sampler   PRESERVE allocations,  everything
//!   (generation, CRC,   (never           named caches; slab     else, and
//!   image location)     preserved)       pages preserved at     the image
//!                                        freeze                 folio
//! ```
//!
//! - [`Arena`]: the mapping (file, memfd, anonymous or heap memory) and
//!   its two superblock slots; opening locks the file (one writable arena
//!   per file, the lock passing to an `exec`'d successor with the
//!   descriptor; see [`arena`] for what it cannot exclude) and validates
//!   before mapping.
//! - [`Heap`]: buddy zones over the general and preservable regions, slab
//!   size classes with per-thread magazines, named [`PreservableCache`]s,
//!   preservation ([`Heap::preserve_range`]), [`Heap::freeze`] /
//!   [`Heap::commit`] and [`Heap::restore`].
//! - Allocations are owned handles ([`Obj`], [`Pages`]) whose bytes are
//!   reached through the heap; what crosses a handover is their
//!   [`PhysAddr`](kho_core::PhysAddr).
//! - [`kfence`]: the KFENCE-style sampling pool over the KFENCE region.
//!
//! `unsafe` is denied crate-wide and allowed only in the modules that
//! need it: `mapping` (mmap, mprotect, msync), `raw` (slices over the
//! mapping), [`arena`] (its byte views), `heap::owned` (views of the
//! heap's objects, folios and frozen images, each reached through the
//! handle that owns it, and the KFENCE pool's memory; plus the declaration
//! of [`Obj::from_raw`]), [`deferred`] (the signal-safe free list),
//! [`epoch`] (grace periods), [`fault`] (the fault handler), the KFENCE
//! pool's `sys`, `pool`, `region`, `memory` and `sampler` modules, and the
//! session's `os` (system calls) and `undo` (an atomic mailbox) modules.
//!
//! A handover in one process, on heap memory (the same code runs on a
//! file or memfd arena reopened by a successor process):
//!
//! ```
//! use kho_alloc::{Arena, ArenaConfig, GfpFlags, Heap};
//! use kho_core::{Node, Tree};
//!
//! let heap = Heap::new(Arena::heap(&ArenaConfig::with_size(16 << 20))?)?;
//! let sessions = heap.cache("sessions", 64, 8)?;
//! let mut s = sessions.alloc(GfpFlags::ZERO)?;
//! heap.bytes_mut(&mut s)?[..5].copy_from_slice(b"hello");
//! let tree = Tree::new(Node::root("demo-v1").with_u64("session", s.leak().0));
//! heap.freeze_and_commit(Some(&tree))?;
//! drop(sessions);
//!
//! // The successor.
//! let arena = heap.into_arena().expect("no other handle");
//! let (heap, mut restored) = Heap::restore(arena)?;
//! let at = restored.tree.as_ref().unwrap().root().u64_prop("session").unwrap();
//! let s = restored.cache_mut("sessions").unwrap().take(kho_core::PhysAddr(at)).unwrap();
//! assert_eq!(&heap.bytes(&s)?[..5], b"hello");
//! heap.cache("sessions", 64, 8)?.free(s)?;
//! # Ok::<(), kho_alloc::Error>(())
//! ```
#![warn(missing_docs)]
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod arena;
pub mod buddy;
pub mod check;
#[allow(unsafe_code)]
pub mod deferred;
#[allow(unsafe_code)]
pub mod epoch;
pub mod error;
#[allow(unsafe_code)]
pub mod fault;
pub mod heap;
pub mod kfence;
pub mod kv;
pub mod layout;
mod magazine;
#[allow(unsafe_code)]
mod mapping;
#[allow(unsafe_code)]
mod raw;
pub mod session;
mod slab;
pub mod superblock;

pub use arena::Arena;
pub use buddy::BuddyStats;
pub use error::{Error, Result, SlotError};
pub use heap::{
    FreezeStats, FrozenImage, GfpFlags, Heap, HeapStats, Obj, Pages, PreservableCache, RawObj,
    Restored, RestoredCache, SIZE_CLASSES,
};
pub use layout::{ArenaConfig, Layout, Region};
pub use mapping::ReadOnlyFile;
pub use superblock::{ImageLocation, Superblock};
