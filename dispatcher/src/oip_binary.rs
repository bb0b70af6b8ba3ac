//! The Open Inference Protocol's binary tensor extension: a JSON header of
//! `Inference-Header-Content-Length` bytes, then the tensors' raw bytes in order. Inputs arrive
//! this way from `tritonclient` by default; they are turned into JSON tensors for the worker.
//! Outputs are sent this way when the request asks for binary data.

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ember_core::protocol::oip::{InferRequest, InferResponse};
use serde_json::{Value, json};

use crate::error::ApiError;

/// The header giving the JSON part's length.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

fn binary_size(parameters: &Option<Value>) -> Option<usize> {
    parameters
        .as_ref()?
        .get("binary_data_size")?
        .as_u64()
        .map(|n| n as usize)
}

/// A binary request (the header is present) as a JSON-tensor request; `None` for plain JSON.
pub fn decode_request(
    body: &[u8],
    header_length: Option<&str>,
) -> Result<Option<InferRequest>, ApiError> {
    let Some(length) = header_length else {
        return Ok(None);
    };
    let bad = |why: String| ApiError::bad_request("invalid_request", why);
    let length: usize = length
        .trim()
        .parse()
        .map_err(|_| bad(format!("{HEADER_LENGTH} `{length}` is not a length")))?;
    if length > body.len() {
        return Err(bad(format!(
            "{HEADER_LENGTH} {length} exceeds the body ({} bytes)",
            body.len()
        )));
    }
    let (head, mut tail) = body.split_at(length);
    let mut request: InferRequest =
        serde_json::from_slice(head).map_err(|e| bad(format!("not an inference request: {e}")))?;
    for input in &mut request.inputs {
        let Some(size) = binary_size(&input.parameters) else {
            continue;
        };
        if input.datatype != "UINT8" {
            return Err(ApiError::bad_request(
                "unsupported_datatype",
                format!(
                    "binary input `{}` is {}; only UINT8 is taken",
                    input.name, input.datatype
                ),
            ));
        }
        if size > tail.len() {
            return Err(bad(format!(
                "input `{}` claims {size} bytes; {} remain",
                input.name,
                tail.len()
            )));
        }
        let (bytes, rest) = tail.split_at(size);
        input.data = Value::Array(bytes.iter().map(|&b| Value::from(b)).collect());
        input.parameters = None;
        tail = rest;
    }
    if !tail.is_empty() {
        return Err(bad(format!(
            "{} bytes after the last binary input",
            tail.len()
        )));
    }
    Ok(Some(request))
}

/// An `/v2/models/{model}/infer` body as the request and the JSON job body to publish: a binary
/// request (the header length is given) is re-encoded as JSON tensors, a JSON one is passed on as
/// it came.
pub fn parse_infer(
    body: Bytes,
    header_length: Option<&str>,
) -> Result<(InferRequest, Bytes), ApiError> {
    match decode_request(&body, header_length)? {
        Some(request) => {
            let body =
                serde_json::to_vec(&request).map_err(|e| ApiError::internal(e.to_string()))?;
            Ok((request, Bytes::from(body)))
        }
        None => {
            let request: InferRequest = serde_json::from_slice(&body).map_err(|e| {
                ApiError::bad_request("invalid_request", format!("not an inference request: {e}"))
            })?;
            Ok((request, body))
        }
    }
}

/// Whether the response should carry binary outputs: any requested output asks for it, or the
/// request's `binary_data_output` parameter does.
pub fn wants_binary_output(request: &InferRequest) -> bool {
    let flag = |p: &Option<Value>, key: &str| {
        p.as_ref()
            .and_then(|p| p.get(key))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    };
    flag(&request.parameters, "binary_data_output")
        || request
            .outputs
            .iter()
            .flatten()
            .any(|o| flag(&o.parameters, "binary_data"))
}

/// The response with every output's data as little-endian FP32 bytes after the JSON header.
pub fn encode_response(response: &InferResponse, _request: &InferRequest) -> Response {
    let mut tail = Vec::new();
    let outputs: Vec<Value> = response
        .outputs
        .iter()
        .map(|output| {
            let start = tail.len();
            for value in &output.data {
                tail.extend_from_slice(&value.to_le_bytes());
            }
            json!({
                "name": output.name,
                "datatype": output.datatype,
                "shape": output.shape,
                "parameters": {"binary_data_size": tail.len() - start},
            })
        })
        .collect();
    let head = json!({
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": outputs,
    });
    let mut body = serde_json::to_vec(&head).unwrap_or_default();
    let length = body.len();
    body.extend_from_slice(&tail);
    let mut http = (StatusCode::OK, Body::from(body)).into_response();
    let headers = http.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(HEADER_LENGTH, HeaderValue::from(length));
    http
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binary_request_becomes_json_tensors() {
        let head = serde_json::to_vec(&json!({
            "inputs": [{"name": "x", "shape": [1, 1, 1, 3], "datatype": "UINT8",
                        "parameters": {"binary_data_size": 3}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}]
        }))
        .expect("json");
        let mut body = head.clone();
        body.extend_from_slice(&[7, 8, 9]);
        let request = decode_request(&body, Some(&head.len().to_string()))
            .expect("decodes")
            .expect("binary");
        assert_eq!(request.inputs[0].data, json!([7, 8, 9]));
        assert!(wants_binary_output(&request));
        assert!(decode_request(&body, None).expect("plain").is_none());
        let short = decode_request(&body[..body.len() - 1], Some(&head.len().to_string()));
        assert_eq!(short.expect_err("short").code, "invalid_request");
    }
}
