//! The inputs a corpus replay feeds: every file under `fuzz/{seeds,corpus,regressions}/<target>/`,
//! named `<kind>/<file>`, sorted. Standard library only: the crates' regression tests include
//! this file too (`worker/tests/fuzz_corpus.rs`, `dispatcher/tests/fuzz_corpus.rs`).

use std::path::Path;

/// The inputs of `target` under `fuzz_dir`.
pub fn inputs(fuzz_dir: &Path, target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for kind in ["seeds", "corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir.join(kind).join(target)) else {
            continue;
        };
        for path in entries.flatten().map(|entry| entry.path()) {
            let name = format!(
                "{kind}/{}",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            out.push((name, data));
        }
    }
    out.sort();
    out
}
