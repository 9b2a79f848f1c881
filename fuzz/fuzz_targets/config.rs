//! A configuration file as standalone mode and `sluice validate` read it, and its next version
//! (see `sluice_fuzz_harness::config::check_file`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_fuzz_harness::config::check_file(data);
});
