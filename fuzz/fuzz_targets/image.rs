#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = ember_fuzz::image::run(data);
});
