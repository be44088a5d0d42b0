#![no_main]
//! `check`: see [`kho_fuzz::check`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::check::run(data));
