//! The Open Inference Protocol v2 over gRPC: `inference.GRPCInferenceService` (ServerLive,
//! ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer), what
//! `tritonclient.grpc` and KServe's clients call, on its own port (`--grpc-listen`).
//!
//! It is the REST API's twin, not a second implementation: the same bearer tokens and rate
//! limits ([`middleware::admit`]), the same header limits, the same body limit (as the largest
//! message), the same checks of the request ([`oip_binary::parse_infer`]) and the same path to
//! the queue and back ([`api::infer_parsed`]). A request becomes the binary tensor form the
//! REST API takes (a JSON header, then `raw_input_contents` as they came); the answer's tensors
//! go back in `raw_output_contents`. REST errors map to gRPC status codes by their HTTP status
//! (see [`status_of`]): a full queue is `RESOURCE_EXHAUSTED` with a `RetryInfo` detail, no
//! answer within the client's `grpc-timeout` is `DEADLINE_EXCEEDED`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use ember_core::amqp::unix_ms;
use ember_core::protocol::oip::{InferRequest, InferResponse, InputTensor, RequestedOutput};
use ember_grpc::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use ember_grpc::inference::infer_parameter::ParameterChoice;
use ember_grpc::inference::model_infer_request::InferInputTensor;
use ember_grpc::inference::model_infer_response::InferOutputTensor;
use ember_grpc::inference::model_metadata_response::TensorMetadata;
use ember_grpc::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ServerLiveRequest, ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse,
    ServerReadyRequest, ServerReadyResponse,
};
use serde_json::{Map, Value, json};
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::api::{self, AppState, InferCall, Inferred};
use crate::error::ApiError;
use crate::oip_binary::{self, Datatype};
use crate::tenants::Caller;
use crate::{limits, middleware};

/// The service's full name, the prefix of its routes (and of the request metrics' `route`).
const SERVICE: &str = "/inference.GRPCInferenceService/";

/// The gRPC service, sharing the REST API's state.
#[derive(Debug, Clone)]
pub struct OipGrpc {
    state: Arc<AppState>,
}

impl OipGrpc {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// The tonic service, its largest message the API's body limit (a little over, for the
    /// protobuf framing: the request's own size is checked against the limit as the REST body).
    pub fn server(self) -> GrpcInferenceServiceServer<Self> {
        let max = self.state.limits.max_body_bytes.saturating_add(64 * 1024);
        GrpcInferenceServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(usize::MAX)
    }

    /// The header limits, then [`middleware::admit`] (tokens, rate limits).
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        let limits = &self.state.limits;
        let headers = request.metadata().clone().into_headers();
        limits::check_headers(&headers, limits.max_headers, limits.max_header_bytes).map_err(
            |why| {
                ApiError::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "headers_too_large",
                    why,
                )
            },
        )?;
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        middleware::admit(&self.state, &headers, peer)
    }

    /// Counts and times a call as the REST middleware does a request (`route` is the gRPC
    /// method's path, `status` the HTTP status its outcome maps from).
    fn observe<T>(
        &self,
        method: &str,
        started: Instant,
        outcome: Result<T, ApiError>,
    ) -> Result<T, Status> {
        let metrics = &self.state.metrics;
        let route = format!("{SERVICE}{method}");
        metrics
            .request_duration
            .with_label_values(&[&route])
            .observe(started.elapsed().as_secs_f64());
        let http = match &outcome {
            Ok(_) => StatusCode::OK,
            Err(error) => error.status,
        };
        metrics
            .requests
            .with_label_values(&[&route, "POST", http.as_str()])
            .inc();
        outcome.map_err(status_of)
    }

    async fn infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<ModelInferResponse, ApiError> {
        let caller = self.caller(&request)?;
        let state = &self.state;
        let timeout = grpc_timeout(request.metadata())?;
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let request = request.into_inner();
        let spec = api::model(state, &caller, &request.model_name)?;
        let version = api::pinned_version(non_empty(&request.model_version))?;
        let parsed = infer_body(&request, state.limits.max_body_bytes)?;
        // The client's deadline bounds the wait and goes with the job: a worker that takes it
        // up too late answers `deadline_exceeded` rather than running it for no one. The wait
        // ends a tenth (at most 100 ms) before the deadline, so that the client gets this
        // answer, saying what happened, before its own timer ends the call.
        let wait = timeout.map_or(state.infer_timeout, |t| {
            t.saturating_sub((t / 10).min(Duration::from_millis(100)))
                .min(state.infer_timeout)
        });
        let call = InferCall {
            name: &request.model_name,
            version,
            traceparent: traceparent.as_deref(),
            wait: Some(wait),
            deadline_ms: timeout.map(|t| unix_ms().saturating_add(t.as_millis() as u64)),
        };
        match api::infer_parsed(state, &caller, spec, &parsed, call).await? {
            Inferred::Answered(response) => infer_response(response),
            Inferred::Accepted(job_id) => Err(ApiError::internal(format!(
                "job {job_id} was enqueued without a reply"
            ))),
        }
    }

    fn model_metadata_of(
        &self,
        request: &Request<ModelMetadataRequest>,
    ) -> Result<ModelMetadataResponse, ApiError> {
        let caller = self.caller(request)?;
        let state = &self.state;
        let asked = request.get_ref();
        let name = asked.name.as_str();
        let spec = api::model(state, &caller, name)?;
        let report = match non_empty(&asked.version) {
            Some(version) => api::served_version(state, name, spec, version)?,
            None => state
                .broker
                .heartbeats
                .model_report(name, None, api::WORKER_FRESHNESS),
        };
        let tensors = |metas: &[ember_core::protocol::oip::TensorMeta]| {
            metas
                .iter()
                .map(|m| TensorMetadata {
                    name: m.name.clone(),
                    datatype: m.datatype.clone(),
                    shape: m.shape.clone(),
                })
                .collect()
        };
        Ok(match report {
            Some(report) => ModelMetadataResponse {
                name: name.to_string(),
                versions: report.versions.clone(),
                platform: api::PLATFORM.to_string(),
                inputs: tensors(&report.info.inputs),
                outputs: tensors(&report.info.outputs),
            },
            // Before any worker has reported, the graph's tensors are not known yet.
            None => ModelMetadataResponse {
                name: name.to_string(),
                versions: vec![spec.version.clone()],
                platform: api::PLATFORM.to_string(),
                inputs: Vec::new(),
                outputs: Vec::new(),
            },
        })
    }

    fn model_ready_of(
        &self,
        request: &Request<ModelReadyRequest>,
    ) -> Result<ModelReadyResponse, ApiError> {
        let caller = self.caller(request)?;
        let state = &self.state;
        let asked = request.get_ref();
        let name = asked.name.as_str();
        let spec = api::model(state, &caller, name)?;
        let version = match non_empty(&asked.version) {
            Some(version) => api::served_version(state, name, spec, version)?
                .is_some()
                .then_some(version),
            None => None,
        };
        // Not ready is an answer (`ready: false`), as in Triton, not an error.
        Ok(ModelReadyResponse {
            ready: api::ready(state, name, version).is_ok(),
        })
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for OipGrpc {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    /// Ready while the broker is connected and the result store answers (as `/v2/health/ready`).
    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = self.state.broker.connected().await && self.state.store.ping().await;
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let started = Instant::now();
        let outcome = self.model_ready_of(&request);
        self.observe("ModelReady", started, outcome)
            .map(Response::new)
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let started = Instant::now();
        let outcome = self.caller(&request).map(|_| ServerMetadataResponse {
            name: "ember".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            extensions: Vec::new(),
        });
        self.observe("ServerMetadata", started, outcome)
            .map(Response::new)
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let started = Instant::now();
        let outcome = self.model_metadata_of(&request);
        self.observe("ModelMetadata", started, outcome)
            .map(Response::new)
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let started = Instant::now();
        let span = if ember_core::otel::on() {
            let span = tracing::info_span!(
                target: ember_core::otel::TARGET,
                "rpc",
                otel.name = "inference.GRPCInferenceService/ModelInfer",
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = "inference.GRPCInferenceService",
                rpc.method = "ModelInfer",
            );
            let traceparent = request
                .metadata()
                .get("traceparent")
                .and_then(|v| v.to_str().ok());
            ember_core::otel::set_remote_parent(&span, traceparent);
            span
        } else {
            tracing::Span::none()
        };
        let outcome = tracing::Instrument::instrument(self.infer(request), span).await;
        self.observe("ModelInfer", started, outcome)
            .map(Response::new)
    }
}

fn non_empty(text: &str) -> Option<&str> {
    (!text.is_empty()).then_some(text)
}

/// The gRPC status for an API error, by its HTTP status (as the gRPC/HTTP mapping of the gRPC
/// project's `http-grpc-status-mapping`, turned around, and as Triton answers). The message is
/// the REST one (`code: message`), the stable code also in `ember-error-code`; a 5xx carries its
/// error id (the detail is logged under it, never sent); 429 and 503 carry a `RetryInfo` with
/// the Retry-After delay.
pub fn status_of(error: ApiError) -> Status {
    let code = match error.status {
        StatusCode::BAD_REQUEST
        | StatusCode::UNSUPPORTED_MEDIA_TYPE
        | StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Code::InvalidArgument,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::CONFLICT => Code::Aborted,
        // A message over the size limit is RESOURCE_EXHAUSTED in gRPC itself.
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        _ => Code::Internal,
    };
    let message = match error.log_server_error() {
        Some(id) => format!("{}: {} (error id {id})", error.code, error.message),
        None => format!("{}: {}", error.code, error.message),
    };
    let mut status = match error.retry_after {
        Some(seconds) => Status::with_error_details(
            code,
            message,
            ErrorDetails::with_retry_info(Some(Duration::from_secs(seconds))),
        ),
        None => Status::new(code, message),
    };
    if let Ok(value) = error.code.parse() {
        status.metadata_mut().insert("ember-error-code", value);
    }
    status
}

/// The client's `grpc-timeout` (`<up to 8 digits><H|M|S|m|u|n>`), if it sent one.
fn grpc_timeout(metadata: &MetadataMap) -> Result<Option<Duration>, ApiError> {
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(None);
    };
    let invalid = || {
        ApiError::bad_request(
            "invalid_timeout",
            format!("grpc-timeout `{value:?}` is not a gRPC timeout"),
        )
    };
    let text = value.to_str().map_err(|_| invalid())?;
    let (digits, unit) = text.split_at(text.len().saturating_sub(1));
    if digits.is_empty() || digits.len() > 8 {
        return Err(invalid());
    }
    let amount: u64 = digits.parse().map_err(|_| invalid())?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return Err(invalid()),
    };
    Ok(Some(timeout))
}

/// An `InferParameter` as the JSON value the REST form carries.
fn parameter(value: &InferParameter) -> Value {
    match &value.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => json!(b),
        Some(ParameterChoice::Int64Param(i)) => json!(i),
        Some(ParameterChoice::StringParam(s)) => json!(s),
        None => Value::Null,
    }
}

fn parameters(map: &std::collections::HashMap<String, InferParameter>) -> Map<String, Value> {
    map.iter().map(|(k, v)| (k.clone(), parameter(v))).collect()
}

/// A request the protocol cannot take (as [`oip_binary`] calls one: `invalid_request`).
fn invalid(why: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", why)
}

/// An input's typed `contents` as the JSON array of the REST form, by its datatype.
fn contents_json(input: &InferInputTensor) -> Result<Value, ApiError> {
    let empty = InferTensorContents::default();
    let contents = input.contents.as_ref().unwrap_or(&empty);
    let datatype = Datatype::parse(&input.datatype).ok_or_else(|| {
        invalid(format!(
            "input `{}` has the unknown datatype `{}`",
            input.name, input.datatype
        ))
    })?;
    Ok(match datatype {
        Datatype::Bool => json!(contents.bool_contents),
        Datatype::Int8 | Datatype::Int16 | Datatype::Int32 => json!(contents.int_contents),
        Datatype::Int64 => json!(contents.int64_contents),
        Datatype::Uint8 | Datatype::Uint16 | Datatype::Uint32 => json!(contents.uint_contents),
        Datatype::Uint64 => json!(contents.uint64_contents),
        Datatype::Fp32 => json!(contents.fp32_contents),
        Datatype::Fp64 => json!(contents.fp64_contents),
        Datatype::Fp16 => {
            return Err(invalid(format!(
                "input `{}` is FP16, which travels only in raw_input_contents",
                input.name
            )));
        }
        Datatype::Bytes => {
            let strings = contents
                .bytes_contents
                .iter()
                .map(|b| String::from_utf8(b.clone()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    invalid(format!(
                        "input `{}`: a BYTES element in contents is not UTF-8 (send it in \
                         raw_input_contents)",
                        input.name
                    ))
                })?;
            json!(strings)
        }
    })
}

/// The request in the REST API's binary tensor form (a JSON header, then the raw inputs as
/// they came), checked as a REST body is: over `max_body` bytes is 413 `body_too_large`.
fn infer_body(
    request: &ModelInferRequest,
    max_body: usize,
) -> Result<oip_binary::InferBody, ApiError> {
    let raw = &request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries for {} inputs: give one for each input, in order, \
             or none (and contents)",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (i, input) in request.inputs.iter().enumerate() {
        let mut params = parameters(&input.parameters);
        let data = match raw.get(i) {
            Some(bytes) => {
                if input.contents.is_some() {
                    return Err(invalid(format!(
                        "input `{}` has both contents and raw_input_contents",
                        input.name
                    )));
                }
                params.insert("binary_data_size".into(), json!(bytes.len()));
                None
            }
            None => Some(
                serde_json::value::to_raw_value(&contents_json(input)?)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
            ),
        };
        inputs.push(InputTensor {
            name: input.name.clone(),
            shape: input.shape.clone(),
            datatype: input.datatype.clone(),
            data,
            parameters: (!params.is_empty()).then_some(Value::Object(params)),
        });
    }
    let outputs = request
        .outputs
        .iter()
        .map(|o| RequestedOutput {
            name: o.name.clone(),
            parameters: (!o.parameters.is_empty())
                .then(|| Value::Object(parameters(&o.parameters))),
        })
        .collect::<Vec<_>>();
    let header = InferRequest {
        id: non_empty(&request.id).map(str::to_string),
        inputs,
        outputs: (!outputs.is_empty()).then_some(outputs),
        parameters: (!request.parameters.is_empty())
            .then(|| Value::Object(parameters(&request.parameters))),
    };
    let mut body = serde_json::to_vec(&header).map_err(|e| ApiError::internal(e.to_string()))?;
    let header_length = body.len();
    let size = header_length + raw.iter().map(Vec::len).sum::<usize>();
    if size > max_body {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request is larger than the limit of {max_body} bytes"),
        ));
    }
    if raw.is_empty() {
        return oip_binary::parse_infer(Bytes::from(body), None);
    }
    body.reserve_exact(size - header_length);
    for bytes in raw {
        body.extend_from_slice(bytes);
    }
    oip_binary::parse_infer(Bytes::from(body), Some(&header_length.to_string()))
}

/// The answer with every output in `raw_output_contents` (each datatype's little-endian form,
/// BYTES elements length-prefixed), as tritonclient reads it.
fn infer_response(response: InferResponse) -> Result<ModelInferResponse, ApiError> {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw = Vec::with_capacity(response.outputs.len());
    for output in response.outputs {
        let datatype = Datatype::parse(&output.datatype).ok_or_else(|| {
            ApiError::internal(format!(
                "output `{}` has the unknown datatype `{}`",
                output.name, output.datatype
            ))
        })?;
        let mut bytes = Vec::new();
        oip_binary::write_tensor(datatype, &output.data, &mut bytes).map_err(|why| {
            ApiError::internal(format!(
                "output `{}` ({}): {why}",
                output.name, output.datatype
            ))
        })?;
        raw.push(bytes);
        outputs.push(InferOutputTensor {
            name: output.name,
            datatype: output.datatype,
            shape: output.shape.iter().map(|&d| d as i64).collect(),
            parameters: Default::default(),
            contents: None,
        });
    }
    Ok(ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version.unwrap_or_default(),
        id: response.id.unwrap_or_default(),
        parameters: Default::default(),
        outputs,
        raw_output_contents: raw,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn timeout(text: &str) -> Result<Option<Duration>, ApiError> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", text.parse().unwrap());
        grpc_timeout(&metadata)
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_bad_ones_refused() {
        assert_eq!(timeout("2S").unwrap(), Some(Duration::from_secs(2)));
        assert_eq!(timeout("1500m").unwrap(), Some(Duration::from_millis(1500)));
        assert_eq!(timeout("3M").unwrap(), Some(Duration::from_secs(180)));
        assert_eq!(timeout("1H").unwrap(), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("250u").unwrap(), Some(Duration::from_micros(250)));
        assert_eq!(
            timeout("99999999n").unwrap(),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "S", "10", "10x", "123456789S", "-1S", "1.5S"] {
            assert_eq!(timeout(bad).unwrap_err().code, "invalid_timeout", "{bad:?}");
        }
        assert_eq!(grpc_timeout(&MetadataMap::new()).unwrap(), None);
    }

    #[test]
    fn api_errors_map_to_grpc_codes_with_retry_info_where_rest_says_retry_after() {
        let full = status_of(ApiError::queue_full("m"));
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(
            full.message(),
            "queue_full: the queue of `m` is full; retry later"
        );
        assert_eq!(
            full.metadata().get("ember-error-code").unwrap(),
            "queue_full"
        );
        let retry = full.get_details_retry_info().expect("a RetryInfo detail");
        assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));
        let cases = [
            (StatusCode::BAD_REQUEST, Code::InvalidArgument),
            (StatusCode::UNAUTHORIZED, Code::Unauthenticated),
            (StatusCode::FORBIDDEN, Code::PermissionDenied),
            (StatusCode::NOT_FOUND, Code::NotFound),
            (StatusCode::PAYLOAD_TOO_LARGE, Code::ResourceExhausted),
            (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            (StatusCode::GATEWAY_TIMEOUT, Code::DeadlineExceeded),
            (StatusCode::INTERNAL_SERVER_ERROR, Code::Internal),
        ];
        for (http, grpc) in cases {
            let status = status_of(ApiError::new(http, "some_code", "text"));
            assert_eq!(status.code(), grpc, "{http}");
            assert!(status.get_details_retry_info().is_none(), "{http}");
        }
        let internal = status_of(ApiError::internal("secret detail"));
        assert!(
            internal.message().contains("error id"),
            "{}",
            internal.message()
        );
        assert!(
            !internal.message().contains("secret"),
            "{}",
            internal.message()
        );
    }

    fn tensor(name: &str, datatype: &str, shape: Vec<i64>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents: None,
        }
    }

    #[test]
    fn raw_inputs_become_the_binary_form_and_typed_contents_json_data() {
        let raw = ModelInferRequest {
            model_name: "m".into(),
            id: "r1".into(),
            inputs: vec![
                tensor("a", "FP32", vec![1, 2]),
                tensor("b", "UINT8", vec![3]),
            ],
            raw_input_contents: vec![
                [1.5f32.to_le_bytes(), 2.5f32.to_le_bytes()].concat(),
                vec![7, 8, 9],
            ],
            ..Default::default()
        };
        let body = infer_body(&raw, 1 << 20).unwrap();
        let length = body.header_length.unwrap() as usize;
        assert_eq!(
            body.content_type,
            oip_binary::check_binary(&body.body, length)
                .map(|_| body.content_type)
                .unwrap()
        );
        assert_eq!(
            &body.body[length..],
            &[0, 0, 0xc0, 0x3f, 0, 0, 0x20, 0x40, 7, 8, 9]
        );
        assert_eq!(body.request.id.as_deref(), Some("r1"));
        assert_eq!(
            body.request.inputs[1].parameters,
            Some(json!({"binary_data_size": 3}))
        );

        let mut typed = tensor("a", "INT32", vec![2]);
        typed.contents = Some(InferTensorContents {
            int_contents: vec![4, -5],
            ..Default::default()
        });
        let request = ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![typed],
            ..Default::default()
        };
        let body = infer_body(&request, 1 << 20).unwrap();
        assert_eq!(body.header_length, None);
        assert_eq!(
            body.request.inputs[0].data.as_ref().unwrap().get(),
            "[4,-5]"
        );
    }

    #[test]
    fn bad_requests_are_refused_saying_why() {
        let request = ModelInferRequest {
            inputs: vec![tensor("a", "FP32", vec![1]), tensor("b", "FP32", vec![1])],
            raw_input_contents: vec![vec![0; 4]],
            ..Default::default()
        };
        let error = infer_body(&request, 1 << 20).unwrap_err();
        assert!(
            error
                .message
                .contains("raw_input_contents has 1 entries for 2 inputs"),
            "{}",
            error.message
        );

        let request = ModelInferRequest {
            inputs: vec![tensor("a", "FP32", vec![2])],
            raw_input_contents: vec![vec![0; 4]],
            ..Default::default()
        };
        assert_eq!(
            infer_body(&request, 1 << 20).unwrap_err().code,
            "invalid_request"
        );

        let request = ModelInferRequest {
            inputs: vec![tensor("a", "UINT8", vec![100])],
            raw_input_contents: vec![vec![0; 100]],
            ..Default::default()
        };
        let error = infer_body(&request, 64).unwrap_err();
        assert_eq!(
            (error.status, error.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
        );

        let request = ModelInferRequest {
            inputs: vec![tensor("a", "FP16", vec![1])],
            ..Default::default()
        };
        assert!(
            infer_body(&request, 1 << 20)
                .unwrap_err()
                .message
                .contains("FP16")
        );
    }

    #[test]
    fn outputs_go_back_raw_in_their_datatype() {
        use ember_core::protocol::oip::{OutputTensor, TensorData};
        let response = infer_response(InferResponse {
            model_name: "m".into(),
            model_version: Some("2".into()),
            id: None,
            outputs: vec![
                OutputTensor {
                    name: "p".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 2],
                    data: TensorData::F64(vec![0.25, 0.75]),
                },
                OutputTensor {
                    name: "label".into(),
                    datatype: "INT64".into(),
                    shape: vec![1],
                    data: TensorData::I64(vec![3]),
                },
            ],
        })
        .unwrap();
        assert_eq!(response.model_version, "2");
        assert_eq!(response.outputs[0].shape, vec![1, 2]);
        assert_eq!(
            response.raw_output_contents[0],
            [0.25f32.to_le_bytes(), 0.75f32.to_le_bytes()].concat()
        );
        assert_eq!(response.raw_output_contents[1], 3i64.to_le_bytes().to_vec());
    }
}
