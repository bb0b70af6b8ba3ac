#![no_main]

libfuzzer_sys::fuzz_target!(init: ember_fuzz::print_panics_without_abort(), |data: &[u8]| {
    let _ = ember_fuzz::tensor::run(data);
});
