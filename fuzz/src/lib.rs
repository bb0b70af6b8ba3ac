//! Fuzz harnesses for Ember's untrusted-input paths. Each module is one target: `run` feeds one
//! input to the production entry point and checks the invariants that must hold for any input.
//! The crates' regression tests (`worker/tests/fuzz_corpus.rs`,
//! `dispatcher/tests/fuzz_corpus.rs`) include these same files and replay the corpus through
//! them without a fuzzer. See docs/fuzzing.md.

pub mod image;
pub mod job;
pub mod oip;
