//! Fuzz harnesses for Ember's untrusted-input paths. Each module is one target: `run` feeds one
//! input to the production entry point and checks the invariants that must hold for any input.
//! The crates' regression tests (`worker/tests/fuzz_corpus.rs`,
//! `dispatcher/tests/fuzz_corpus.rs`) include these same files and replay the corpus through
//! them without a fuzzer. See docs/fuzzing.md.

pub mod corpus;
pub mod image;
pub mod job;
pub mod oip;
pub mod tensor;

/// Replaces libfuzzer-sys's abort-on-panic hook with one that prints the panic's location:
/// the worker catches decoder panics (`prepare` turns them into `invalid_image`), so a caught
/// panic is not a crash; one that escapes `run` still aborts (libfuzzer-sys catches it and
/// aborts). `grep 'panicked at' fuzz-*.log | sort | uniq -c` lists the caught ones.
pub fn print_panics_without_abort() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("panicked at {location}");
    }));
}
