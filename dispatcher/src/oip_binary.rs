//! The Open Inference Protocol's binary tensor extension: a JSON header of
//! `Inference-Header-Content-Length` bytes, then the tensors' raw bytes in order. Inputs arrive
//! this way from `tritonclient` by default; only the JSON header is parsed and checked here, and
//! the body goes to the worker as it came (content type `application/vnd.ember.oip-binary`, the
//! header length in the job's `inference-header-content-length`). Outputs are sent this way when
//! the request asks for binary data, each in its datatype's little-endian form.

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ember_core::protocol::content_type;
use ember_core::protocol::oip::{InferRequest, InferResponse, InputTensor, TensorData};
use serde_json::{Value, json};

use crate::error::ApiError;

/// The HTTP header giving the JSON part's length (the same name travels on the job).
pub const HEADER_LENGTH: &str = ember_core::protocol::header::INFERENCE_HEADER_LENGTH;

/// The Open Inference Protocol's tensor datatypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
}

impl Datatype {
    pub const ALL: [Datatype; 13] = [
        Datatype::Bool,
        Datatype::Uint8,
        Datatype::Uint16,
        Datatype::Uint32,
        Datatype::Uint64,
        Datatype::Int8,
        Datatype::Int16,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Fp16,
        Datatype::Fp32,
        Datatype::Fp64,
        Datatype::Bytes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Datatype::Bool => "BOOL",
            Datatype::Uint8 => "UINT8",
            Datatype::Uint16 => "UINT16",
            Datatype::Uint32 => "UINT32",
            Datatype::Uint64 => "UINT64",
            Datatype::Int8 => "INT8",
            Datatype::Int16 => "INT16",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Fp16 => "FP16",
            Datatype::Fp32 => "FP32",
            Datatype::Fp64 => "FP64",
            Datatype::Bytes => "BYTES",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element; `None` for BYTES (each element is a 4-byte little-endian length, then
    /// that many bytes).
    pub fn width(self) -> Option<usize> {
        match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => Some(1),
            Datatype::Uint16 | Datatype::Int16 | Datatype::Fp16 => Some(2),
            Datatype::Uint32 | Datatype::Int32 | Datatype::Fp32 => Some(4),
            Datatype::Uint64 | Datatype::Int64 | Datatype::Fp64 => Some(8),
            Datatype::Bytes => None,
        }
    }
}

/// A `POST /v2/models/{model}/infer` body, checked, as it is published.
#[derive(Debug)]
pub struct InferBody {
    /// The request; in the binary form its JSON header (binary inputs carry no `data`).
    pub request: InferRequest,
    /// The job body: the HTTP body as it came.
    pub body: Bytes,
    /// [`content_type::JSON`] or [`content_type::OIP_BINARY`].
    pub content_type: &'static str,
    /// The binary form's JSON header length, for the job's `inference-header-content-length`.
    pub header_length: Option<u64>,
}

/// Parses an infer body: the binary form when `header_length` (the HTTP header) is given, else
/// JSON. Either way the body is passed on as it came; of the binary form only the JSON header is
/// parsed, and [`check_binary`] checks it against the tail.
pub fn parse_infer(body: Bytes, header_length: Option<&str>) -> Result<InferBody, ApiError> {
    let Some(length) = header_length else {
        let request: InferRequest = serde_json::from_slice(&body)
            .map_err(|e| invalid(format!("not an inference request: {e}")))?;
        return Ok(InferBody {
            request,
            body,
            content_type: content_type::JSON,
            header_length: None,
        });
    };
    let length: usize = length
        .trim()
        .parse()
        .map_err(|_| invalid(format!("{HEADER_LENGTH} `{length}` is not a length")))?;
    let request = check_binary(&body, length)?;
    Ok(InferBody {
        request,
        body,
        content_type: content_type::OIP_BINARY,
        header_length: Some(length as u64),
    })
}

fn invalid(why: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_request", why)
}

/// `parameters.binary_data_size` of an input: absent, or a byte count.
fn binary_size(input: &InputTensor) -> Result<Option<usize>, ApiError> {
    let Some(size) = input
        .parameters
        .as_ref()
        .and_then(|p| p.get("binary_data_size"))
    else {
        return Ok(None);
    };
    size.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| {
            invalid(format!(
                "input `{}`: binary_data_size {size} is not a byte count",
                input.name
            ))
        })
}

/// The binary form's JSON header, checked against the `body` it starts: every input named, with
/// a known datatype and a shape of non-negative dimensions, and either JSON `data` or a
/// `binary_data_size` that fits its shape and datatype; the binary inputs' sizes add up to the
/// bytes after the header exactly. The tensors' bytes are not read, except the element lengths
/// of a BYTES tensor (one 4-byte read per element).
pub fn check_binary(body: &[u8], length: usize) -> Result<InferRequest, ApiError> {
    if length > body.len() {
        return Err(invalid(format!(
            "{HEADER_LENGTH} {length} exceeds the body ({} bytes)",
            body.len()
        )));
    }
    let (head, mut tail) = body.split_at(length);
    let request: InferRequest = serde_json::from_slice(head)
        .map_err(|e| invalid(format!("not an inference request: {e}")))?;
    for input in &request.inputs {
        if input.name.is_empty() {
            return Err(invalid("an input has an empty name"));
        }
        let Some(datatype) = Datatype::parse(&input.datatype) else {
            return Err(ApiError::bad_request(
                "unsupported_datatype",
                format!(
                    "input `{}` is `{}`; the datatypes are BOOL, UINT8..UINT64, INT8..INT64, \
                     FP16, FP32, FP64 and BYTES",
                    input.name, input.datatype
                ),
            ));
        };
        let elements = elements(input)?;
        let Some(size) = binary_size(input)? else {
            if input.data.is_none() {
                return Err(invalid(format!(
                    "input `{}` has neither data nor binary_data_size",
                    input.name
                )));
            }
            continue;
        };
        if input.data.is_some() {
            return Err(invalid(format!(
                "input `{}` has both data and binary_data_size",
                input.name
            )));
        }
        if size > tail.len() {
            return Err(invalid(format!(
                "input `{}` claims {size} bytes; {} remain",
                input.name,
                tail.len()
            )));
        }
        let (bytes, rest) = tail.split_at(size);
        check_size(input, datatype, elements, bytes)?;
        tail = rest;
    }
    if !tail.is_empty() {
        return Err(invalid(format!(
            "{} bytes after the last binary input",
            tail.len()
        )));
    }
    Ok(request)
}

/// The element count of an input's shape.
fn elements(input: &InputTensor) -> Result<usize, ApiError> {
    input.shape.iter().try_fold(1usize, |count, &dim| {
        let dim = usize::try_from(dim).map_err(|_| {
            invalid(format!(
                "input `{}`: shape {:?} has a negative dimension",
                input.name, input.shape
            ))
        })?;
        count.checked_mul(dim).ok_or_else(|| {
            invalid(format!(
                "input `{}`: shape {:?} is too large",
                input.name, input.shape
            ))
        })
    })
}

/// Whether a binary input's bytes fit its shape: `elements * width`, or for BYTES `elements`
/// length-prefixed items that fill the bytes exactly.
fn check_size(
    input: &InputTensor,
    datatype: Datatype,
    elements: usize,
    bytes: &[u8],
) -> Result<(), ApiError> {
    let name = &input.name;
    let Some(width) = datatype.width() else {
        let mut rest = bytes;
        for index in 0..elements {
            let Some((prefix, after)) = rest.split_first_chunk::<4>() else {
                return Err(invalid(format!(
                    "BYTES input `{name}` ends at element {index} of {elements}"
                )));
            };
            let item = u32::from_le_bytes(*prefix) as usize;
            if item > after.len() {
                return Err(invalid(format!(
                    "BYTES input `{name}`: element {index} claims {item} bytes; {} remain",
                    after.len()
                )));
            }
            rest = &after[item..];
        }
        if !rest.is_empty() {
            return Err(invalid(format!(
                "BYTES input `{name}`: {} bytes after its {elements} elements",
                rest.len()
            )));
        }
        return Ok(());
    };
    match elements.checked_mul(width) {
        Some(expected) if expected == bytes.len() => Ok(()),
        _ => Err(invalid(format!(
            "input `{name}`: shape {:?} of {} is {elements} x {width} bytes; binary_data_size is {}",
            input.shape,
            datatype.name(),
            bytes.len()
        ))),
    }
}

/// Whether `flag` is `true` in a parameters object.
fn flag(parameters: &Option<Value>, key: &str) -> Option<bool> {
    parameters.as_ref()?.get(key)?.as_bool()
}

/// Whether the response should carry binary outputs: any requested output asks for it, or the
/// request's `binary_data_output` parameter does.
pub fn wants_binary_output(request: &InferRequest) -> bool {
    flag(&request.parameters, "binary_data_output").unwrap_or(false)
        || request
            .outputs
            .iter()
            .flatten()
            .any(|o| flag(&o.parameters, "binary_data").unwrap_or(false))
}

/// Whether output `name` goes in binary: its requested output's `binary_data`, else the
/// request's `binary_data_output` (as Triton decides).
fn binary_output(request: &InferRequest, name: &str) -> bool {
    let own = request
        .outputs
        .iter()
        .flatten()
        .find(|o| o.name == name)
        .and_then(|o| flag(&o.parameters, "binary_data"));
    own.or_else(|| flag(&request.parameters, "binary_data_output"))
        .unwrap_or(false)
}

/// The response in the binary form: a JSON header, then the data of each output asked for in
/// binary, in its datatype's little-endian form (the others keep JSON `data`). A value that does
/// not fit its datatype (a worker's fault) is a 500.
pub fn encode_response(
    response: &InferResponse,
    request: &InferRequest,
) -> Result<Response, ApiError> {
    let mut tail = Vec::new();
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for output in &response.outputs {
        if !binary_output(request, &output.name) {
            outputs.push(json!(output));
            continue;
        }
        let datatype = Datatype::parse(&output.datatype).ok_or_else(|| {
            ApiError::internal(format!(
                "output `{}` has the unknown datatype `{}`",
                output.name, output.datatype
            ))
        })?;
        let start = tail.len();
        write_tensor(datatype, &output.data, &mut tail).map_err(|why| {
            ApiError::internal(format!(
                "output `{}` ({}): {why}",
                output.name, output.datatype
            ))
        })?;
        outputs.push(json!({
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
            "parameters": {"binary_data_size": tail.len() - start},
        }));
    }
    let head = json!({
        "model_name": response.model_name,
        "model_version": response.model_version,
        "id": response.id,
        "outputs": outputs,
    });
    let mut body = serde_json::to_vec(&head).map_err(|e| ApiError::internal(e.to_string()))?;
    let length = body.len();
    body.extend_from_slice(&tail);
    let mut http = (StatusCode::OK, Body::from(body)).into_response();
    let headers = http.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(HEADER_LENGTH, HeaderValue::from(length));
    Ok(http)
}

/// Appends `data` in `datatype`'s binary form. The data may be of any kind that holds the
/// values exactly (a result read back from JSON has whole numbers as I64/U64, others as F64, and
/// an empty array as `Bool`): integers are narrowed with a check, floats rounded to the width.
pub fn write_tensor(
    datatype: Datatype,
    data: &TensorData,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    if data.is_empty() {
        return Ok(());
    }
    match datatype {
        Datatype::Bool => {
            let bools: Vec<bool> = match data {
                TensorData::Bool(v) => v.clone(),
                _ => integers::<u8>(data)?
                    .into_iter()
                    .map(|v| match v {
                        0 => Ok(false),
                        1 => Ok(true),
                        _ => Err(format!("{v} is not a BOOL")),
                    })
                    .collect::<Result<_, _>>()?,
            };
            out.extend(bools.into_iter().map(u8::from));
        }
        Datatype::Uint8 => put(out, integers::<u8>(data)?, u8::to_le_bytes),
        Datatype::Uint16 => put(out, integers::<u16>(data)?, u16::to_le_bytes),
        Datatype::Uint32 => put(out, integers::<u32>(data)?, u32::to_le_bytes),
        Datatype::Uint64 => put(out, integers::<u64>(data)?, u64::to_le_bytes),
        Datatype::Int8 => put(out, integers::<i8>(data)?, i8::to_le_bytes),
        Datatype::Int16 => put(out, integers::<i16>(data)?, i16::to_le_bytes),
        Datatype::Int32 => put(out, integers::<i32>(data)?, i32::to_le_bytes),
        Datatype::Int64 => put(out, integers::<i64>(data)?, i64::to_le_bytes),
        Datatype::Fp16 => put(out, floats(data)?, |v| f16_bits(v as f32).to_le_bytes()),
        Datatype::Fp32 => put(out, floats(data)?, |v| (v as f32).to_le_bytes()),
        Datatype::Fp64 => put(out, floats(data)?, f64::to_le_bytes),
        Datatype::Bytes => {
            let TensorData::Str(items) = data else {
                return Err("BYTES data is not strings".into());
            };
            for item in items {
                let length = u32::try_from(item.len())
                    .map_err(|_| format!("an element of {} bytes", item.len()))?;
                out.extend_from_slice(&length.to_le_bytes());
                out.extend_from_slice(item.as_bytes());
            }
        }
    }
    Ok(())
}

fn put<T, const N: usize>(out: &mut Vec<u8>, values: Vec<T>, le: impl Fn(T) -> [u8; N]) {
    out.reserve(values.len() * N);
    for value in values {
        out.extend_from_slice(&le(value));
    }
}

/// The values as `T`, each checked to fit; floats only when whole.
fn integers<T: TryFrom<i64> + TryFrom<u64>>(data: &TensorData) -> Result<Vec<T>, String> {
    let range = |v: &dyn std::fmt::Display| format!("{v} is out of the datatype's range");
    let whole = |v: f64| -> Result<T, String> {
        if v.fract() != 0.0 || !v.is_finite() {
            return Err(format!("{v} is not a whole number"));
        }
        if v < 0.0 {
            // Below -2^63 the cast saturates to i64::MIN, which no narrower type holds either;
            // i64 itself is checked by the round trip.
            let i = v as i64;
            if i as f64 != v {
                return Err(range(&v));
            }
            T::try_from(i).map_err(|_| range(&v))
        } else {
            let u = v as u64;
            if u as f64 != v {
                return Err(range(&v));
            }
            T::try_from(u).map_err(|_| range(&v))
        }
    };
    match data {
        TensorData::I64(v) => v
            .iter()
            .map(|&x| T::try_from(x).map_err(|_| range(&x)))
            .collect(),
        TensorData::U64(v) => v
            .iter()
            .map(|&x| T::try_from(x).map_err(|_| range(&x)))
            .collect(),
        TensorData::F64(v) => v.iter().map(|&x| whole(x)).collect(),
        TensorData::F32(v) => v.iter().map(|&x| whole(f64::from(x))).collect(),
        TensorData::Bool(v) => v.iter().map(|&b| whole(f64::from(u8::from(b)))).collect(),
        TensorData::Str(_) => Err("strings where numbers belong".into()),
    }
}

/// The values as f64 (exact for every f32, and for integers up to 2^53).
fn floats(data: &TensorData) -> Result<Vec<f64>, String> {
    Ok(match data {
        TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        TensorData::F64(v) => v.clone(),
        TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
        TensorData::U64(v) => v.iter().map(|&x| x as f64).collect(),
        TensorData::Bool(_) | TensorData::Str(_) => {
            return Err("no numbers where numbers belong".into());
        }
    })
}

/// `value` as IEEE 754 binary16 bits, rounded to nearest, ties to even; beyond the half range,
/// infinity; NaN stays NaN.
pub fn f16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32;
    let mantissa = bits & 0x007f_ffff;
    if exponent == 0xff {
        let nan = if mantissa != 0 {
            0x0200 | (mantissa >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    // The exponent rebased from f32's bias (127) to f16's (15).
    let half_exponent = exponent - 127 + 15;
    if half_exponent >= 0x1f {
        return sign | 0x7c00;
    }
    let (kept, dropped, shift) = if half_exponent <= 0 {
        // Subnormal in f16 (or zero): the units are 2^-24, so the 24-bit significand with its
        // leading one is shifted right by 14 - e (more than 24: nothing is left, not even half).
        if half_exponent < -10 {
            return sign;
        }
        let significand = mantissa | 0x0080_0000;
        let shift = (14 - half_exponent) as u32;
        (
            significand >> shift,
            significand & ((1 << shift) - 1),
            shift,
        )
    } else {
        (
            ((half_exponent as u32) << 10) | (mantissa >> 13),
            mantissa & 0x1fff,
            13,
        )
    };
    let halfway = 1 << (shift - 1);
    let rounded = if dropped > halfway || (dropped == halfway && kept & 1 == 1) {
        // A carry out of the mantissa moves to the next exponent (or to infinity): still right.
        kept + 1
    } else {
        kept
    };
    sign | rounded as u16
}

#[cfg(test)]
mod tests {
    use ember_core::protocol::oip::OutputTensor;

    use super::*;

    fn binary_body(inputs: Value, tail: &[u8]) -> (Vec<u8>, usize) {
        let head = serde_json::to_vec(&json!({
            "inputs": inputs,
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}]
        }))
        .expect("json");
        let length = head.len();
        let mut body = head;
        body.extend_from_slice(tail);
        (body, length)
    }

    fn one_input(datatype: &str, shape: Value, size: usize) -> Value {
        json!([{"name": "x", "shape": shape, "datatype": datatype,
                "parameters": {"binary_data_size": size}}])
    }

    #[test]
    fn a_binary_request_is_published_as_it_came() {
        let (body, length) = binary_body(one_input("UINT8", json!([1, 1, 1, 3]), 3), &[7, 8, 9]);
        let parsed =
            parse_infer(Bytes::from(body.clone()), Some(&format!(" {length} "))).expect("parses");
        assert_eq!(parsed.body, body);
        assert_eq!(parsed.content_type, content_type::OIP_BINARY);
        assert_eq!(parsed.header_length, Some(length as u64));
        assert!(parsed.request.inputs[0].data.is_none());
        assert!(wants_binary_output(&parsed.request));

        let json = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[0.5]}]}"#;
        let parsed = parse_infer(Bytes::from_static(json), None).expect("parses");
        assert_eq!(parsed.body, &json[..]);
        assert_eq!(parsed.content_type, content_type::JSON);
        assert_eq!(parsed.header_length, None);
        assert!(!wants_binary_output(&parsed.request));
    }

    #[test]
    fn every_datatype_is_taken_at_its_width() {
        for datatype in Datatype::ALL {
            let (shape, tail): (Value, Vec<u8>) = match datatype.width() {
                Some(width) => (json!([2, 3]), vec![0; 6 * width]),
                None => {
                    let mut tail = Vec::new();
                    for item in ["ab", "", "héllo"] {
                        tail.extend_from_slice(&(item.len() as u32).to_le_bytes());
                        tail.extend_from_slice(item.as_bytes());
                    }
                    (json!([3]), tail)
                }
            };
            let (body, length) = binary_body(one_input(datatype.name(), shape, tail.len()), &tail);
            let checked = check_binary(&body, length);
            assert!(checked.is_ok(), "{datatype:?}: {:?}", checked.err());
        }
    }

    #[test]
    fn sizes_that_do_not_add_up_are_refused() {
        let code = |inputs: Value, tail: &[u8]| {
            let (body, length) = binary_body(inputs, tail);
            check_binary(&body, length).expect_err("refused").code
        };
        // The size does not fit the shape, for each width.
        for datatype in [
            "UINT8", "INT16", "FP16", "FP32", "INT32", "FP64", "UINT64", "BOOL",
        ] {
            assert_eq!(
                code(one_input(datatype, json!([1, 3]), 3 * 8 + 1), &[0; 25]),
                "invalid_request",
                "{datatype}"
            );
        }
        assert_eq!(
            code(one_input("FP32", json!([3]), 8), &[0; 8]),
            "invalid_request"
        );
        // The sizes do not add up to the tail: short, trailing bytes.
        assert_eq!(
            code(one_input("UINT8", json!([4]), 4), &[0; 3]),
            "invalid_request"
        );
        assert_eq!(
            code(one_input("UINT8", json!([4]), 4), &[0; 5]),
            "invalid_request"
        );
        let two = json!([
            {"name": "a", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
            {"name": "b", "shape": [1], "datatype": "FP64", "parameters": {"binary_data_size": 8}},
        ]);
        assert_eq!(code(two.clone(), &[0; 15]), "invalid_request");
        let (body, length) = binary_body(two, &[0; 16]);
        assert!(check_binary(&body, length).is_ok());
        // BYTES: a length past the end, too few elements, bytes left over.
        let mut item = 5u32.to_le_bytes().to_vec();
        item.extend_from_slice(b"abc");
        assert_eq!(
            code(one_input("BYTES", json!([1]), 7), &item),
            "invalid_request"
        );
        assert_eq!(
            code(one_input("BYTES", json!([2]), 4), &[0; 4]),
            "invalid_request"
        );
        assert_eq!(
            code(one_input("BYTES", json!([1]), 6), &[1, 0, 0, 0, 9, 9]),
            "invalid_request"
        );
        // Shapes and sizes that are no sizes.
        assert_eq!(
            code(one_input("UINT8", json!([-1, 3]), 3), &[0; 3]),
            "invalid_request"
        );
        assert_eq!(
            code(one_input("UINT8", json!([1i64 << 62, 1i64 << 62]), 0), &[]),
            "invalid_request"
        );
        assert_eq!(
            code(one_input("UINT8", json!([1]), usize::MAX), &[0]),
            "invalid_request"
        );
        let negative = json!([{"name": "x", "shape": [1], "datatype": "UINT8",
                               "parameters": {"binary_data_size": -1}}]);
        assert_eq!(code(negative, &[0]), "invalid_request");
        // Unknown datatypes, missing fields, empty names, no data at all.
        assert_eq!(
            code(one_input("FLOAT", json!([1]), 4), &[0; 4]),
            "unsupported_datatype"
        );
        assert_eq!(
            code(one_input("uint8", json!([1]), 1), &[0]),
            "unsupported_datatype"
        );
        let no_shape =
            json!([{"name": "x", "datatype": "UINT8", "parameters": {"binary_data_size": 1}}]);
        assert_eq!(code(no_shape, &[0]), "invalid_request");
        let no_name = json!([{"name": "", "shape": [1], "datatype": "UINT8",
                              "parameters": {"binary_data_size": 1}}]);
        assert_eq!(code(no_name, &[0]), "invalid_request");
        let no_data = json!([{"name": "x", "shape": [1], "datatype": "UINT8"}]);
        assert_eq!(code(no_data, &[]), "invalid_request");
        // A JSON input beside a binary one is fine.
        let mixed = json!([
            {"name": "a", "shape": [1], "datatype": "INT64", "data": [3]},
            {"name": "b", "shape": [2], "datatype": "UINT8", "parameters": {"binary_data_size": 2}},
        ]);
        let (body, length) = binary_body(mixed, &[1, 2]);
        assert!(check_binary(&body, length).is_ok());
        // The header length itself.
        let (body, _) = binary_body(one_input("UINT8", json!([1]), 1), &[0]);
        let past = parse_infer(Bytes::from(body.clone()), Some("99999"));
        assert_eq!(past.expect_err("past").code, "invalid_request");
        let junk = parse_infer(Bytes::from(body), Some("12x"));
        assert_eq!(junk.expect_err("junk").code, "invalid_request");
    }

    fn response(outputs: Vec<OutputTensor>) -> InferResponse {
        InferResponse {
            model_name: "m".into(),
            model_version: Some("7".into()),
            id: None,
            outputs,
        }
    }

    fn tensor(datatype: &str, data: TensorData) -> OutputTensor {
        OutputTensor {
            name: "y".into(),
            datatype: datatype.into(),
            shape: vec![data.len()],
            data,
        }
    }

    fn bytes_of(datatype: Datatype, data: TensorData) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        write_tensor(datatype, &data, &mut out)?;
        Ok(out)
    }

    #[test]
    fn outputs_are_written_in_their_datatypes_binary_form() {
        use Datatype as D;
        use TensorData as T;
        let cases: Vec<(Datatype, TensorData, Vec<u8>)> = vec![
            (
                D::Fp32,
                T::F32(vec![1.0, -2.5]),
                [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat(),
            ),
            // Read back from JSON, an FP32 tensor is F64 (or I64 where every value is whole).
            (
                D::Fp32,
                T::F64(vec![0.1f32 as f64]),
                0.1f32.to_le_bytes().to_vec(),
            ),
            (D::Fp32, T::I64(vec![3]), 3.0f32.to_le_bytes().to_vec()),
            (D::Fp64, T::F64(vec![0.1]), 0.1f64.to_le_bytes().to_vec()),
            (
                D::Fp16,
                T::F32(vec![1.0, -2.0, 65504.0]),
                vec![0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b],
            ),
            (D::Int8, T::I64(vec![-128, 127]), vec![0x80, 0x7f]),
            (D::Int16, T::I64(vec![-2]), vec![0xfe, 0xff]),
            (
                D::Int32,
                T::I64(vec![1 << 20]),
                (1i32 << 20).to_le_bytes().to_vec(),
            ),
            (
                D::Int64,
                T::I64(vec![i64::MIN]),
                i64::MIN.to_le_bytes().to_vec(),
            ),
            (D::Uint8, T::I64(vec![255]), vec![255]),
            (D::Uint16, T::U64(vec![65535]), vec![0xff, 0xff]),
            (D::Uint32, T::I64(vec![7]), 7u32.to_le_bytes().to_vec()),
            (
                D::Uint64,
                T::U64(vec![u64::MAX]),
                u64::MAX.to_le_bytes().to_vec(),
            ),
            (D::Int32, T::F64(vec![-4.0]), (-4i32).to_le_bytes().to_vec()),
            (D::Bool, T::Bool(vec![true, false]), vec![1, 0]),
            (D::Bool, T::I64(vec![0, 1]), vec![0, 1]),
            (
                D::Bytes,
                T::Str(vec!["ab".into(), String::new()]),
                vec![2, 0, 0, 0, b'a', b'b', 0, 0, 0, 0],
            ),
            // An empty array reads back as Bool whatever its datatype.
            (D::Fp32, T::Bool(vec![]), vec![]),
        ];
        for (datatype, data, expected) in cases {
            assert_eq!(
                bytes_of(datatype, data.clone()),
                Ok(expected),
                "{datatype:?} {data:?}"
            );
        }
        for (datatype, data) in [
            (D::Int8, T::I64(vec![128])),
            (D::Uint8, T::I64(vec![-1])),
            (D::Uint16, T::U64(vec![65536])),
            (D::Int64, T::U64(vec![u64::MAX])),
            (D::Uint32, T::F64(vec![0.5])),
            (D::Int16, T::F64(vec![f64::NAN])),
            (D::Bool, T::I64(vec![2])),
            (D::Fp32, T::Str(vec!["x".into()])),
            (D::Bytes, T::F32(vec![1.0])),
        ] {
            assert!(
                bytes_of(datatype, data.clone()).is_err(),
                "{datatype:?} {data:?}"
            );
        }
    }

    #[test]
    fn the_binary_response_carries_each_asked_output_after_the_header() {
        let request: InferRequest = serde_json::from_value(json!({
            "inputs": [],
            "outputs": [{"name": "a", "parameters": {"binary_data": true}}, {"name": "b"}]
        }))
        .expect("request");
        let mut a = tensor("INT16", TensorData::I64(vec![1, -1]));
        a.name = "a".into();
        let mut b = tensor("FP32", TensorData::F32(vec![0.5]));
        b.name = "b".into();
        let http = encode_response(&response(vec![a, b]), &request).expect("encodes");
        let length: usize = http.headers()[HEADER_LENGTH]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("a number");
        let body =
            futures_util::FutureExt::now_or_never(axum::body::to_bytes(http.into_body(), 1 << 20))
                .expect("ready")
                .expect("body");
        let head: Value = serde_json::from_slice(&body[..length]).expect("json header");
        assert_eq!(head["model_version"], "7");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 4);
        assert!(head["outputs"][0].get("data").is_none());
        assert_eq!(head["outputs"][1]["data"], json!([0.5]));
        assert_eq!(&body[length..], &[1, 0, 0xff, 0xff]);

        let wrong = tensor("INT8", TensorData::I64(vec![300]));
        let request: InferRequest = serde_json::from_value(
            json!({"inputs": [], "parameters": {"binary_data_output": true}}),
        )
        .expect("request");
        let error = encode_response(&response(vec![wrong]), &request).expect_err("refused");
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    /// binary16 bits as f32, exactly (for the round trip below).
    fn f16_value(bits: u16) -> f32 {
        let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exponent = i32::from((bits >> 10) & 0x1f);
        let mantissa = f32::from(bits & 0x3ff);
        match exponent {
            0 => sign * mantissa * 2f32.powi(-24),
            0x1f if mantissa == 0.0 => sign * f32::INFINITY,
            0x1f => f32::NAN,
            _ => sign * (1.0 + mantissa / 1024.0) * 2f32.powi(exponent - 15),
        }
    }

    #[test]
    fn fp16_rounds_to_nearest_even() {
        let cases: [(f32, u16); 18] = [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (0.1, 0x2e66),
            (65504.0, 0x7bff),
            (65519.0, 0x7bff),
            // Halfway between 65504 and 65536: to even, which is infinity.
            (65520.0, 0x7c00),
            (1e6, 0x7c00),
            (f32::INFINITY, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
            // 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: to even (1).
            (1.0 + 2f32.powi(-11), 0x3c00),
            (1.0 + 3.0 * 2f32.powi(-11), 0x3c02),
            (2f32.powi(-14), 0x0400),
            (2f32.powi(-24), 0x0001),
            // Half the smallest subnormal: to even (zero); a little more: the smallest.
            (2f32.powi(-25), 0x0000),
            (1.5 * 2f32.powi(-25), 0x0001),
            (1e-10, 0x0000),
        ];
        for (value, bits) in cases {
            assert_eq!(f16_bits(value), bits, "{value:e}");
        }
        let nan = f16_bits(f32::NAN);
        assert_eq!(nan & 0x7c00, 0x7c00);
        assert_ne!(nan & 0x03ff, 0);
        // Every finite half survives the round trip, and the midpoint between neighbours goes
        // to the even one.
        for bits in 0u16..0x7c00 {
            for sign in [0, 0x8000] {
                let value = f16_value(bits | sign);
                assert_eq!(f16_bits(value), bits | sign, "{bits:#06x}");
            }
            if bits < 0x7bff {
                let (low, high) = (f16_value(bits), f16_value(bits + 1));
                let mid = low + (high - low) / 2.0;
                let even = if bits & 1 == 0 { bits } else { bits + 1 };
                assert_eq!(f16_bits(mid), even, "midpoint after {bits:#06x}");
            }
        }
    }
}
