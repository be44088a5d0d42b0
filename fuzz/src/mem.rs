//! The heap cap of the fuzz binaries.
//!
//! libFuzzer's `-malloc_limit_mb` works only through a sanitizer's malloc
//! hooks, so under `--sanitizer none` (stable Rust) nothing would notice a
//! parser that allocates in proportion to a count its input claims. The
//! binaries therefore run on a counting global allocator ([`cap::Cap`]):
//! around every call into a parser, [`CAP`] limits the live heap to what is
//! live already plus the bound FORMAT.md §8 states for the call's input,
//! [`FACTOR`] bytes per input byte plus [`SLACK`]. An allocation past the
//! limit fails, Rust aborts on a failed allocation, and libFuzzer reports
//! the input as a crash with the allocation's size on stderr.
//!
//! Only the `fuzz_targets/` binaries link this module: the regression tests
//! that replay the same target bodies run uncapped.

use std::alloc::System;

use cap::Cap;

use crate::image::HeapCap;

#[global_allocator]
static HEAP: Cap<System> = Cap::new(System, usize::MAX);

/// Heap bytes a parse may hold per input byte (FORMAT.md §8).
pub const FACTOR: usize = 64;
/// Heap bytes a parse may hold on top of that (FORMAT.md §8).
pub const SLACK: usize = 64 << 10;

/// The cap every target installs around its parser calls.
pub const CAP: HeapCap = HeapCap { install, remove };

fn install(len: usize) {
    let limit = HEAP
        .allocated()
        .saturating_add(FACTOR.saturating_mul(len))
        .saturating_add(SLACK);
    // Fails only below the bytes already live, which `limit` never is.
    let _ = HEAP.set_limit(limit);
}

fn remove() {
    let _ = HEAP.set_limit(usize::MAX);
}
