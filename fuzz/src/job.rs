//! Target `job`: a job as the worker receives it from the broker, headers and body, through
//! `ember_worker::service::decode_job`. The input is one flag byte (bit 0: the delivery's
//! `redelivered`), then the AMQP basic properties exactly as they travel in a content header
//! frame (property flags, then the fields, headers as a field table), parsed with the parser
//! lapin uses on the wire; what follows the properties is the body.

use ember_worker::Error;
use ember_worker::process::Prepared;
use ember_worker::service::{Envelope, decode_job};
use lapin::BasicProperties;
use lapin::protocol::basic::{gen_properties, parse_properties};

use crate::image::{LIMITS, dims, pipeline};

/// Decodes one input; `None` when the properties do not parse (lapin drops such a frame).
pub fn run(data: &[u8]) -> Option<(Envelope, Result<Prepared, Error>)> {
    let (&flags, rest) = data.split_first()?;
    let (body, properties) = parse_properties(rest).ok()?;
    let (envelope, prepared) = decode_job(&properties, flags & 1 == 1, body, pipeline(0));
    assert!(envelope.attempt >= 1);
    assert!(!envelope.job_id.is_empty() || properties.message_id().is_some());
    if let Ok(prepared) = &prepared {
        let (w, h) = dims(prepared);
        assert!(u64::from(w) * u64::from(h) <= LIMITS.max_pixels);
    }
    Some((envelope, prepared))
}

/// Encodes a job the way [`run`] reads it (seeds and tests).
pub fn encode(properties: &BasicProperties, redelivered: bool, body: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(redelivered)];
    match gen_properties::<Vec<u8>>(properties)(Vec::new().into()) {
        Ok(context) => out.extend_from_slice(&context.write),
        Err(error) => panic!("properties do not encode: {error}"),
    }
    out.extend_from_slice(body);
    out
}
