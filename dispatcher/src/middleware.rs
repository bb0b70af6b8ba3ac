//! The API's middleware, outermost first: request metrics ([`observe`]), header limits
//! ([`limit_headers`]), then bearer auth (tenants) and the rate limits ([`authorize`]). What they enforce
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
use crate::tenants::Caller;

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
    let span = server_span(&method, &route, request.headers());
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    if !span.is_disabled() {
        span.record("http.response.status_code", response.status().as_u16());
        if response.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
    }
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

/// The server span of a request, its parent the client's `traceparent` when it sent one; none
/// with traces off.
fn server_span(method: &str, route: &str, headers: &axum::http::HeaderMap) -> tracing::Span {
    if !ember_core::otel::on() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: ember_core::otel::TARGET,
        "request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        http.response.status_code = tracing::field::Empty,
    );
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    ember_core::otel::set_remote_parent(&span, traceparent);
    span
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

fn too_many(code: &'static str, wait: std::time::Duration, what: &str) -> ApiError {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    ApiError {
        retry_after: Some(seconds),
        ..ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            code,
            format!("{what}; retry in {seconds} s"),
        )
    }
}

/// Bearer auth, then the rate limit; health routes are exempt from both. With tenants, the
/// token names the caller's tenant and its bucket; wrong tokens are counted per client address,
/// and an address out of tries is refused before its token is even looked at (so guessing
/// cannot go on at any speed). Without auth (`--insecure-no-auth`), the bucket is the client
/// address's. The client address is the TCP peer's, or a trusted proxy's header's.
pub async fn authorize(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if exempt(path) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    match admit(&state, request.headers(), peer) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(error) => {
            let unauthorized = error.status == StatusCode::UNAUTHORIZED;
            let mut response = reject(path, error);
            if unauthorized {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

/// Who is calling (the tenant of the bearer token in `headers`), within the rate limits; or
/// the error to answer: 401 `unauthorized`, 429 `auth_rate_limited` or `rate_limited`. The one
/// check of every API, REST ([`authorize`]) and gRPC alike; `peer` is the TCP peer's address.
pub(crate) fn admit(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    peer: IpAddr,
) -> Result<Caller, ApiError> {
    let limits = &state.limits;
    // The client address is only needed for a bucket of its own (wrong tokens; no auth).
    let address = || {
        Client::address(limits::client_ip(
            peer,
            headers,
            &limits.client_ip_header,
            &limits.trusted_proxies,
        ))
    };
    let now = Instant::now();
    let caller = if state.tenants.required {
        let address = address();
        if let Err(wait) = limits.auth_failures.available(address, now) {
            state
                .metrics
                .auth_failures
                .with_label_values(&["locked_out"])
                .inc();
            return Err(too_many("auth_rate_limited", wait, "too many wrong tokens"));
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        match state.tenants.current().find(presented) {
            Some(tenant) => Caller(Some(tenant)),
            None => {
                let _ = limits.auth_failures.check(address, now);
                state
                    .metrics
                    .auth_failures
                    .with_label_values(&["unauthorized"])
                    .inc();
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid bearer token is required",
                ));
            }
        }
    } else {
        Caller(None)
    };
    let limited = match &caller.0 {
        Some(tenant) => tenant
            .rate
            .as_ref()
            .map(|bucket| bucket.check(Client::Token(0), now)),
        None => limits.rate.as_ref().map(|rate| rate.check(address(), now)),
    };
    if let Some(Err(wait)) = limited {
        state
            .metrics
            .tenant_rate_limited
            .with_label_values(&[caller.label()])
            .inc();
        return Err(too_many(
            "rate_limited",
            wait,
            "over the request rate limit",
        ));
    }
    Ok(caller)
}
