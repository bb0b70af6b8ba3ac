//! The API's middleware, outermost first: request metrics ([`observe`]), header limits
//! ([`limit_headers`]), then bearer auth and the rate limit ([`authorize`]). What they enforce
//! is in [`crate::limits`]; an error they answer takes the format of the route it stopped.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::api::AppState;
use crate::error::{ApiError, OipError};
use crate::limits::{self, Client};

/// An error answered by a middleware, in the format of the route it stopped: the protocol's on
/// `/v2/`, the jobs' elsewhere.
fn reject(path: &str, error: ApiError) -> Response {
    if path.starts_with("/v2/") {
        OipError(error).into_response()
    } else {
        error.into_response()
    }
}

/// Routes that neither auth nor the rate limit applies to.
fn exempt(path: &str) -> bool {
    path.starts_with("/v2/health/")
}

pub async fn observe(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    state
        .metrics
        .request_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .requests
        .with_label_values(&[&route, &method, response.status().as_str()])
        .inc();
    response
}

/// 431 with a JSON error when the header fields are too many or too large. (hyper's own
/// limits, 100 fields and about 400 KiB of head, sit above the configurable ones and answer a
/// bare 431.) A 413 closes the connection.
pub async fn limit_headers(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let limits = &state.limits;
    match limits::check_headers(
        request.headers(),
        limits.max_headers,
        limits.max_header_bytes,
    ) {
        Ok(()) => {
            let mut response = next.run(request).await;
            // A body refused as too large is left unread on the connection: close it, and say
            // so, or a client that pools connections sends its next request into the closing
            // one.
            if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
        Err(why) => reject(
            request.uri().path(),
            ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                why,
            ),
        ),
    }
}

/// Bearer auth (when tokens are configured), then the rate limit: per token, or per client
/// address without auth. Health routes are exempt from both.
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if exempt(path) {
        return next.run(request).await;
    }
    let client = if state.tokens.required() {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        match state.tokens.find(presented) {
            Some(index) => Client::Token(index),
            None => {
                let mut response = reject(
                    path,
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "a valid bearer token is required",
                    ),
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return response;
            }
        }
    } else {
        let ip = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        Client::address(ip)
    };
    if let Some(limiter) = &state.limits.rate
        && let Err(wait) = limiter.check(client, Instant::now())
    {
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        return reject(
            path,
            ApiError {
                retry_after: Some(seconds),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("over the request rate limit; retry in {seconds} s"),
                )
            },
        );
    }
    next.run(request).await
}
