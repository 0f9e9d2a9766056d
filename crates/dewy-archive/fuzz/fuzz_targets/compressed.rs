//! Fuzzes extraction of gzip-wrapped input (tar or single file behind a decoder).
#![no_main]

mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::extract(b"\\x1f\\x8b", data));
