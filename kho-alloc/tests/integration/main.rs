//! Integration tests of kho-alloc: one binary, one module per topic.

mod common;
mod fuzz;
mod handover;
mod heap_props;
