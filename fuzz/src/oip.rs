//! Target `oip`: a `POST /v2/models/{model}/infer` body through the dispatcher's parser
//! (`ember_dispatcher::oip_binary::parse_infer`: JSON, or the binary tensor extension), and the
//! job body it publishes on through the worker's tensor preprocessing, as the request would
//! travel. An input starting with `#` carries the `Inference-Header-Content-Length` header value
//! up to the first newline; the rest is the HTTP body.

use ember_core::protocol::oip::InferRequest;
use ember_dispatcher::error::ApiError;
use ember_dispatcher::oip_binary::{parse_infer, wants_binary_output};
use ember_worker::Error;
use ember_worker::preprocess::Prepared;

use crate::image::check;

/// What one input came to.
#[derive(Debug)]
pub struct Outcome {
    pub request: InferRequest,
    /// The worker's answer to the job body the dispatcher would publish.
    pub prepared: Result<Prepared, Error>,
}

/// Splits an input into the header value and the body.
pub fn split(data: &[u8]) -> (Option<&str>, &[u8]) {
    if let Some(rest) = data.strip_prefix(b"#")
        && let Some(end) = rest.iter().take(40).position(|&b| b == b'\n')
    {
        return (std::str::from_utf8(&rest[..end]).ok(), &rest[end + 1..]);
    }
    (None, data)
}

pub fn run(data: &[u8]) -> Result<Outcome, ApiError> {
    let (header_length, body) = split(data);
    let (request, job_body) = parse_infer(body.to_vec().into(), header_length)?;
    // What is published must be what was parsed: the worker reads the same request.
    let again: InferRequest = match serde_json::from_slice(&job_body) {
        Ok(again) => again,
        Err(error) => panic!("the published job body does not parse: {error}"),
    };
    assert_eq!(
        again, request,
        "the job body differs from the parsed request"
    );
    let _ = wants_binary_output(&request);
    let prepared = check(Some("application/json"), None, &job_body, 0);
    Ok(Outcome { request, prepared })
}
