//! # kho-core
//!
//! The format half of kho: Kexec-HandOver-style memory preservation for user
//! space. This crate knows which folios of an arena are preserved, how that
//! knowledge is written into a handover image, and how a successor validates
//! untrusted image bytes and restores each preserved folio exactly once. It
//! performs no I/O and is safe Rust throughout: everything works on `&[u8]`.
//!
//! ```
//! use kho_core::{Order, Pfn, PreservedMap};
//!
//! let mut map = PreservedMap::new(Pfn(1 << 18)); // 1 GiB of 4 KiB pages
//! map.preserve(Pfn(0x200), Order::new(9).unwrap())?;
//! map.preserve(Pfn(0x10), Order::ZERO)?;
//! let folios: Vec<_> = map.folios().map(|f| f.pfn).collect();
//! assert_eq!(folios, [Pfn(0x10), Pfn(0x200)]);
//! # Ok::<(), kho_core::MapError>(())
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod addr;
pub mod image;
pub mod memmap;
pub mod tree;

pub use addr::{Order, Pfn, PhysAddr, PhysRange, MAX_MAP_ORDER, NR_ORDERS, PAGE_SHIFT, PAGE_SIZE};
pub use image::{
    BuildError, Extent, Image, ImageBuilder, ImageHeader, ParseError, RestoreError, Restorer,
    SectionInfo, SectionKind, SlabCacheInfo, SlabCacheView, SlabPageInfo, SlabPageView,
};
pub use memmap::{
    decompose, BlockBits, BlockFolios, BlockWords, Folio, Folios, MapError, MapResult, PfnRange,
    PreservedMap, Ranges, BLOCK_BITS, BLOCK_WORDS,
};
pub use tree::{
    Node, NodeRef, Property, Tree, TreeError, TreeLimits, TreeResult, Value, TREE_VERSION,
};

/// The library example of the repository's README, run as a doc test so
/// that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
