#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ember_fuzz::oip::run(data);
});
