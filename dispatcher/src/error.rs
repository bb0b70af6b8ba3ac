//! API errors: every error response is `{"error": {"code", "message"}}` with a stable code; a
//! 5xx also carries an `error_id`, and what went wrong inside is logged under that id, never sent.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// An API error with its HTTP status and stable snake_case code.
///
/// `message` is sent to the client, so it must never hold internal text (store or broker
/// errors, paths, addresses): that goes in `detail`, which is only logged. Every 5xx answer gets
/// an error id, logged with the detail so an operator can find it from what the client saw.
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds for a Retry-After header (429, 503).
    pub retry_after: Option<u64>,
    /// Internal cause, for the log only.
    pub detail: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unknown_model(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no model `{model}` is served here"),
        )
    }
    pub fn job_not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "job_not_found",
            format!("no job `{id}` (unknown, or its record expired)"),
        )
    }
    pub fn queue_full(model: &str) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!("the queue of `{model}` is full; retry later"),
            )
        }
    }
    /// 503 with Retry-After; `message` is sent, so it says what is unavailable, not why.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }
    /// 500 `internal`: the client is told only that, and gets an error id; `detail` is logged.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
        .with_detail(detail.into())
    }
    /// Attaches an internal cause, logged (with the error id) but never sent.
    pub fn with_detail(mut self, detail: impl std::fmt::Display) -> Self {
        self.detail = Some(detail.to_string());
        self
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(error: redis::RedisError) -> Self {
        Self::unavailable("store_unavailable", "the result store is unavailable").with_detail(error)
    }
}

/// An error id: short, random, unique enough to find one line in the logs.
fn error_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..16].to_string()
}

impl ApiError {
    /// For a 5xx: a fresh error id, logged with the code and the internal detail.
    pub(crate) fn log_server_error(&self) -> Option<String> {
        if !self.status.is_server_error() {
            return None;
        }
        let id = error_id();
        match &self.detail {
            Some(detail) => tracing::error!(
                error_id = %id,
                code = self.code,
                status = self.status.as_u16(),
                %detail,
                "request failed"
            ),
            None => tracing::debug!(
                error_id = %id,
                code = self.code,
                status = self.status.as_u16(),
                message = %self.message,
                "request failed"
            ),
        }
        Some(id)
    }

    fn respond(self, body: serde_json::Value) -> Response {
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = serde_json::json!({"code": self.code, "message": self.message});
        if let Some(id) = self.log_server_error() {
            error["error_id"] = id.into();
        }
        self.respond(serde_json::json!({ "error": error }))
    }
}

/// An error on an Open Inference Protocol route: the protocol says `{"error": "<string>"}`
/// (clients such as tritonclient print that string), so the message goes there and the stable
/// code beside it (and, for a 5xx, the error id in both).
#[derive(Debug)]
pub struct OipError(pub ApiError);

impl From<ApiError> for OipError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl From<redis::RedisError> for OipError {
    fn from(error: redis::RedisError) -> Self {
        Self(error.into())
    }
}

impl IntoResponse for OipError {
    fn into_response(self) -> Response {
        let body = match self.0.log_server_error() {
            Some(id) => serde_json::json!({
                "error": format!("{}: {} (error id {id})", self.0.code, self.0.message),
                "code": self.0.code,
                "error_id": id,
            }),
            None => serde_json::json!({
                "error": format!("{}: {}", self.0.code, self.0.message),
                "code": self.0.code,
            }),
        };
        self.0.respond(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(response: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or_default()
    }

    #[tokio::test]
    async fn server_errors_carry_a_code_and_an_id_but_not_the_internal_detail() {
        let secret = "connection to 10.9.8.7:6379 refused";
        let error = || {
            ApiError::unavailable("store_unavailable", "the result store is unavailable")
                .with_detail(secret)
        };
        let response = error().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let v1 = body(response).await;
        assert_eq!(v1["error"]["code"], "store_unavailable");
        assert_eq!(v1["error"]["error_id"].as_str().map(str::len), Some(16));
        assert!(!v1.to_string().contains("10.9.8.7"), "{v1}");

        let v2 = body(OipError(error()).into_response()).await;
        assert_eq!(v2["code"], "store_unavailable");
        let id = v2["error_id"].as_str().unwrap_or_default().to_string();
        assert_eq!(id.len(), 16);
        assert!(
            v2["error"].as_str().unwrap_or_default().contains(&id),
            "{v2}"
        );
        assert!(!v2.to_string().contains("10.9.8.7"), "{v2}");

        let internal = body(ApiError::internal(secret).into_response()).await;
        assert_eq!(internal["error"]["code"], "internal");
        assert_eq!(internal["error"]["message"], "internal error");
        assert!(!internal.to_string().contains("refused"), "{internal}");
    }

    #[tokio::test]
    async fn client_errors_keep_their_message_and_have_no_id() {
        let v1 = body(ApiError::bad_request("invalid_wait", "wait=`x`: bad").into_response()).await;
        assert_eq!(v1["error"]["message"], "wait=`x`: bad");
        assert!(v1["error"].get("error_id").is_none());
    }

    #[test]
    fn a_store_error_becomes_a_generic_503() {
        let error: ApiError = redis::RedisError::from(std::io::Error::other("secret text")).into();
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!error.message.contains("secret"));
        assert!(error.detail.unwrap_or_default().contains("secret text"));
    }
}
