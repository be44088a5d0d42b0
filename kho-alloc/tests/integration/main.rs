//! Integration tests of kho-alloc: one binary, one module per topic.

#[cfg(not(miri))]
mod arena_lock;
mod common;
mod fuzz;
mod handover;
mod heap_props;
mod preserve;
mod refusals;
