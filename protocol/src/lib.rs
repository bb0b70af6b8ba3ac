//! # ember-protocol
//!
//! Ember's wire contract as serde types, and nothing else: no tokio, lapin or HTTP, so a Rust
//! client can depend on this crate alone (`docs/protocol.md` is the same contract in prose).
//! `ember-core` re-exports both modules under the same paths (`ember_core::protocol`,
//! `ember_core::model`).
//!
//! # Layout
//!
//! - [`protocol`]: job and result types, header names, content types, error codes, the OIP v2
//!   request and response, the worker heartbeat and its `ModelInfo`.
//! - [`model`]: a model directory's `model.toml` (reading it needs `toml` only).

pub mod model;
pub mod protocol;
