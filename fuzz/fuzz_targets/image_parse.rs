#![no_main]
//! `image_parse`: see [`kho_fuzz::image`].

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| kho_fuzz::image::run(data));
