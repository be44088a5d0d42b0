#![no_main]
//! `check`: see [`kho_fuzz::check`], under the heap cap of [`kho_fuzz::mem`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::check::run_capped(data, kho_fuzz::mem::CAP));
