//! Open Inference Protocol v2 tensor jobs: the JSON form (`application/json`) and the binary
//! tensor extension (`application/vnd.ember.oip-binary`, a JSON header of
//! `inference-header-content-length` bytes, then the raw tensors) -> named tensors, and the
//! outputs the request names.

use ember_core::protocol::oip::InferRequest;

use crate::Error;
use crate::tensor::{self, DataType, Tensor};

/// A decoded tensor request.
#[derive(Debug)]
pub struct TensorRequest {
    pub inputs: Vec<(String, Tensor)>,
    /// The outputs asked for (`None`: all).
    pub outputs: Option<Vec<String>>,
}

/// Decodes a request; `header_length` is given for the binary extension. A tensor of more than
/// `max_elements` elements is `input_too_large`.
pub fn decode(
    body: &[u8],
    header_length: Option<usize>,
    max_elements: usize,
) -> Result<TensorRequest, Error> {
    let (head, mut tail) = match header_length {
        Some(length) if length <= body.len() => body.split_at(length),
        Some(length) => {
            return Err(Error::InvalidInput(format!(
                "inference-header-content-length {length} exceeds the body ({} bytes)",
                body.len()
            )));
        }
        None => (body, &[][..]),
    };
    let request: InferRequest = serde_json::from_slice(head)
        .map_err(|e| Error::InvalidInput(format!("not an inference request: {e}")))?;
    if request.inputs.is_empty() {
        return Err(Error::InvalidInput("the request has no inputs".into()));
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        let dtype = DataType::from_oip(&input.datatype).ok_or_else(|| {
            Error::InvalidInput(format!(
                "input `{}`: unknown datatype `{}`",
                input.name, input.datatype
            ))
        })?;
        let count = tensor::element_count(&input.shape)?;
        if count > max_elements {
            return Err(Error::InputTooLarge(format!(
                "input `{}` of shape {:?} has {count} elements; the limit is {max_elements}",
                input.name, input.shape
            )));
        }
        let binary = input
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .map(|size| {
                size.as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| Error::InvalidInput("binary_data_size is not a size".into()))
            })
            .transpose()?;
        let data = match binary {
            Some(size) => {
                if header_length.is_none() || size > tail.len() {
                    return Err(Error::InvalidInput(format!(
                        "input `{}` claims {size} binary bytes; {} follow the header",
                        input.name,
                        tail.len()
                    )));
                }
                let (bytes, rest) = tail.split_at(size);
                tail = rest;
                tensor::from_binary(dtype, bytes, count)
            }
            None => match &input.data {
                Some(data) => tensor::from_json(dtype, data, count),
                None => Err(Error::InvalidInput(
                    "neither data nor binary_data_size".into(),
                )),
            },
        }
        .map_err(|e| Error::InvalidInput(format!("input `{}`: {e}", input.name)))?;
        if inputs.iter().any(|(name, _)| *name == input.name) {
            return Err(Error::InvalidInput(format!(
                "input `{}` is given twice",
                input.name
            )));
        }
        inputs.push((input.name.clone(), Tensor::new(input.shape.clone(), data)?));
    }
    if !tail.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{} bytes after the last binary input",
            tail.len()
        )));
    }
    let outputs = request
        .outputs
        .map(|outputs| outputs.into_iter().map(|o| o.name).collect());
    Ok(TensorRequest { inputs, outputs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;
    use ember_core::protocol::ErrorCode;
    use serde_json::json;

    #[test]
    fn json_and_binary_requests_give_the_same_tensors() {
        let json_body = serde_json::to_vec(&json!({
            "inputs": [
                {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [[0.5, -1.0]]},
                {"name": "k", "shape": [1], "datatype": "INT64", "data": [7]}
            ],
            "outputs": [{"name": "y"}]
        }))
        .expect("json");
        let from_json = decode(&json_body, None, 100).expect("decodes");
        let head = serde_json::to_vec(&json!({
            "inputs": [
                {"name": "x", "shape": [1, 2], "datatype": "FP32",
                 "parameters": {"binary_data_size": 8}},
                {"name": "k", "shape": [1], "datatype": "INT64", "data": [7]}
            ],
            "outputs": [{"name": "y"}]
        }))
        .expect("json");
        let mut body = head.clone();
        body.extend(0.5f32.to_le_bytes());
        body.extend((-1.0f32).to_le_bytes());
        let from_binary = decode(&body, Some(head.len()), 100).expect("decodes");
        assert_eq!(from_json.inputs, from_binary.inputs);
        assert_eq!(from_json.inputs[0].1.data, Data::F32(vec![0.5, -1.0]));
        assert_eq!(from_binary.outputs, Some(vec!["y".to_string()]));
        // Cut short, trailing bytes, a length past the body: all invalid input.
        for (bytes, length) in [
            (&body[..body.len() - 1], head.len()),
            (&[body.as_slice(), &[0]].concat()[..], head.len()),
            (&body[..], body.len() + 1),
        ] {
            let error = decode(bytes, Some(length), 100).expect_err("refused");
            assert_eq!(error.code(), ErrorCode::InvalidInput, "{error}");
        }
    }

    #[test]
    fn bad_requests_are_invalid_input() {
        for request in [
            json!({"inputs": []}),
            json!({"inputs": [{"name": "x", "shape": [2], "datatype": "FP99", "data": [1, 2]}]}),
            json!({"inputs": [{"name": "x", "shape": [-2], "datatype": "FP32", "data": []}]}),
            json!({"inputs": [{"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 256]}]}),
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                              {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}),
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                               "parameters": {"binary_data_size": 4}}]}),
        ] {
            let body = serde_json::to_vec(&request).expect("json");
            let error = decode(&body, None, 100).expect_err("refused");
            assert_eq!(error.code(), ErrorCode::InvalidInput, "{request}: {error}");
        }
        assert_eq!(
            decode(b"{", None, 100).expect_err("refused").code(),
            ErrorCode::InvalidInput
        );
        let big = br#"{"inputs":[{"name":"x","shape":[1,100000,100000,3],"datatype":"UINT8","data":[1]}]}"#;
        assert_eq!(
            decode(big, None, 100).expect_err("refused").code(),
            ErrorCode::InputTooLarge
        );
    }
}
