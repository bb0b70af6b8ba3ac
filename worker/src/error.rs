//! The worker's error type; each error decides what the consumer tells the broker.

use ember_core::protocol::ErrorCode;

/// What happens to a job that failed with this error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The job itself is bad: answer it with an error result and ack it.
    AckWithError,
    /// Something transient went wrong: requeue it; the queue's delivery limit dead-letters a job
    /// that keeps failing.
    Requeue,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("onnx runtime: {0}")]
    Runtime(String),
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("{0}")]
    InvalidInput(String),
    #[error("input is not a valid image: {0}")]
    InvalidImage(String),
    #[error("content type `{0}` is not accepted by this model (send image/jpeg or image/png)")]
    UnsupportedContentType(String),
    #[error("{0}")]
    InputTooLarge(String),
    #[error("the job's deadline passed {0} ms before it could run")]
    DeadlineExceeded(u64),
    #[error("the job was cancelled before it ran")]
    Cancelled,
    #[error("model run failed: {0}")]
    Model(String),
    #[error("internal: {0}")]
    Internal(String),
    #[error("{0}")]
    DeadLettered(String),
    /// The job pinned a version that no queue serves (see `header::MODEL_VERSION`).
    #[error("{0}")]
    VersionNotServed(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Stable code for the result's error and a bounded metrics label.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::InvalidInput(_) => ErrorCode::InvalidInput,
            Error::InvalidImage(_) => ErrorCode::InvalidImage,
            Error::UnsupportedContentType(_) => ErrorCode::UnsupportedContentType,
            Error::InputTooLarge(_) => ErrorCode::InputTooLarge,
            Error::DeadlineExceeded(_) => ErrorCode::DeadlineExceeded,
            Error::Cancelled => ErrorCode::Cancelled,
            Error::Model(_) => ErrorCode::ModelError,
            Error::DeadLettered(_) => ErrorCode::DeadLettered,
            Error::VersionNotServed(_) => ErrorCode::ModelVersionNotFound,
            Error::Config(_) | Error::Runtime(_) | Error::Amqp(_) | Error::Internal(_) => {
                ErrorCode::Internal
            }
        }
    }

    /// What the consumer does with a job that failed with this error.
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::InvalidInput(_)
            | Error::InvalidImage(_)
            | Error::UnsupportedContentType(_)
            | Error::InputTooLarge(_)
            | Error::DeadlineExceeded(_)
            | Error::Cancelled
            | Error::DeadLettered(_)
            | Error::VersionNotServed(_) => Disposition::AckWithError,
            Error::Model(_)
            | Error::Internal(_)
            | Error::Runtime(_)
            | Error::Amqp(_)
            | Error::Config(_) => Disposition::Requeue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_answered_and_transient_failures_are_requeued() {
        let answered = [
            Error::InvalidInput("x".into()),
            Error::InvalidImage("x".into()),
            Error::UnsupportedContentType("x".into()),
            Error::InputTooLarge("x".into()),
            Error::DeadlineExceeded(1),
        ];
        for error in answered {
            assert_eq!(error.disposition(), Disposition::AckWithError, "{error}");
        }
        for error in [Error::Model("x".into()), Error::Internal("x".into())] {
            assert_eq!(error.disposition(), Disposition::Requeue, "{error}");
        }
        assert_eq!(Error::Model("x".into()).code(), ErrorCode::ModelError);
    }
}
