//! # kho-alloc
//!
//! The memory half of kho (work in progress).
