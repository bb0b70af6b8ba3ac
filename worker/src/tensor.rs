//! Typed tensors: what a job's inputs become and what the graph's outputs are, in every element
//! type ONNX Runtime takes that the Open Inference Protocol names. Decoded from OIP v2 JSON
//! tensors or from the binary extension (a copy of the bytes, no per-element JSON), stacked along
//! the batch axis for one `session.run`, and split back per job.

use std::borrow::Cow;

use ember_core::protocol::oip::{OutputTensor, TensorData};
use half::f16;
use ort::session::SessionInputValue;
use ort::value::{DynValue, TensorElementType, TensorRef, ValueType};
use serde::de::DeserializeSeed;
use serde_json::value::RawValue;

use crate::Error;

/// The element types Ember serves, with their OIP v2 names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    Bytes,
}

const ALL: [DataType; 13] = [
    DataType::Bool,
    DataType::U8,
    DataType::U16,
    DataType::U32,
    DataType::U64,
    DataType::I8,
    DataType::I16,
    DataType::I32,
    DataType::I64,
    DataType::F16,
    DataType::F32,
    DataType::F64,
    DataType::Bytes,
];

impl DataType {
    /// The OIP v2 datatype name.
    pub fn oip(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    pub fn from_oip(name: &str) -> Option<Self> {
        ALL.into_iter().find(|t| t.oip() == name)
    }

    /// Bytes per element in the binary extension (`None` for BYTES: length-prefixed).
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// The type of a graph tensor; `None` for the ones OIP v2 has no name for (bfloat16,
    /// complex, 4-bit and 8-bit floats).
    pub fn from_ort(ty: TensorElementType) -> Option<Self> {
        Some(match ty {
            TensorElementType::Bool => DataType::Bool,
            TensorElementType::Uint8 => DataType::U8,
            TensorElementType::Uint16 => DataType::U16,
            TensorElementType::Uint32 => DataType::U32,
            TensorElementType::Uint64 => DataType::U64,
            TensorElementType::Int8 => DataType::I8,
            TensorElementType::Int16 => DataType::I16,
            TensorElementType::Int32 => DataType::I32,
            TensorElementType::Int64 => DataType::I64,
            TensorElementType::Float16 => DataType::F16,
            TensorElementType::Float32 => DataType::F32,
            TensorElementType::Float64 => DataType::F64,
            TensorElementType::String => DataType::Bytes,
            _ => return None,
        })
    }
}

/// A tensor's elements, flat and row-major.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Bool(Vec<bool>),
    U8(Vec<u8>),
    U16(Vec<u16>),
    U32(Vec<u32>),
    U64(Vec<u64>),
    I8(Vec<i8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<String>),
}

/// `$body` once per variant, with `$v` bound to its vector (same code, each element type).
macro_rules! each {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            Data::Bool($v) => $body,
            Data::U8($v) => $body,
            Data::U16($v) => $body,
            Data::U32($v) => $body,
            Data::U64($v) => $body,
            Data::I8($v) => $body,
            Data::I16($v) => $body,
            Data::I32($v) => $body,
            Data::I64($v) => $body,
            Data::F16($v) => $body,
            Data::F32($v) => $body,
            Data::F64($v) => $body,
            Data::Bytes($v) => $body,
        }
    };
}

/// `$body` for each numeric variant with `$v` its vector and `$t` its element type; `$text`
/// for BYTES.
macro_rules! each_numeric {
    ($data:expr, $v:ident, $t:ident => $body:expr, $s:ident => $text:expr) => {
        match $data {
            Data::Bool($v) => {
                type $t = bool;
                $body
            }
            Data::U8($v) => {
                type $t = u8;
                $body
            }
            Data::U16($v) => {
                type $t = u16;
                $body
            }
            Data::U32($v) => {
                type $t = u32;
                $body
            }
            Data::U64($v) => {
                type $t = u64;
                $body
            }
            Data::I8($v) => {
                type $t = i8;
                $body
            }
            Data::I16($v) => {
                type $t = i16;
                $body
            }
            Data::I32($v) => {
                type $t = i32;
                $body
            }
            Data::I64($v) => {
                type $t = i64;
                $body
            }
            Data::F16($v) => {
                type $t = f16;
                $body
            }
            Data::F32($v) => {
                type $t = f32;
                $body
            }
            Data::F64($v) => {
                type $t = f64;
                $body
            }
            Data::Bytes($s) => $text,
        }
    };
}

impl Data {
    pub fn dtype(&self) -> DataType {
        match self {
            Data::Bool(_) => DataType::Bool,
            Data::U8(_) => DataType::U8,
            Data::U16(_) => DataType::U16,
            Data::U32(_) => DataType::U32,
            Data::U64(_) => DataType::U64,
            Data::I8(_) => DataType::I8,
            Data::I16(_) => DataType::I16,
            Data::I32(_) => DataType::I32,
            Data::I64(_) => DataType::I64,
            Data::F16(_) => DataType::F16,
            Data::F32(_) => DataType::F32,
            Data::F64(_) => DataType::F64,
            Data::Bytes(_) => DataType::Bytes,
        }
    }

    pub fn len(&self) -> usize {
        each!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// An empty vector of `dtype` with room for `capacity` elements.
    pub fn with_capacity(dtype: DataType, capacity: usize) -> Self {
        match dtype {
            DataType::Bool => Data::Bool(Vec::with_capacity(capacity)),
            DataType::U8 => Data::U8(Vec::with_capacity(capacity)),
            DataType::U16 => Data::U16(Vec::with_capacity(capacity)),
            DataType::U32 => Data::U32(Vec::with_capacity(capacity)),
            DataType::U64 => Data::U64(Vec::with_capacity(capacity)),
            DataType::I8 => Data::I8(Vec::with_capacity(capacity)),
            DataType::I16 => Data::I16(Vec::with_capacity(capacity)),
            DataType::I32 => Data::I32(Vec::with_capacity(capacity)),
            DataType::I64 => Data::I64(Vec::with_capacity(capacity)),
            DataType::F16 => Data::F16(Vec::with_capacity(capacity)),
            DataType::F32 => Data::F32(Vec::with_capacity(capacity)),
            DataType::F64 => Data::F64(Vec::with_capacity(capacity)),
            DataType::Bytes => Data::Bytes(Vec::with_capacity(capacity)),
        }
    }

    /// Zeros (false, empty strings) of `dtype`.
    pub fn zeros(dtype: DataType, len: usize) -> Self {
        let mut data = Self::with_capacity(dtype, len);
        each_numeric!(&mut data, v, T => v.resize(len, T::default()), s => s.resize(len, String::new()));
        data
    }

    /// Appends `other` (of the same type).
    fn extend_from(&mut self, other: &Data) -> Result<(), Error> {
        macro_rules! pair {
            ($($variant:ident),*) => {
                match (self, other) {
                    $((Data::$variant(a), Data::$variant(b)) => a.extend_from_slice(b),)*
                    (a, b) => {
                        return Err(Error::Internal(format!(
                            "cannot stack {} onto {}",
                            b.dtype().oip(),
                            a.dtype().oip()
                        )));
                    }
                }
            };
        }
        pair!(
            Bool, U8, U16, U32, U64, I8, I16, I32, I64, F16, F32, F64, Bytes
        );
        Ok(())
    }

    /// Elements `start..start + len`.
    fn slice(&self, start: usize, len: usize) -> Data {
        each_numeric!(self, v, T => {
            let part: Vec<T> = v[start..start + len].to_vec();
            Data::from(part)
        }, s => Data::Bytes(s[start..start + len].to_vec()))
    }
}

macro_rules! from_vec {
    ($($t:ty => $variant:ident),*) => {
        $(impl From<Vec<$t>> for Data {
            fn from(v: Vec<$t>) -> Self {
                Data::$variant(v)
            }
        })*
    };
}
from_vec!(bool => Bool, u8 => U8, u16 => U16, u32 => U32, u64 => U64, i8 => I8, i16 => I16,
    i32 => I32, i64 => I64, f16 => F16, f32 => F32, f64 => F64, String => Bytes);

/// A tensor: its shape and its elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<i64>,
    pub data: Data,
}

/// The number of elements a shape holds, or an error for negative or overflowing dimensions.
pub fn element_count(shape: &[i64]) -> Result<usize, Error> {
    shape.iter().try_fold(1usize, |n, &d| {
        let d = usize::try_from(d).map_err(|_| {
            Error::InvalidInput(format!("shape {shape:?} has a negative dimension"))
        })?;
        n.checked_mul(d)
            .ok_or_else(|| Error::InputTooLarge(format!("shape {shape:?} is too large")))
    })
}

impl Tensor {
    pub fn new(shape: Vec<i64>, data: Data) -> Result<Self, Error> {
        let n = element_count(&shape)?;
        if n != data.len() {
            return Err(Error::InvalidInput(format!(
                "shape {shape:?} needs {n} values, the data has {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    pub fn dtype(&self) -> DataType {
        self.data.dtype()
    }

    /// The size of the first (batch) axis.
    pub fn rows(&self) -> usize {
        self.shape
            .first()
            .and_then(|&d| usize::try_from(d).ok())
            .unwrap_or(1)
    }

    /// Stacks tensors of equal type and non-batch shape along the first axis. One tensor is
    /// returned as it is (no copy).
    pub fn stack(mut parts: Vec<Tensor>) -> Result<Tensor, Error> {
        if parts.len() == 1 {
            return parts
                .pop()
                .ok_or_else(|| Error::Internal("nothing to stack".into()));
        }
        let first = parts
            .first()
            .ok_or_else(|| Error::Internal("nothing to stack".into()))?;
        let total: usize = parts.iter().map(|t| t.data.len()).sum();
        let rows: i64 = parts
            .iter()
            .map(|t| t.shape.first().copied().unwrap_or(1))
            .sum();
        let mut shape = first.shape.clone();
        if let Some(batch) = shape.first_mut() {
            *batch = rows;
        }
        let mut data = Data::with_capacity(first.dtype(), total);
        for part in &parts {
            if part.shape.get(1..) != shape.get(1..) {
                return Err(Error::Internal(format!(
                    "cannot stack shapes {:?} and {:?}",
                    part.shape, shape
                )));
            }
            data.extend_from(&part.data)?;
        }
        Ok(Tensor { shape, data })
    }

    /// Rows `start..start + count` along the first axis.
    pub fn rows_slice(&self, start: usize, count: usize) -> Result<Tensor, Error> {
        let rows = self.rows();
        if start + count > rows || self.shape.is_empty() {
            return Err(Error::Model(format!(
                "an output of shape {:?} has no rows {start}..{}",
                self.shape,
                start + count
            )));
        }
        let per_row = self.data.len() / rows.max(1);
        let mut shape = self.shape.clone();
        shape[0] = count as i64;
        Ok(Tensor {
            shape,
            data: self.data.slice(start * per_row, count * per_row),
        })
    }

    /// A view (or, for BYTES, a copy) ONNX Runtime can take as an input.
    pub fn as_input(&self) -> Result<SessionInputValue<'_>, Error> {
        let shape = self.shape.clone();
        let model = |e: ort::Error| Error::Model(e.to_string());
        Ok(each_numeric!(&self.data, v, T => {
            let _: &Vec<T> = v;
            TensorRef::from_array_view((shape, v.as_slice())).map_err(model)?.into()
        }, s => ort::value::Tensor::from_string_array((shape, s.as_slice())).map_err(model)?.into()))
    }

    /// Copies a graph output out of ONNX Runtime.
    pub fn from_output(name: &str, value: &DynValue) -> Result<Tensor, Error> {
        let ValueType::Tensor { ty, .. } = value.dtype() else {
            return Err(Error::Model(format!("output `{name}` is not a tensor")));
        };
        let dtype = DataType::from_ort(*ty).ok_or_else(|| {
            Error::Model(format!(
                "output `{name}` has element type {ty}, which OIP v2 cannot carry"
            ))
        })?;
        let model = |e: ort::Error| Error::Model(format!("output `{name}`: {e}"));
        macro_rules! copy {
            ($t:ty) => {{
                let (shape, data) = value.try_extract_tensor::<$t>().map_err(model)?;
                (shape.to_vec(), Data::from(data.to_vec()))
            }};
        }
        let (shape, data) = match dtype {
            DataType::Bool => copy!(bool),
            DataType::U8 => copy!(u8),
            DataType::U16 => copy!(u16),
            DataType::U32 => copy!(u32),
            DataType::U64 => copy!(u64),
            DataType::I8 => copy!(i8),
            DataType::I16 => copy!(i16),
            DataType::I32 => copy!(i32),
            DataType::I64 => copy!(i64),
            DataType::F16 => copy!(f16),
            DataType::F32 => copy!(f32),
            DataType::F64 => copy!(f64),
            DataType::Bytes => {
                let (shape, strings) = value.try_extract_strings().map_err(model)?;
                (shape.to_vec(), Data::Bytes(strings))
            }
        };
        Ok(Tensor { shape, data })
    }

    /// The wire form of an output named `name`.
    pub fn into_output(self, name: &str) -> OutputTensor {
        let datatype = self.dtype().oip().to_string();
        let shape = self
            .shape
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(0))
            .collect();
        let data = match self.data {
            Data::Bool(v) => TensorData::Bool(v),
            Data::U8(v) => TensorData::U64(v.into_iter().map(u64::from).collect()),
            Data::U16(v) => TensorData::U64(v.into_iter().map(u64::from).collect()),
            Data::U32(v) => TensorData::U64(v.into_iter().map(u64::from).collect()),
            Data::U64(v) => TensorData::U64(v),
            Data::I8(v) => TensorData::I64(v.into_iter().map(i64::from).collect()),
            Data::I16(v) => TensorData::I64(v.into_iter().map(i64::from).collect()),
            Data::I32(v) => TensorData::I64(v.into_iter().map(i64::from).collect()),
            Data::I64(v) => TensorData::I64(v),
            Data::F16(v) => TensorData::F32(v.into_iter().map(f32::from).collect()),
            Data::F32(v) => TensorData::F32(v),
            Data::F64(v) => TensorData::F64(v),
            Data::Bytes(v) => TensorData::Str(v),
        };
        OutputTensor {
            name: name.to_string(),
            datatype,
            shape,
            data,
        }
    }

    /// The elements as f32 (for output processors), or an error naming the type.
    pub fn as_f32(&self, name: &str) -> Result<Cow<'_, [f32]>, Error> {
        match &self.data {
            Data::F32(v) => Ok(Cow::Borrowed(v)),
            Data::F16(v) => Ok(Cow::Owned(v.iter().map(|&x| f32::from(x)).collect())),
            Data::F64(v) => Ok(Cow::Owned(v.iter().map(|&x| x as f32).collect())),
            other => Err(Error::Model(format!(
                "output `{name}` is {}, not a float tensor",
                other.dtype().oip()
            ))),
        }
    }
}

/// Decodes OIP v2 JSON `data` (flat or nested, row-major) of `dtype` into `count` elements,
/// straight from its text into the typed buffer: no `serde_json::Value` per element.
pub fn from_json(dtype: DataType, data: &RawValue, count: usize) -> Result<Data, Error> {
    let mut out = Data::with_capacity(dtype, count.min(1 << 20));
    let mut reader = serde_json::Deserializer::from_str(data.get());
    Elements {
        data: &mut out,
        count,
    }
    .deserialize(&mut reader)
    .map_err(|e| Error::InvalidInput(e.to_string()))?;
    if out.len() != count {
        return Err(Error::InvalidInput(format!(
            "the shape needs {count} values, the data has {}",
            out.len()
        )));
    }
    Ok(out)
}

/// Appends the elements of a JSON value (a scalar, or nested arrays, depth first, as deep as
/// serde_json's nesting limit of 128) to `data`, each checked against its type and range,
/// refusing more than `count`.
struct Elements<'a> {
    data: &'a mut Data,
    count: usize,
}

/// One JSON scalar, as the parser gave it.
#[derive(Clone, Copy)]
enum Scalar<'s> {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Text(&'s str),
}

impl std::fmt::Display for Scalar<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Bool(v) => write!(f, "{v}"),
            Scalar::Int(v) => write!(f, "{v}"),
            Scalar::Uint(v) => write!(f, "{v}"),
            Scalar::Float(v) => write!(f, "{v}"),
            Scalar::Text(v) => write!(f, "{:?}", truncate(v)),
        }
    }
}

impl Scalar<'_> {
    fn as_f64(self) -> Option<f64> {
        match self {
            Scalar::Int(v) => Some(v as f64),
            Scalar::Uint(v) => Some(v as f64),
            Scalar::Float(v) => Some(v),
            Scalar::Bool(_) | Scalar::Text(_) => None,
        }
    }
}

impl Elements<'_> {
    fn push<E: serde::de::Error>(self, value: Scalar<'_>) -> Result<(), E> {
        if self.data.len() >= self.count {
            return Err(E::custom(format!(
                "more data than the shape's {} values",
                self.count
            )));
        }
        let dtype = self.data.dtype();
        let bad = || E::custom(format!("{value} is not a valid {} value", dtype.oip()));
        // A finite JSON number past the type's range would become an infinity.
        let float = |max: f64| value.as_f64().filter(|v| v.abs() <= max).ok_or_else(bad);
        macro_rules! int {
            ($v:expr, $t:ty) => {{
                let n = match value {
                    Scalar::Int(n) => <$t>::try_from(n).ok(),
                    Scalar::Uint(n) => <$t>::try_from(n).ok(),
                    _ => None,
                };
                $v.push(n.ok_or_else(bad)?)
            }};
        }
        match self.data {
            Data::Bool(v) => match value {
                Scalar::Bool(b) => v.push(b),
                _ => return Err(bad()),
            },
            Data::U8(v) => int!(v, u8),
            Data::U16(v) => int!(v, u16),
            Data::U32(v) => int!(v, u32),
            Data::U64(v) => int!(v, u64),
            Data::I8(v) => int!(v, i8),
            Data::I16(v) => int!(v, i16),
            Data::I32(v) => int!(v, i32),
            Data::I64(v) => int!(v, i64),
            Data::F16(v) => v.push(f16::from_f64(float(f64::from(f16::MAX))?)),
            Data::F32(v) => v.push(float(f64::from(f32::MAX))? as f32),
            Data::F64(v) => v.push(value.as_f64().ok_or_else(bad)?),
            Data::Bytes(v) => match value {
                Scalar::Text(text) => v.push(text.to_string()),
                _ => return Err(bad()),
            },
        }
        Ok(())
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Elements<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, reader: D) -> Result<(), D::Error> {
        reader.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Elements<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tensor data: numbers, booleans or strings, in arrays")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let Elements { data, count } = self;
        while items
            .next_element_seed(Elements {
                data: &mut *data,
                count,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Scalar::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Scalar::Int(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Scalar::Uint(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Scalar::Float(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Scalar::Text(v))
    }
}

fn truncate(text: &str) -> &str {
    match text.char_indices().nth(40) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

/// Decodes `count` elements of `dtype` from the binary extension's little-endian bytes.
pub fn from_binary(dtype: DataType, bytes: &[u8], count: usize) -> Result<Data, Error> {
    let Some(size) = dtype.size() else {
        return from_binary_strings(bytes, count);
    };
    if Some(bytes.len()) != count.checked_mul(size) {
        return Err(Error::InvalidInput(format!(
            "{count} {} values take {} bytes, the tensor has {}",
            dtype.oip(),
            count.saturating_mul(size),
            bytes.len()
        )));
    }
    macro_rules! le {
        ($t:ty) => {
            Data::from(
                bytes
                    .chunks_exact(size)
                    .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect::<Vec<$t>>(),
            )
        };
    }
    Ok(match dtype {
        DataType::Bool => Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
        DataType::U8 => Data::U8(bytes.to_vec()),
        DataType::I8 => Data::I8(bytes.iter().map(|&b| b as i8).collect()),
        DataType::U16 => le!(u16),
        DataType::I16 => le!(i16),
        DataType::U32 => le!(u32),
        DataType::I32 => le!(i32),
        DataType::U64 => le!(u64),
        DataType::I64 => le!(i64),
        DataType::F16 => Data::F16(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
        DataType::F32 => le!(f32),
        DataType::F64 => le!(f64),
        DataType::Bytes => return from_binary_strings(bytes, count),
    })
}

/// BYTES in the binary extension: each element a 4-byte little-endian length, then its bytes.
fn from_binary_strings(mut bytes: &[u8], count: usize) -> Result<Data, Error> {
    let mut out = Vec::with_capacity(count.min(bytes.len() / 4));
    while !bytes.is_empty() {
        let Some((len, rest)) = bytes.split_first_chunk::<4>() else {
            return Err(Error::InvalidInput("a BYTES element is cut short".into()));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(Error::InvalidInput("a BYTES element is cut short".into()));
        }
        let (text, rest) = rest.split_at(len);
        out.push(
            String::from_utf8(text.to_vec())
                .map_err(|_| Error::InvalidInput("a BYTES element is not UTF-8".into()))?,
        );
        bytes = rest;
    }
    if out.len() != count {
        return Err(Error::InvalidInput(format!(
            "the shape needs {count} BYTES elements, the data has {}",
            out.len()
        )));
    }
    Ok(Data::Bytes(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_core::protocol::ErrorCode;
    use serde_json::json;

    #[test]
    fn every_datatype_round_trips_its_name_and_decodes_from_json_and_binary() {
        for dtype in ALL {
            assert_eq!(DataType::from_oip(dtype.oip()), Some(dtype));
            let (value, bytes): (serde_json::Value, Vec<u8>) = match dtype {
                DataType::Bool => (json!([true, false]), vec![1, 0]),
                DataType::Bytes => (json!(["a", "bc"]), b"\x01\0\0\0a\x02\0\0\0bc".to_vec()),
                DataType::F16 => (json!([1.5, -2.0]), {
                    let mut b = f16::from_f32(1.5).to_le_bytes().to_vec();
                    b.extend(f16::from_f32(-2.0).to_le_bytes());
                    b
                }),
                DataType::F32
                | DataType::F64
                | DataType::I8
                | DataType::I16
                | DataType::I32
                | DataType::I64 => (json!([1, -2]), {
                    let size = dtype.size().expect("fixed");
                    let mut b = Vec::new();
                    for v in [1i64, -2] {
                        match dtype {
                            DataType::F32 => b.extend((v as f32).to_le_bytes()),
                            DataType::F64 => b.extend((v as f64).to_le_bytes()),
                            _ => b.extend(&v.to_le_bytes()[..size]),
                        }
                    }
                    b
                }),
                _ => (json!([[1], [2]]), {
                    let size = dtype.size().expect("fixed");
                    let mut b = Vec::new();
                    for v in [1u64, 2] {
                        b.extend(&v.to_le_bytes()[..size]);
                    }
                    b
                }),
            };
            let a = from_json(dtype, &raw(value), 2).expect("json decodes");
            let b = from_binary(dtype, &bytes, 2).expect("binary decodes");
            assert_eq!(a, b, "{}", dtype.oip());
            assert_eq!(a.dtype(), dtype);
        }
    }

    fn raw(value: serde_json::Value) -> Box<RawValue> {
        serde_json::value::to_raw_value(&value).expect("raw")
    }

    #[test]
    fn nested_and_flat_data_decode_alike_and_errors_name_the_value() {
        let nested = from_json(DataType::F32, &raw(json!([[1, 2.5], [[-3]], 4])), 4);
        assert_eq!(
            nested.expect("decodes"),
            Data::F32(vec![1.0, 2.5, -3.0, 4.0])
        );
        let scalar = from_json(DataType::I64, &raw(json!(7)), 1);
        assert_eq!(scalar.expect("decodes"), Data::I64(vec![7]));
        let big = from_json(DataType::U64, &raw(json!([u64::MAX])), 1);
        assert_eq!(big.expect("decodes"), Data::U64(vec![u64::MAX]));
        let text = |r: Result<Data, Error>| r.expect_err("fails").to_string();
        assert!(
            text(from_json(DataType::U8, &raw(json!([1, 300])), 2))
                .contains("300 is not a valid UINT8 value")
        );
        assert!(
            text(from_json(DataType::I32, &raw(json!([1.5])), 1))
                .contains("1.5 is not a valid INT32 value")
        );
        assert!(
            text(from_json(DataType::F16, &raw(json!([1e6])), 1))
                .contains("is not a valid FP16 value")
        );
        assert!(
            text(from_json(DataType::Bytes, &raw(json!([null])), 1)).contains("invalid type: null")
        );
        assert!(
            text(from_json(DataType::F32, &raw(json!({"a": 1})), 1)).contains("invalid type: map")
        );
        assert!(
            text(from_json(DataType::I8, &raw(json!([1, 2, 3])), 2))
                .contains("more data than the shape's 2 values")
        );
        assert!(
            text(from_json(DataType::F32, &raw(json!([1])), 2))
                .contains("the shape needs 2 values, the data has 1")
        );
    }

    #[test]
    fn wrong_counts_ranges_and_types_are_invalid_input() {
        let code = |r: Result<Data, Error>| r.expect_err("fails").code();
        assert_eq!(
            code(from_json(DataType::U8, &raw(json!([1, 300])), 2)),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            code(from_json(DataType::I8, &raw(json!([1, 2, 3])), 2)),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            code(from_json(DataType::F32, &raw(json!([1])), 2)),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            code(from_json(DataType::Bool, &raw(json!([1, 0])), 2)),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            code(from_json(DataType::Bytes, &raw(json!([1])), 1)),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            code(from_binary(DataType::F32, &[0; 7], 2)),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            code(from_binary(DataType::Bytes, b"\x09\0\0\0a", 1)),
            ErrorCode::InvalidInput
        );
        assert_eq!(
            element_count(&[1 << 40, 1 << 40])
                .expect_err("overflows")
                .code(),
            ErrorCode::InputTooLarge
        );
    }

    #[test]
    fn stacking_and_slicing_rows_are_inverse() {
        let a = Tensor::new(vec![1, 2], Data::F32(vec![1.0, 2.0])).expect("tensor");
        let b = Tensor::new(vec![2, 2], Data::F32(vec![3.0, 4.0, 5.0, 6.0])).expect("tensor");
        let stacked = Tensor::stack(vec![a.clone(), b.clone()]).expect("stacks");
        assert_eq!(stacked.shape, vec![3, 2]);
        assert_eq!(stacked.rows_slice(0, 1).expect("slice"), a);
        assert_eq!(stacked.rows_slice(1, 2).expect("slice"), b);
        let other = Tensor::new(vec![1, 3], Data::F32(vec![0.0; 3])).expect("tensor");
        assert!(Tensor::stack(vec![a.clone(), other]).is_err());
        assert!(stacked.rows_slice(2, 2).is_err());
        let out = Tensor::new(vec![2], Data::F16(vec![f16::from_f32(0.5); 2]))
            .expect("tensor")
            .into_output("y");
        assert_eq!(
            (out.datatype.as_str(), out.data),
            ("FP16", TensorData::F32(vec![0.5, 0.5]))
        );
    }
}
