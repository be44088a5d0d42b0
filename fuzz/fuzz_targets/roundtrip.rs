#![no_main]
//! `roundtrip`: see [`kho_fuzz::roundtrip`], under the heap cap of [`kho_fuzz::mem`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::roundtrip::run_capped(data, kho_fuzz::mem::CAP));
