//! Integration tests of kho-core, compiled into one binary.

mod fuzz;
mod image;
