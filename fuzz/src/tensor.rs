//! Target `tensor`: an Open Inference Protocol v2 tensor request through the worker's decoder
//! (`ember_worker::process::oip::decode`), JSON or the binary extension, every datatype. An
//! input starting with `#` carries the JSON header's length up to the first newline (a binary
//! request); the rest is the body.

use ember_worker::Error;
use ember_worker::process::oip::{TensorRequest, decode};
use ember_worker::tensor::element_count;

/// Elements per tensor at most (the worker's is 3 x --max-pixels).
pub const MAX_ELEMENTS: usize = 1 << 20;

/// Decodes one input and checks what any accepted request must satisfy.
pub fn run(data: &[u8]) -> Result<TensorRequest, Error> {
    let (header, body) = crate::oip::split(data);
    let length = match header.map(|h| h.trim().parse::<usize>()) {
        Some(Ok(length)) => Some(length),
        Some(Err(_)) => return Err(Error::InvalidInput("not a length".into())),
        None => None,
    };
    let request = decode(body, length, MAX_ELEMENTS)?;
    assert!(!request.inputs.is_empty());
    for (name, tensor) in &request.inputs {
        let count = element_count(&tensor.shape).expect("an accepted shape");
        assert_eq!(count, tensor.data.len(), "input `{name}`");
        assert!(
            count <= MAX_ELEMENTS,
            "input `{name}` passed the element limit"
        );
    }
    Ok(request)
}
