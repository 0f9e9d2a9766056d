//! Fuzzes extraction of zip archives (the input follows a local-header magic).
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::extract(b"PK\\x03\\x04", data));
