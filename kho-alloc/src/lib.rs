//! # kho-alloc
//!
//! The memory half of kho: a file-backed arena with two superblock slots,
//! its regions (scratch, KFENCE pool, preservable pool, general memory),
//! and the allocators built over it.
#![warn(missing_docs)]

pub mod arena;
pub mod buddy;
pub mod check;
pub mod error;
pub mod fault;
pub mod heap;
pub mod kfence;
pub mod layout;
mod magazine;
mod mapping;
mod raw;
mod slab;
pub mod superblock;

pub use arena::Arena;
pub use buddy::BuddyStats;
pub use error::{Error, Result, SlotError};
pub use heap::{
    FreezeStats, FrozenImage, GfpFlags, Heap, HeapStats, Obj, Pages, PreservableCache, Restored,
    RestoredCache, SIZE_CLASSES,
};
pub use layout::{ArenaConfig, Layout, Region};
#[cfg(not(miri))]
pub use mapping::ReadOnlyFile;
pub use superblock::{ImageLocation, Superblock};
