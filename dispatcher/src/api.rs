//! The HTTP API: Open Inference Protocol v2 (`/v2/...`) and asynchronous jobs (`/v1/...`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ember_core::amqp::unix_ms;
use ember_core::model::ModelSpec;
use ember_core::protocol::oip::InferResponse;
use ember_core::protocol::{ErrorCode, JobResult, Status};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::broker::{Broker, ModelReport, OutgoingJob, PublishError};
use crate::error::{ApiError, OipError};
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::store::{Claim, JobRecord, JobState, Store};
use crate::tenants::{Caller, Tenants};
use crate::{middleware, oip_binary, ssrf};

/// A heartbeat older than this does not count a worker as alive.
pub(crate) const WORKER_FRESHNESS: Duration = Duration::from_secs(5);

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub store: Store,
    pub metrics: Metrics,
    pub models: HashMap<String, ModelSpec>,
    pub infer_timeout: Duration,
    pub max_wait: Duration,
    pub tenants: Arc<Tenants>,
    pub callback_guard: ssrf::CallbackGuard,
    pub limits: Limits,
}

/// Request limits (413, 431, 429 beyond).
#[derive(Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Per client address without auth (a tenant has its own); none: no rate limit.
    pub rate: Option<RateLimiter>,
    /// Wrong tokens, per client address.
    pub auth_failures: RateLimiter,
    /// Peers whose `client_ip_header` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub client_ip_header: axum::http::HeaderName,
}

/// The API router.
pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.limits.max_body_bytes;
    Router::new()
        .route(
            "/v2/health/live",
            get(|| async { Json(json!({"live": true})) }),
        )
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(model_version_metadata),
        )
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_version_ready),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route(
            "/v2/models/{model}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/v1/models/{model}/jobs", post(submit))
        .route("/v1/jobs/{id}", get(job_status).delete(cancel))
        .layer(from_fn_with_state(state.clone(), middleware::authorize))
        .layer(from_fn_with_state(state.clone(), middleware::limit_headers))
        .layer(from_fn_with_state(state.clone(), middleware::observe))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn server_ready(
    State(state): State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, OipError> {
    if !state.broker.connected().await {
        return Err(OipError(ApiError::unavailable(
            "broker_unavailable",
            "not connected to the broker",
        )));
    }
    if !state.store.ping().await {
        return Err(OipError(ApiError::unavailable(
            "store_unavailable",
            "the result store does not answer",
        )));
    }
    Ok(Json(json!({"ready": true})))
}

/// The model `name`, if it is served here and the caller's tenant may use it (403
/// `model_forbidden` otherwise, counted).
pub(crate) fn model<'a>(
    state: &'a AppState,
    caller: &Caller,
    name: &str,
) -> Result<&'a ModelSpec, ApiError> {
    let spec = state
        .models
        .get(name)
        .ok_or_else(|| ApiError::unknown_model(name))?;
    if !caller.may_use(name) {
        state
            .metrics
            .tenant_jobs
            .with_label_values(&[caller.label(), name, "model_forbidden"])
            .inc();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "model_forbidden",
            format!("this token may not use model `{name}`"),
        ));
    }
    Ok(spec)
}

/// `GET /v2/models/{model}`: the graph's inputs and outputs as the freshest worker heartbeat
/// reports them (remembered after the workers are gone); before any worker has reported, the
/// model directory's name and version, and no tensors yet.
async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, OipError> {
    let spec = model(&state, &caller, &name)?;
    let report = state
        .broker
        .heartbeats
        .model_report(&name, None, WORKER_FRESHNESS);
    Ok(Json(metadata(&name, spec, report.as_ref())))
}

/// `GET /v2/models/{model}/versions/{version}`: the same, from a worker of that version; 404
/// for a version no worker reported (nor the model directory, before any worker has).
async fn model_version_metadata(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, OipError> {
    let spec = model(&state, &caller, &name)?;
    let report = served_version(&state, &name, spec, &version)?;
    Ok(Json(metadata(&name, spec, report.as_ref())))
}

/// What the workers report about `version` of `name`: `None` when no worker of the model has
/// reported yet and `version` is the model directory's; 404 `model_not_found` for a version no
/// worker reported (nor the model directory's, before any worker has).
pub(crate) fn served_version(
    state: &AppState,
    name: &str,
    spec: &ModelSpec,
    version: &str,
) -> Result<Option<ModelReport>, ApiError> {
    let heartbeats = &state.broker.heartbeats;
    let report = heartbeats.model_report(name, Some(version), WORKER_FRESHNESS);
    let unreported = heartbeats
        .model_report(name, None, WORKER_FRESHNESS)
        .is_none();
    if report.is_none() && !(unreported && version == spec.version) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("no version `{version}` of model `{name}` is served here"),
        ));
    }
    Ok(report)
}

/// The platform a model's metadata names: every model is an ONNX graph run by ONNX Runtime.
pub(crate) const PLATFORM: &str = "onnxruntime_onnx";

/// The model metadata body: from the workers' report when there is one, else from the spec.
fn metadata(name: &str, spec: &ModelSpec, report: Option<&ModelReport>) -> serde_json::Value {
    match report {
        Some(report) => json!({
            "name": name,
            "versions": report.versions,
            "platform": PLATFORM,
            "inputs": report.info.inputs,
            "outputs": report.info.outputs,
            "parameters": {
                "max_batch_size": report.info.max_batch,
                "labels": spec.labels,
                "input": report.info.input,
                "decoder": report.info.decoder,
            },
        }),
        None => json!({
            "name": name,
            "versions": [spec.version],
            "platform": PLATFORM,
            "inputs": [],
            "outputs": [],
            "parameters": {
                "max_batch_size": spec.max_batch,
                "labels": spec.labels,
                "note": NO_WORKER_YET,
            },
        }),
    }
}

/// The metadata's note while no worker of the model has reported.
const NO_WORKER_YET: &str = "no worker of this model has started yet: the graph's inputs and \
     outputs appear here once one has";

async fn model_ready(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, OipError> {
    model(&state, &caller, &name)?;
    Ok(Json(ready(&state, &name, None)?))
}

/// `GET /v2/models/{model}/versions/{version}/ready`: 200 while a worker of that version is
/// ready; 404 for a version no worker reported (see [`served_version`]).
async fn model_version_ready(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, OipError> {
    let spec = model(&state, &caller, &name)?;
    let report = served_version(&state, &name, spec, &version)?;
    // Before any worker has reported its version, any ready worker is the directory's version.
    let of_version = report.is_some().then_some(version.as_str());
    Ok(Json(ready(&state, &name, of_version)?))
}

/// The readiness body, or 503 `model_not_ready` when no worker (of `version`) is ready.
pub(crate) fn ready(
    state: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<serde_json::Value, ApiError> {
    let workers = state
        .broker
        .heartbeats
        .ready_workers(name, version, WORKER_FRESHNESS);
    if workers == 0 {
        let of = version.map(|v| format!(" version {v}")).unwrap_or_default();
        return Err(ApiError::unavailable(
            "model_not_ready",
            format!(
                "no worker of `{name}`{of} has reported ready in the last {WORKER_FRESHNESS:?}"
            ),
        ));
    }
    let mut body = json!({"name": name, "ready": true, "workers": workers});
    if let Some(version) = version {
        body["version"] = json!(version);
    }
    Ok(body)
}

/// The body, or 413 `body_too_large` past `max` bytes, or 400 `invalid_body` when it could not
/// be read (the connection's own error is not echoed).
fn body_or_error(body: Result<Bytes, BytesRejection>, max: usize) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body is larger than the limit of {max} bytes"),
            )
        } else {
            ApiError::bad_request("invalid_body", "the request body could not be read")
                .with_detail(rejection.body_text())
        }
    })
}

fn publish_error(error: PublishError, model: &str, version: Option<&str>) -> ApiError {
    match error {
        PublishError::QueueFull => ApiError::queue_full(model),
        PublishError::Unroutable if let Some(version) = version => ApiError::new(
            StatusCode::NOT_FOUND,
            "model_version_not_found",
            format!("version `{version}` of model `{model}` is not served and none is coming"),
        ),
        PublishError::Unroutable => {
            ApiError::unavailable("no_queue", format!("no queue took the job for `{model}`"))
        }
        PublishError::Refused(why) | PublishError::Unavailable(why) => {
            ApiError::unavailable("broker_unavailable", "the broker is unavailable")
                .with_detail(why)
        }
    }
}

/// HTTP status for a failed job's error code.
fn job_error_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidInput | ErrorCode::InvalidImage => StatusCode::BAD_REQUEST,
        ErrorCode::UnsupportedContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ErrorCode::InputTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Cancelled => StatusCode::CONFLICT,
        ErrorCode::ModelVersionNotFound => StatusCode::NOT_FOUND,
        ErrorCode::ModelError | ErrorCode::Internal | ErrorCode::DeadLettered => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The job's result within `timeout`: `Ok(None)` when none came; 500 `internal` for one that
/// came but does not parse (not a timeout: the job is over).
async fn wait_for(
    state: &AppState,
    job_id: &str,
    receiver: oneshot::Receiver<Vec<u8>>,
    timeout: Duration,
) -> Result<Option<JobResult>, ApiError> {
    let started = Instant::now();
    let outcome = tokio::time::timeout(timeout, receiver).await;
    match outcome {
        Ok(Ok(body)) => {
            state.metrics.wait.observe(started.elapsed().as_secs_f64());
            serde_json::from_slice(&body).map(Some).map_err(|e| {
                ApiError::internal(format!(
                    "job {job_id}: the worker's result does not parse: {e}"
                ))
            })
        }
        _ => {
            state.broker.forget(job_id).await;
            Ok(None)
        }
    }
}

fn status_url(job_id: &str) -> String {
    format!("/v1/jobs/{job_id}")
}

fn accepted(job_id: &str) -> Response {
    let url = status_url(job_id);
    let mut response = (
        StatusCode::ACCEPTED,
        Json(json!({"job_id": job_id, "status": "queued", "status_url": url})),
    )
        .into_response();
    if let Ok(location) = HeaderValue::from_str(&url) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

fn header_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn infer(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OipError> {
    let spec = model(&state, &caller, &name)?;
    run_infer(&state, &caller, (name, None), spec, &headers, body).await
}

/// `POST /v2/models/{model}/versions/{version}/infer`: the job is pinned to the version: it
/// goes to that version's queue (`ember.jobs.<model>@<version>`) and only a worker of that
/// version answers it. A version with no queue bound (never served, or retired after a
/// rollout) is 404 `model_version_not_found` at once; one whose queue is bound but whose
/// workers are still starting (a rollout under way) waits for them.
async fn infer_version(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OipError> {
    let spec = model(&state, &caller, &name)?;
    let version = pinned_version(Some(&version))?;
    run_infer(&state, &caller, (name, version), spec, &headers, body).await
}

/// A version a client pinned, checked (it becomes part of a routing key).
pub(crate) fn pinned_version(version: Option<&str>) -> Result<Option<&str>, ApiError> {
    match version {
        Some(version) => ember_core::model::check_version(version)
            .map(|()| Some(version))
            .map_err(|why| ApiError::bad_request("invalid_version", why)),
        None => Ok(None),
    }
}

async fn run_infer(
    state: &AppState,
    caller: &Caller,
    (name, version): (String, Option<&str>),
    spec: &ModelSpec,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, OipError> {
    let body = body_or_error(body, state.limits.max_body_bytes)?;
    let parsed = oip_binary::parse_infer(body, header_value(headers, oip_binary::HEADER_LENGTH))?;
    let respond_async =
        header_value(headers, "prefer").is_some_and(|p| p.contains("respond-async"));
    let call = InferCall {
        name: &name,
        version,
        traceparent: header_value(headers, "traceparent"),
        wait: (!respond_async).then_some(state.infer_timeout),
        deadline_ms: None,
    };
    let response = match infer_parsed(state, caller, spec, &parsed, call).await? {
        Inferred::Accepted(job_id) => return Ok(accepted(&job_id)),
        Inferred::Answered(response) => response,
    };
    if oip_binary::wants_binary_output(&parsed.request) {
        return Ok(oip_binary::encode_response(&response, &parsed.request)?);
    }
    Ok(Json(response).into_response())
}

/// An inference call, over either protocol (REST or gRPC).
#[derive(Debug)]
pub(crate) struct InferCall<'a> {
    pub name: &'a str,
    /// Pinned by the client (checked).
    pub version: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    /// How long to wait for the answer; `None`: do not (202, the job goes on).
    pub wait: Option<Duration>,
    /// The job's deadline (unix ms), after which a worker answers `deadline_exceeded`.
    pub deadline_ms: Option<u64>,
}

/// What came of an inference call.
#[derive(Debug)]
pub(crate) enum Inferred {
    /// Enqueued without waiting: the job's id.
    Accepted(String),
    /// The answer, its outputs those the request asked for.
    Answered(InferResponse),
}

/// Enqueues a checked inference request as a job and waits for its answer: the one path of
/// the REST and gRPC infer calls. A job the worker failed is its error code's status; no answer
/// within the wait is 504 `timeout` (the job goes on).
pub(crate) async fn infer_parsed(
    state: &AppState,
    caller: &Caller,
    spec: &ModelSpec,
    parsed: &oip_binary::InferBody,
    call: InferCall<'_>,
) -> Result<Inferred, ApiError> {
    let (name, version) = (call.name, call.version);
    let request = &parsed.request;
    let job_id = uuid::Uuid::new_v4().to_string();
    let job = OutgoingJob {
        job_id: &job_id,
        model: name,
        body: &parsed.body,
        content_type: parsed.content_type,
        inference_header_length: parsed.header_length,
        callback_url: None,
        deadline_ms: call.deadline_ms,
        traceparent: call.traceparent,
        version,
        reply: call.wait.is_some(),
    };
    let receiver = enqueue(state, caller, job)
        .await
        .map_err(|e| e.into_api(name, version))?;
    let (Some(receiver), Some(wait)) = (receiver, call.wait) else {
        return Ok(Inferred::Accepted(job_id));
    };
    let Some(result) = wait_for(state, &job_id, receiver, wait).await? else {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "no result within {wait:?}; the job goes on: {}",
                status_url(&job_id)
            ),
        ));
    };
    if let Some(error) = result.error {
        let status = job_error_status(error.code);
        // A worker's own failure (model, runtime) may carry internal text: logged, not sent.
        let failure = if status.is_server_error() {
            ApiError::new(status, error.code.as_str(), "the job failed in the worker")
                .with_detail(format!("job {job_id}: {}", error.message))
        } else {
            ApiError::new(status, error.code.as_str(), error.message)
        };
        return Err(failure);
    }
    let mut outputs = result
        .outputs
        .and_then(|o| o.tensors)
        .ok_or_else(|| ApiError::internal("the worker returned no tensors"))?;
    if let Some(requested) = &request.outputs {
        outputs.retain(|t| requested.iter().any(|r| r.name == t.name));
    }
    let version = result
        .model_version
        .clone()
        .unwrap_or_else(|| model_version(state, name, spec, &result.worker));
    Ok(Inferred::Answered(InferResponse {
        model_name: name.to_string(),
        model_version: Some(version),
        id: request.id.clone(),
        outputs,
    }))
}

/// The version a result came from: what its worker reports, else what the model's workers
/// reported last, else the model directory's.
fn model_version(state: &AppState, name: &str, spec: &ModelSpec, worker: &str) -> String {
    let heartbeats = &state.broker.heartbeats;
    heartbeats
        .worker_version(name, worker)
        .or_else(|| {
            heartbeats
                .model_report(name, None, WORKER_FRESHNESS)
                .map(|report| report.info.version.clone())
        })
        .unwrap_or_else(|| spec.version.clone())
}

/// Why a job could not be enqueued.
#[derive(Debug)]
enum EnqueueError {
    /// Its record could not be written.
    Store(redis::RedisError),
    /// Its tenant has this many jobs of the model outstanding already.
    Share(u32),
    /// The broker did not take it.
    Publish(PublishError),
}

impl EnqueueError {
    fn into_api(self, model: &str, version: Option<&str>) -> ApiError {
        match self {
            EnqueueError::Store(error) => error.into(),
            EnqueueError::Share(cap) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "tenant_queue_full",
                    format!(
                        "this tenant has {cap} jobs of `{model}` waiting or running, its share; \
                         retry when one is answered"
                    ),
                )
            },
            EnqueueError::Publish(error) => publish_error(error, model, version),
        }
    }
}

/// The one way in for a job, from either API: its tenant's share of the model's queue (when it
/// has one), its record in the store (so that its status is `queued` from now on, and it is the
/// tenant's), then the publish with confirms. With `job.reply`, the receiver of its result.
async fn enqueue(
    state: &AppState,
    caller: &Caller,
    job: OutgoingJob<'_>,
) -> Result<Option<oneshot::Receiver<Vec<u8>>>, EnqueueError> {
    let tenant = caller.0.as_deref();
    let (model, job_id) = (job.model, job.job_id);
    let count = |outcome: &str| {
        state
            .metrics
            .tenant_jobs
            .with_label_values(&[caller.label(), model, outcome])
            .inc();
    };
    let share = tenant.and_then(|t| t.max_outstanding.map(|cap| (t.name.as_str(), cap)));
    if let Some((tenant, cap)) = share
        && !state
            .store
            .admit(tenant, model, job_id, cap)
            .await
            .map_err(EnqueueError::Store)?
    {
        count("tenant_queue_full");
        return Err(EnqueueError::Share(cap));
    }
    let release = || async {
        if let Some((tenant, _)) = share {
            state.store.release(tenant, model, job_id).await;
        }
    };
    let recorded = state
        .store
        .put_job(&JobRecord {
            job_id: job_id.to_string(),
            model: model.to_string(),
            submitted_at_ms: unix_ms(),
            cancelled: false,
            expired: false,
            tenant: tenant.map(|t| t.name.clone()),
            counted: share.is_some(),
        })
        .await;
    if let Err(error) = recorded {
        release().await;
        return Err(EnqueueError::Store(error));
    }
    match state.broker.publish(job, &state.metrics).await {
        Ok(receiver) => {
            count("accepted");
            Ok(receiver)
        }
        Err(error) => {
            release().await;
            count(match error {
                PublishError::QueueFull => "queue_full",
                _ => "unavailable",
            });
            Err(EnqueueError::Publish(error))
        }
    }
}

#[derive(Debug, Deserialize)]
struct SubmitQuery {
    wait: Option<String>,
}

/// A job body's content type (its essence, lower-case), if it is one a job may have.
fn job_content_type(headers: &HeaderMap) -> Result<String, ApiError> {
    let ct = header_value(headers, "content-type").unwrap_or("application/octet-stream");
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if !matches!(
        essence.as_str(),
        "image/png" | "image/jpeg" | "image/jpg" | "application/json" | "application/octet-stream"
    ) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            format!(
                "`{essence}`: send image/png, image/jpeg or an application/json tensor request"
            ),
        ));
    }
    Ok(essence)
}

/// `?wait=`, at most `max`.
fn wait_duration(wait: Option<&str>, max: Duration) -> Result<Option<Duration>, ApiError> {
    wait.map(|w| {
        humantime::parse_duration(w)
            .map(|wait| wait.min(max))
            .map_err(|e| ApiError::bad_request("invalid_wait", format!("wait=`{w}`: {e}")))
    })
    .transpose()
}

/// What an idempotency key says about a submit.
enum Keyed {
    /// Publish the job with this id; `claimed`: this request claimed the key afresh (and must
    /// release it if the publish fails).
    Publish { job_id: String, claimed: bool },
    /// The key's job is on the queue already.
    Committed(String),
}

/// Whose an idempotency key is: a tenant's, for one model (two tenants using the same key get
/// two jobs, and neither learns of the other's).
#[derive(Debug, Clone, Copy)]
struct KeyScope<'a> {
    tenant: &'a str,
    model: &'a str,
}

/// Claims the submit's idempotency key, if it has one, for a fresh job id.
async fn claim_key(
    state: &AppState,
    scope: KeyScope<'_>,
    key: Option<&str>,
) -> Result<Keyed, ApiError> {
    let job_id = uuid::Uuid::new_v4().to_string();
    let Some(key) = key else {
        return Ok(Keyed::Publish {
            job_id,
            claimed: false,
        });
    };
    if key.is_empty() || key.len() > 255 {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            "1 to 255 characters",
        ));
    }
    Ok(
        match state
            .store
            .claim_idempotency_key(scope.tenant, scope.model, key, &job_id)
            .await?
        {
            Claim::New => Keyed::Publish {
                job_id,
                claimed: true,
            },
            Claim::Committed(existing) => Keyed::Committed(existing),
            // The first request with this key has not seen its job published (it may have
            // died between the claim and the confirm): publish the job again, same id.
            Claim::Pending(existing) => Keyed::Publish {
                job_id: existing,
                claimed: false,
            },
        },
    )
}

/// What became of an idempotency key after this request's publish was refused.
enum Unclaimed {
    /// Free again (this request had claimed it), or whoever claims it next starts afresh.
    Released,
    /// Another request's job under this key was published meanwhile.
    Committed(String),
    /// Another request holding this key is still publishing its job: it may yet run.
    Pending,
}

/// After a refused publish: releases a key this request claimed; for one claimed before, what
/// the request that claimed it made of it.
async fn unclaim_key(
    state: &AppState,
    scope: KeyScope<'_>,
    key: &str,
    job_id: &str,
    claimed: bool,
) -> Unclaimed {
    if claimed {
        state
            .store
            .release_idempotency_key(scope.tenant, scope.model, key)
            .await;
        return Unclaimed::Released;
    }
    match state
        .store
        .claim_idempotency_key(scope.tenant, scope.model, key, job_id)
        .await
    {
        Ok(Claim::Committed(existing)) => Unclaimed::Committed(existing),
        Ok(Claim::Pending(_)) => Unclaimed::Pending,
        _ => Unclaimed::Released,
    }
}

async fn submit(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    query: Result<Query<SubmitQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    model(&state, &caller, &name)?;
    let body = body_or_error(body, state.limits.max_body_bytes)?;
    if body.is_empty() {
        return Err(ApiError::bad_request("invalid_input", "the body is empty"));
    }
    let essence = job_content_type(&headers)?;
    let wait = wait_duration(query.wait.as_deref(), state.max_wait)?;
    let callback_url = header_value(&headers, "x-callback-url");
    if let Some(url) = callback_url {
        state.callback_guard.check_url(url).await?;
    }
    let version = pinned_version(header_value(&headers, "ember-model-version"))?;
    let idempotency_key = header_value(&headers, "idempotency-key");
    let scope = KeyScope {
        tenant: caller.name(),
        model: &name,
    };
    let (job_id, claimed) = match claim_key(&state, scope, idempotency_key).await? {
        Keyed::Publish { job_id, claimed } => (job_id, claimed),
        Keyed::Committed(existing) => return Ok(accepted(&existing)),
    };
    let job = OutgoingJob {
        job_id: &job_id,
        model: &name,
        body: &body,
        content_type: &essence,
        inference_header_length: None,
        callback_url,
        deadline_ms: None,
        traceparent: header_value(&headers, "traceparent"),
        version,
        reply: wait.is_some(),
    };
    let receiver = match enqueue(&state, &caller, job).await {
        Ok(receiver) => receiver,
        Err(EnqueueError::Publish(error)) => {
            // Only a definite refusal (a nack at the bound, nothing routed) frees the key: a
            // publish whose confirm never came may have reached the queue, so the key stays
            // pending under this job id, and a retry publishes the same id again (one result
            // and one callback per job id), never a second job.
            // A nack below the bound is as definite as one at it (seen in the chaos suite's
            // overload: a key kept pending after such a nack made every retry 503 until the
            // client gave up).
            let refused = matches!(
                error,
                PublishError::QueueFull | PublishError::Unroutable | PublishError::Refused(_)
            );
            if let Some(key) = idempotency_key
                && refused
            {
                match unclaim_key(&state, scope, key, &job_id, claimed).await {
                    // The first request with this key got its job published meanwhile.
                    Unclaimed::Committed(existing) => return Ok(accepted(&existing)),
                    // Its job may still be published: not "refused" while it may run.
                    Unclaimed::Pending => {
                        return Err(ApiError::unavailable(
                            "idempotency_key_pending",
                            "a request with this Idempotency-Key is still publishing its job; retry",
                        ));
                    }
                    Unclaimed::Released => {}
                }
            }
            return Err(publish_error(error, &name, version));
        }
        Err(error) => return Err(error.into_api(&name, version)),
    };
    if let Some(key) = idempotency_key {
        // The job is on the queue: later requests with this key get it without publishing.
        if let Err(error) = state
            .store
            .commit_idempotency_key(scope.tenant, scope.model, key, &job_id)
            .await
        {
            tracing::warn!(%error, %job_id, "cannot commit the idempotency key; a retry would publish the job again (same id)");
        }
    }
    if let (Some(receiver), Some(wait)) = (receiver, wait)
        && let Some(result) = wait_for(&state, &job_id, receiver, wait).await?
    {
        let status = match result.status {
            Status::Ok => StatusCode::OK,
            Status::Error => result
                .error
                .as_ref()
                .map(|e| job_error_status(e.code))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        };
        return Ok((
            status,
            Json(job_view(&job_id, &JobState::Finished(Box::new(result)))),
        )
            .into_response());
    }
    Ok(accepted(&job_id))
}

fn job_view(job_id: &str, state: &JobState) -> serde_json::Value {
    match state {
        JobState::Queued(record) => {
            json!({"job_id": job_id, "model": record.model, "status": "queued"})
        }
        JobState::Cancelled(record) => {
            json!({"job_id": job_id, "model": record.model, "status": "cancelled"})
        }
        JobState::Expired(record) => json!({
            "job_id": job_id,
            "model": record.model,
            "status": "expired",
            "message": "the job ran, but its result was dropped from ember.results.store \
                        (its length bound or message TTL) before a dispatcher stored it",
        }),
        // `job_status` answers 500 for it instead; a result that does not parse has no view.
        JobState::Unreadable(_) => json!({"job_id": job_id, "status": "failed"}),
        JobState::Finished(result) => {
            let status = match result.status {
                Status::Ok => "done",
                Status::Error
                    if result
                        .error
                        .as_ref()
                        .is_some_and(|e| e.code == ErrorCode::Cancelled) =>
                {
                    "cancelled"
                }
                Status::Error => "failed",
            };
            json!({"job_id": job_id, "model": result.model, "status": status, "result": result})
        }
    }
}

/// The job `id` if the caller may see it: another tenant's job is the same 404 as an unknown
/// one.
async fn visible_job(state: &AppState, caller: &Caller, id: &str) -> Result<JobState, ApiError> {
    match state.store.job(id).await? {
        Some(job) if caller.owns(job.owner.as_deref()) => Ok(job.state),
        _ => Err(ApiError::job_not_found(id)),
    }
}

async fn job_status(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let job = visible_job(&state, &caller, &id).await?;
    if let JobState::Unreadable(why) = &job {
        return Err(ApiError::internal(format!(
            "job {id}: its stored result does not parse: {why}"
        )));
    }
    Ok(Json(job_view(&id, &job)))
}

async fn cancel(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match visible_job(&state, &caller, &id).await? {
        JobState::Finished(result) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!("job `{id}` already ran ({})", result.status.as_str()),
        )),
        JobState::Unreadable(..) | JobState::Expired(..) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!("job `{id}` already ran"),
        )),
        JobState::Cancelled(record) | JobState::Queued(record) => {
            state
                .store
                .put_job(&JobRecord {
                    cancelled: true,
                    ..record.clone()
                })
                .await?;
            state
                .broker
                .announce_cancel(&record.model, &id)
                .await
                .map_err(|e| {
                    ApiError::unavailable("broker_unavailable", "the broker is unavailable")
                        .with_detail(e)
                })?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"job_id": id, "model": record.model, "status": "cancelled"})),
            )
                .into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ember_core::protocol::ModelInfo;
    use ember_core::protocol::oip::TensorMeta;

    use super::*;

    fn spec() -> ModelSpec {
        let mut spec = ModelSpec::parse("version = \"3\"\nmax_batch = 4\n[labels]\n0 = \"cat\"")
            .expect("spec");
        spec.name = "m".into();
        spec
    }

    #[test]
    fn metadata_is_the_graphs_once_a_worker_reported_it() {
        let report = ModelReport {
            info: Arc::new(ModelInfo {
                version: "5".into(),
                inputs: vec![TensorMeta {
                    name: "input".into(),
                    datatype: "FP32".into(),
                    shape: vec![-1, 4],
                }],
                outputs: vec![TensorMeta {
                    name: "label".into(),
                    datatype: "INT64".into(),
                    shape: vec![-1],
                }],
                max_batch: 2,
                input: "tensor".into(),
                decoder: "classification".into(),
            }),
            versions: vec!["4".into(), "5".into()],
        };
        let body = metadata("m", &spec(), Some(&report));
        assert_eq!(body["versions"], json!(["4", "5"]));
        assert_eq!(
            body["inputs"],
            json!([{"name": "input", "datatype": "FP32", "shape": [-1, 4]}])
        );
        assert_eq!(body["outputs"][0]["datatype"], "INT64");
        assert_eq!(body["parameters"]["max_batch_size"], 2);
        assert_eq!(body["parameters"]["labels"]["0"], "cat");
        assert_eq!(body["parameters"]["decoder"], "classification");
        assert!(body["parameters"].get("note").is_none());
    }

    #[test]
    fn before_any_worker_metadata_is_the_model_directorys_with_a_note() {
        let body = metadata("m", &spec(), None);
        assert_eq!(body["name"], "m");
        assert_eq!(body["versions"], json!(["3"]));
        assert_eq!(body["inputs"], json!([]));
        assert_eq!(body["outputs"], json!([]));
        assert_eq!(body["parameters"]["max_batch_size"], 4);
        assert_eq!(body["parameters"]["labels"]["0"], "cat");
        assert_eq!(body["parameters"]["note"], NO_WORKER_YET);
    }
}
