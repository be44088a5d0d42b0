#![no_main]
//! `roundtrip`: see [`kho_fuzz::roundtrip`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::roundtrip::run(data));
