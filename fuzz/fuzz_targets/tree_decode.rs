#![no_main]
//! `tree_decode`: see [`kho_fuzz::tree`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::tree::run(data));
