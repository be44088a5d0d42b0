#![no_main]
//! `arena_open`: see [`kho_fuzz::arena`], under the heap cap of [`kho_fuzz::mem`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::arena::run_capped(data, kho_fuzz::mem::CAP));
