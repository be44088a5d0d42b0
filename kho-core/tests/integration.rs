//! Integration tests of kho-core, compiled into one binary.

mod image;
