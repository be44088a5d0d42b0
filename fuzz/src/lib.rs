//! Fuzz target bodies for every parser of untrusted bytes in kho.
//!
//! Each module holds one target's logic as a plain `run(&[u8])`; the
//! binaries in `fuzz_targets/` only hand libFuzzer's input to it. The same
//! module files are compiled into the crates' regression tests (with
//! `#[path]`), which replay every committed input under
//! `kho-core/tests/fuzz_regressions/<target>/` through exactly this code.
//!
//! A target panics only when an invariant the library promises is broken;
//! rejections of bad input are the expected outcome and are not failures.
//! The binaries also cap the heap around every parser call ([`mem`]), so a
//! parse that holds more memory than its input allows aborts.

pub mod arena;
pub mod check;
pub mod image;
pub mod mem;
pub mod roundtrip;
pub mod tree;
