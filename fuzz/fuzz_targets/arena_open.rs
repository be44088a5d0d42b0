#![no_main]
//! `arena_open`: see [`kho_fuzz::arena`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::arena::run(data));
