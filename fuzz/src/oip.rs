//! Target `oip`: a `POST /v2/models/{model}/infer` body through the dispatcher's parser
//! (`ember_dispatcher::oip_binary::parse_infer`: JSON, or the binary tensor extension, checked and
//! passed on as it came), and the job it publishes through the worker's decoding, as the request
//! would travel. An input starting with `#` carries the `Inference-Header-Content-Length` header
//! value up to the first newline; the rest is the HTTP body.

use ember_core::protocol::content_type;
use ember_core::protocol::oip::InferRequest;
use ember_dispatcher::error::ApiError;
use ember_dispatcher::oip_binary::{InferBody, parse_infer, wants_binary_output};
use ember_worker::Error;
use ember_worker::process::Prepared;

use crate::image::check;

/// Splits an input into the header value and the body.
pub fn split(data: &[u8]) -> (Option<&str>, &[u8]) {
    if let Some(rest) = data.strip_prefix(b"#")
        && let Some(end) = rest.iter().take(40).position(|&b| b == b'\n')
    {
        return (std::str::from_utf8(&rest[..end]).ok(), &rest[end + 1..]);
    }
    (None, data)
}

/// One input through `parse_infer`, with what must hold for any accepted one: the job body is
/// the HTTP body unchanged; a JSON job's body parses back to the request, a binary job's header
/// (its first `header_length` bytes) does.
pub fn dispatch(data: &[u8]) -> Result<InferBody, ApiError> {
    let (header_length, body) = split(data);
    let parsed = parse_infer(body.to_vec().into(), header_length)?;
    assert_eq!(parsed.body, body, "the job body is not the HTTP body");
    let head = match parsed.header_length {
        Some(length) => {
            assert_eq!(parsed.content_type, content_type::OIP_BINARY);
            &parsed.body[..usize::try_from(length).expect("a length")]
        }
        None => {
            assert_eq!(parsed.content_type, content_type::JSON);
            &parsed.body[..]
        }
    };
    let again: InferRequest = match serde_json::from_slice(head) {
        Ok(again) => again,
        Err(error) => panic!("the published job's header does not parse: {error}"),
    };
    // Compared as JSON: a tensor's `data` is kept as its text, which has no equality of its own.
    assert_eq!(
        serde_json::to_string(&again).ok(),
        serde_json::to_string(&parsed.request).ok()
    );
    let _ = wants_binary_output(&parsed.request);
    Ok(parsed)
}

/// The job through the worker's decoding, as it would arrive (the harness model's input is the
/// SSD's, `image_tensor:0` UINT8 `[-1, -1, -1, 3]`).
pub fn worker(parsed: &InferBody) -> Result<Prepared, Error> {
    let length = parsed.header_length.map(|n| n.to_string());
    check(
        Some(parsed.content_type),
        length.as_deref(),
        &parsed.body,
        0,
    )
}

/// What one input came to: the dispatcher's verdict, and the worker's for what it published.
pub fn run(data: &[u8]) -> Result<Result<Prepared, Error>, ApiError> {
    let parsed = dispatch(data)?;
    Ok(worker(&parsed))
}
