//! The wire contract: what a job and a result look like on AMQP (see `docs/protocol.md`).

use serde::{Deserialize, Serialize};

/// Header names carried on job and result messages.
pub mod header {
    /// Job: when the client submitted it, unix milliseconds.
    pub const SUBMITTED_AT: &str = "ember-submitted-at";
    /// Job: after this instant (unix milliseconds) no model time is spent on it.
    pub const DEADLINE: &str = "ember-deadline";
    /// Job: POST the result to this URL (handled by the dispatcher's callback sender).
    pub const CALLBACK_URL: &str = "ember-callback-url";
    /// Job and result: W3C trace context, passed through unchanged.
    pub const TRACEPARENT: &str = "traceparent";
    /// Result: `ok` or `error`.
    pub const STATUS: &str = "ember-status";
    /// Result: the model that produced it.
    pub const MODEL: &str = "ember-model";
    /// Set by RabbitMQ quorum queues on redelivery: how many times the job was delivered before.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
    /// Deliveries a job had in its model's queue before it moved to the retry lane.
    pub const PRIOR_DELIVERIES: &str = "ember-prior-deliveries";
    /// Job with content type [`super::content_type::OIP_BINARY`]: the length of the JSON
    /// inference header that starts the body (the binary tensors follow it). The same name and
    /// meaning as the HTTP header of the Open Inference Protocol's binary tensor extension.
    pub const INFERENCE_HEADER_LENGTH: &str = "inference-header-content-length";
    /// Job: only this version of the model may answer it (a rollout runs two side by side).
    /// Published with routing key `<model>@<version>` it goes straight to that version's queue;
    /// in the model's shared queue a worker of another version forwards it there, and answers
    /// `model_version_not_found` when no such queue is bound (the version is not served and
    /// not coming).
    pub const MODEL_VERSION: &str = "ember-model-version";
    /// Job: keep a durable copy of the result for `GET /v1/jobs/{id}` (the worker publishes it to
    /// `ember.results.stored`, which `ember.results.store` is bound to, instead of
    /// `ember.results`). `true` (a boolean, or the text `true` / `1`). The dispatcher sets it on
    /// every job it submits; a job with a callback URL is stored without it.
    pub const STORE_RESULT: &str = "ember-store-result";
}

/// Content types a job body may have.
pub mod content_type {
    pub const JPEG: &str = "image/jpeg";
    pub const PNG: &str = "image/png";
    /// An Open Inference Protocol v2 inference request in JSON (tensor job).
    pub const JSON: &str = "application/json";
    /// An Open Inference Protocol v2 request in the binary tensor extension: a JSON header of
    /// `inference-header-content-length` bytes (a message header), then each input whose
    /// `parameters.binary_data_size` is set, raw little-endian, in order.
    pub const OIP_BINARY: &str = "application/vnd.ember.oip-binary";
}

/// Whether a job succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
        }
    }
}

/// Stable, snake_case error codes. Clients may match on them; new ones may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is empty or otherwise not a usable input.
    InvalidInput,
    /// The body is not a decodable image (garbage, truncated, zero-sized).
    InvalidImage,
    /// The content type is not one the model accepts.
    UnsupportedContentType,
    /// The body or the decoded image exceeds the worker's limits.
    InputTooLarge,
    /// The job's `ember-deadline` passed before it could run.
    DeadlineExceeded,
    /// The model failed on this input.
    ModelError,
    /// The job was cancelled before it ran.
    Cancelled,
    /// Anything else on the worker side.
    Internal,
    /// Every worker that took the job failed or died with it, `x-delivery-limit` times: it was
    /// dead-lettered (kept in `ember.dead.<model>`) and this error is its answer.
    DeadLettered,
    /// The job pinned a model version (`ember-model-version`) that no worker serves and none
    /// is coming: no queue of that version is bound, or the version was retired.
    ModelVersionNotFound,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::InvalidImage => "invalid_image",
            ErrorCode::UnsupportedContentType => "unsupported_content_type",
            ErrorCode::InputTooLarge => "input_too_large",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::ModelError => "model_error",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
            ErrorCode::DeadLettered => "dead_lettered",
            ErrorCode::ModelVersionNotFound => "model_version_not_found",
        }
    }
}

/// The `error` member of a failed result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// One detected object; `box` is `[x1, y1, x2, y2]` in the input image's pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub label: String,
    pub class_id: u32,
    pub score: f32,
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
}

/// One class of a classification: `score` after the model's (or the declared) softmax.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Class {
    pub label: String,
    pub class_id: u32,
    pub score: f32,
}

/// What the model produced for one job: what its output processor made of the outputs
/// (detections of a one-image job, the top classes of each row), and the raw output tensors
/// for a tensor (Open Inference Protocol) job or a model without a processor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outputs {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detections: Option<Vec<Detection>>,
    /// Per row of the job's input (an image job has one): the top-k classes, best first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<Vec<Vec<Class>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<oip::OutputTensor>>,
}

/// The Open Inference Protocol v2 (KServe/Triton) REST shapes, JSON tensors. A job with
/// `content_type: application/json` carries an [`oip::InferRequest`].
pub mod oip {
    use serde::{Deserialize, Serialize};

    /// `POST /v2/models/{model}/infer` body, and a tensor job's body.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct InferRequest {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub id: Option<String>,
        pub inputs: Vec<InputTensor>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub outputs: Option<Vec<RequestedOutput>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub parameters: Option<serde_json::Value>,
    }

    /// An input tensor; `data` is row-major, flat or nested.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct InputTensor {
        pub name: String,
        pub shape: Vec<i64>,
        pub datatype: String,
        /// Absent (or `null`) when the tensor travels in binary (then
        /// `parameters.binary_data_size`). Kept as its JSON text: checked for syntax only here,
        /// and read once, straight into a typed buffer, by whoever needs the values (the worker),
        /// rather than into one `serde_json::Value` per element.
        #[serde(default)]
        pub data: Option<Box<serde_json::value::RawValue>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub parameters: Option<serde_json::Value>,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct RequestedOutput {
        pub name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub parameters: Option<serde_json::Value>,
    }

    /// An output tensor; `data` is flat, row-major, typed by `datatype`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct OutputTensor {
        pub name: String,
        pub datatype: String,
        pub shape: Vec<usize>,
        pub data: TensorData,
    }

    /// Flat tensor contents. FP16 travels as `F32`; INT8..INT64 as `I64`; UINT8..UINT64 as
    /// `U64`; BYTES as `Str` (UTF-8). On the wire it is a plain JSON array; reading one back,
    /// whole numbers become `I64` (or `U64`), others `F64`: `datatype` says the type.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(untagged)]
    pub enum TensorData {
        Bool(Vec<bool>),
        I64(Vec<i64>),
        U64(Vec<u64>),
        F64(#[serde(deserialize_with = "floats_or_null")] Vec<f64>),
        F32(Vec<f32>),
        Str(Vec<String>),
    }

    /// JSON has no NaN or infinity: serde_json writes non-finite floats as `null`; they read
    /// back as NaN.
    fn floats_or_null<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<f64>, D::Error> {
        let values: Vec<Option<f64>> = Deserialize::deserialize(deserializer)?;
        Ok(values.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    }

    impl TensorData {
        /// The number of elements.
        pub fn len(&self) -> usize {
            match self {
                TensorData::Bool(v) => v.len(),
                TensorData::I64(v) => v.len(),
                TensorData::U64(v) => v.len(),
                TensorData::F32(v) => v.len(),
                TensorData::F64(v) => v.len(),
                TensorData::Str(v) => v.len(),
            }
        }

        pub fn is_empty(&self) -> bool {
            self.len() == 0
        }

        /// The elements as f64 (strings: NaN), for readers that do not care about the type.
        pub fn to_f64(&self) -> Vec<f64> {
            match self {
                TensorData::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
                TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
                TensorData::U64(v) => v.iter().map(|&x| x as f64).collect(),
                TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
                TensorData::F64(v) => v.clone(),
                TensorData::Str(v) => vec![f64::NAN; v.len()],
            }
        }
    }

    /// A graph input or output as the model metadata gives it (`-1`: a dynamic dimension).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct TensorMeta {
        pub name: String,
        pub datatype: String,
        pub shape: Vec<i64>,
    }

    /// `POST /v2/models/{model}/infer` response.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct InferResponse {
        pub model_name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub model_version: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub id: Option<String>,
        pub outputs: Vec<OutputTensor>,
    }
}

/// Where the time went for one job, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// From `ember-submitted-at` (or from arrival at the worker when absent) to the batch start.
    pub queue_ms: f64,
    /// How many jobs shared the `session.run` call.
    pub batch_size: u32,
    /// The batch's `session.run` time.
    pub inference_ms: f64,
    /// From arrival at the worker to the result being ready to publish.
    pub worker_ms: f64,
    /// From arrival at the worker to the batch start (inside `worker_ms`; includes
    /// `prepare_ms`). `queue_ms - wait_ms` is the time from submission to arrival (the broker).
    #[serde(default)]
    pub wait_ms: f64,
    /// This job's decoding and preprocessing (inside `wait_ms`).
    #[serde(default)]
    pub prepare_ms: f64,
}

/// The body of a result message (`content_type: application/json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub job_id: String,
    pub model: String,
    pub status: Status,
    pub outputs: Option<Outputs>,
    pub error: Option<ErrorBody>,
    pub timing: Timing,
    pub worker: String,
    /// 1 for the first delivery, 2 after one redelivery, ...
    pub attempt: u32,
    /// The model version that answered (absent from workers before this field, and from
    /// dead-letter answers of jobs no worker ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

/// A worker's state as it reports it in heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Starting,
    Ready,
    Draining,
}

/// GPU readings from NVML, present only where a driver is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuReading {
    pub index: u32,
    /// 0..=1 over the driver's last sample period.
    pub utilization: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// What a worker serves, read from the graph at load: published in its heartbeats so the
/// dispatcher's model metadata is the graph's, not a copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub version: String,
    /// The graph's inputs and outputs.
    pub inputs: Vec<oip::TensorMeta>,
    pub outputs: Vec<oip::TensorMeta>,
    /// Rows per `session.run` at most (1: the graph cannot batch).
    pub max_batch: u32,
    /// `tensor` or `image`: what a job's body may be besides raw tensors.
    pub input: String,
    /// The output processor: `tensor`, `ssd`, `classification` or `detection`.
    pub decoder: String,
}

/// Published every second to `ember.telemetry` with routing key `<model>.<worker-id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub worker: String,
    pub model: String,
    pub state: WorkerState,
    /// Jobs delivered to this worker and not yet acked.
    pub in_flight: u64,
    /// Jobs answered (ok or error) since start.
    pub completed: u64,
    /// Seconds spent inside `session.run` since start.
    pub busy_seconds: f64,
    pub model_load_seconds: f64,
    /// Unix milliseconds when the heartbeat was made.
    pub at_ms: u64,
    /// Where the model runs: `cpu` or `cuda:<N>` (absent from workers before this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The worker was asked for a GPU and runs on the CPU instead (`--allow-cpu-fallback`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub device_fallback: bool,
    pub gpu: Option<GpuReading>,
    /// The model as the graph declares it (absent from workers before this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_info: Option<ModelInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_serialises_to_the_documented_shape() {
        let result = JobResult {
            job_id: "j1".into(),
            model: "ssdlite-person".into(),
            status: Status::Ok,
            outputs: Some(Outputs {
                detections: Some(vec![Detection {
                    label: "person".into(),
                    class_id: 1,
                    score: 0.5,
                    bbox: [1.0, 2.0, 3.0, 4.0],
                }]),
                ..Outputs::default()
            }),
            error: None,
            timing: Timing::default(),
            worker: "w".into(),
            attempt: 1,
            model_version: Some("2".into()),
        };
        let value = serde_json::to_value(&result).expect("serialises");
        assert_eq!(value["status"], "ok");
        assert_eq!(value["outputs"]["detections"][0]["box"][2], 3.0);
        assert!(value["error"].is_null());
        assert!(value["outputs"].get("tensors").is_none());
        assert_eq!(value["model_version"], "2");
        let back: JobResult = serde_json::from_value(value).expect("round-trips");
        assert_eq!(back, result);
    }

    #[test]
    fn tensor_data_is_a_plain_array_and_reads_back_by_kind() {
        use oip::TensorData;
        let cases = [
            (TensorData::F32(vec![0.5, 1.0]), "[0.5,1.0]"),
            (TensorData::I64(vec![-3, 4]), "[-3,4]"),
            (TensorData::Bool(vec![true, false]), "[true,false]"),
            (TensorData::Str(vec!["a".into()]), "[\"a\"]"),
        ];
        for (data, json) in cases {
            assert_eq!(serde_json::to_string(&data).expect("serialises"), json);
        }
        let back: TensorData = serde_json::from_str("[0.5,1.0]").expect("reads");
        assert_eq!(back, TensorData::F64(vec![0.5, 1.0]));
        let back: TensorData = serde_json::from_str("[1,2]").expect("reads");
        assert_eq!(back, TensorData::I64(vec![1, 2]));
        // A model's infinities and NaNs are written as null, and read back as NaN.
        let written = serde_json::to_string(&TensorData::F32(vec![f32::NEG_INFINITY, 1.5]))
            .expect("serialises");
        assert_eq!(written, "[null,1.5]");
        let TensorData::F64(back) = serde_json::from_str(&written).expect("reads") else {
            panic!("floats")
        };
        assert!(back[0].is_nan() && back[1] == 1.5);
    }

    #[test]
    fn error_codes_serialise_as_their_stable_strings() {
        for code in [
            ErrorCode::InvalidInput,
            ErrorCode::InvalidImage,
            ErrorCode::UnsupportedContentType,
            ErrorCode::InputTooLarge,
            ErrorCode::DeadlineExceeded,
            ErrorCode::ModelError,
            ErrorCode::Cancelled,
            ErrorCode::Internal,
            ErrorCode::DeadLettered,
            ErrorCode::ModelVersionNotFound,
        ] {
            let json = serde_json::to_string(&code).expect("serialises");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
    }
}
