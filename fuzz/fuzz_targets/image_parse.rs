#![no_main]
//! `image_parse`: see [`kho_fuzz::image`], under the heap cap of [`kho_fuzz::mem`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::image::run_capped(data, kho_fuzz::mem::CAP));
