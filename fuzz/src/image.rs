//! Target `image`: a job body through the worker's decode and preprocessing
//! (`ember_worker::preprocess::prepare`): content type, size limits, PNG/JPEG decode, OIP JSON
//! tensors, resize. The first input byte picks the content type; the rest is the body.

use ember_worker::Error;
use ember_worker::preprocess::{InputLimits, Prepared, Target, prepare};

/// Limits as a worker would have them, smaller so that the fuzzer stays fast.
pub const LIMITS: InputLimits = InputLimits {
    max_bytes: 1 << 20,
    max_pixels: 1 << 20,
};

/// The model input size the harness resizes to.
pub const SIZE: u32 = 32;

/// Content types the first byte chooses from (index = byte % len).
pub const CONTENT_TYPES: [Option<&str>; 7] = [
    None,
    Some("image/png"),
    Some("image/jpeg"),
    Some("application/json"),
    Some("application/octet-stream"),
    Some("Image/JPG; q=1"),
    Some("text/plain"),
];

pub fn target() -> Target {
    Target {
        tensor: "image_tensor:0".into(),
        width: SIZE,
        height: SIZE,
    }
}

/// Prepares one body and checks what any result must satisfy.
pub fn check(content_type: Option<&str>, body: &[u8]) -> Result<Prepared, Error> {
    let result = prepare(content_type, body, LIMITS, &target());
    if let Ok(prepared) = &result {
        assert_eq!(prepared.pixels.len(), (SIZE * SIZE * 3) as usize);
        let (w, h) = (prepared.original_width, prepared.original_height);
        assert!(w > 0 && h > 0, "a {w}x{h} image was accepted");
        assert!(
            u64::from(w) * u64::from(h) <= LIMITS.max_pixels,
            "a {w}x{h} image passed the pixel limit"
        );
        assert!(body.len() <= LIMITS.max_bytes);
    }
    result
}

/// One fuzz input: content-type selector byte, then the body.
pub fn run(data: &[u8]) -> Option<Result<Prepared, Error>> {
    let (&selector, body) = data.split_first()?;
    let content_type = CONTENT_TYPES[usize::from(selector) % CONTENT_TYPES.len()];
    Some(check(content_type, body))
}
