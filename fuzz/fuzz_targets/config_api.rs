//! Configuration objects as the Kubernetes watchers receive them (see
//! `sluice_fuzz_harness::config::check_api`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    sluice_fuzz_harness::config::check_api(data);
});
