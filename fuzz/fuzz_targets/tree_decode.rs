#![no_main]
//! `tree_decode`: see [`kho_fuzz::tree`], under the heap cap of [`kho_fuzz::mem`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::tree::run_capped(data, kho_fuzz::mem::CAP));
