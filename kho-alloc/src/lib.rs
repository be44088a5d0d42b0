//! # kho-alloc
//!
//! The memory half of kho: a file-backed arena with two superblock slots,
//! its regions (scratch, KFENCE pool, preservable pool, general memory),
//! and the allocators built over it.
#![warn(missing_docs)]

pub mod arena;
pub mod error;
pub mod fault;
pub mod kfence;
pub mod layout;
mod mapping;
mod raw;
pub mod superblock;

pub use arena::Arena;
pub use error::{Error, Result, SlotError};
pub use layout::{ArenaConfig, Layout, Region};
pub use superblock::{ImageLocation, Superblock};
