//! The `kho` command (work in progress).
#![forbid(unsafe_code)]

fn main() {}
