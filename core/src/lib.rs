//! # ember-core
//!
//! What every Ember part shares: the wire contract users code against, the AMQP topology and a
//! connection that recovers by itself, telemetry (metrics registry, admin HTTP server, logging) and
//! process shutdown.
//!
//! # Layout
//!
//! - [`protocol`]: job and result types, header names, error codes, content types. Serde only: no
//!   tokio or lapin types, so a client can depend on it alone.
//! - [`topology`]: names of the exchanges and queues and their idempotent declaration.
//! - [`amqp`]: connecting (plain or TLS, credentials from env or files, never logged) with
//!   backoff, header helpers.
//! - [`model`]: a model directory's `model.toml`.
//! - [`telemetry`]: logging set-up, the per-process metrics registry and the admin server
//!   (`/metrics`, `/livez`, `/readyz`).
//! - [`shutdown`]: SIGTERM/SIGINT to a `CancellationToken`; a second signal exits at once.

pub mod amqp;
pub mod model;
pub mod protocol;
pub mod shutdown;
pub mod telemetry;
pub mod topology;
