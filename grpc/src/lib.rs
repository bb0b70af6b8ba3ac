//! # ember-grpc
//!
//! The gRPC services Ember serves, as `tonic` generated them from the `.proto` files in
//! `proto/` (each with its provenance in `PROVENANCE.md`). The generated code is committed, so
//! that a build needs no `protoc`; `scripts/gen-grpc` regenerates it.
//!
//! - [`inference`]: the Open Inference Protocol v2 (KServe v2) gRPC service,
//!   `inference.GRPCInferenceService`, which the dispatcher serves and `tritonclient.grpc` calls.
//! - [`externalscaler`]: KEDA's external scaler protocol, `externalscaler.ExternalScaler`, which
//!   the autoscaler serves to a KEDA `ScaledObject` of type `external` or `external-push`.

/// `inference.GRPCInferenceService` (Open Inference Protocol v2).
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod inference {
    include!("gen/inference.rs");
}

/// `externalscaler.ExternalScaler` (KEDA).
#[allow(clippy::all, missing_debug_implementations, unreachable_pub)]
pub mod externalscaler {
    include!("gen/externalscaler.rs");
}
