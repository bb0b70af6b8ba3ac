//! # ember-core
//!
//! What every Ember part shares at runtime: the AMQP topology and a connection that recovers by
//! itself, telemetry (metrics registry, admin HTTP server, logging) and process shutdown. The wire
//! contract users code against lives in `ember-protocol` (serde only, so a client can depend on it
//! alone) and is re-exported here under the same paths.
//!
//! # Layout
//!
//! - [`protocol`]: job and result types, header names, error codes, content types (re-exported
//!   from `ember-protocol`).
//! - [`topology`]: names of the exchanges and queues and their idempotent declaration.
//! - [`amqp`]: connecting (plain or TLS, credentials from env or files, never logged) with
//!   backoff, header helpers.
//! - [`model`]: a model directory's `model.toml` (re-exported from `ember-protocol`).
//! - [`args`]: the model and admin flags every part takes ([`args::ModelArgs`], flattened).
//! - [`telemetry`]: logging set-up, the per-process metrics registry and the admin server
//!   (`/metrics`, `/livez`, `/readyz`).
//! - [`otel`]: OpenTelemetry traces across the queue (off unless `OTEL_*` asks), the W3C
//!   `traceparent` in and out.
//! - [`retry`]: exponential backoff with jitter, for tries over the network.
//! - [`shutdown`]: SIGTERM/SIGINT to a `CancellationToken`; a second signal exits at once.

pub use ember_protocol::{model, protocol};

pub mod amqp;
pub mod args;
pub mod otel;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
