//! A model's processing, declared in `model.toml` and checked against the graph at load: a job
//! body -> the graph's input tensors ([`Pipeline::prepare`]), and the graph's outputs for that job
//! -> its result ([`Pipeline::finish`]). One file per processor:
//!
//! - input: raw tensors ([`oip`], every model takes them) or an encoded [`image`];
//! - output: raw tensors, [`ssd`], [`classification`], [`detection`].

pub mod classification;
pub mod detection;
pub mod image;
pub mod oip;
pub mod ssd;

use std::collections::BTreeMap;

use ember_core::model::{InputSpec, Layout, ModelSpec, OutputSpec};
use ember_core::protocol::Outputs;

use crate::Error;
use crate::signature::Signature;
use crate::tensor::{Data, Tensor};
pub use image::Geometry;

/// Limits applied before and during decoding (decompression bombs).
#[derive(Debug, Clone, Copy)]
pub struct InputLimits {
    pub max_bytes: usize,
    pub max_pixels: u64,
}

impl InputLimits {
    /// The worker's defaults (`--max-input-bytes`, `--max-pixels`).
    pub const DEFAULT: Self = Self {
        max_bytes: 16 * 1024 * 1024,
        max_pixels: 40_000_000,
    };
}

/// Class id -> label; ids without one are `class_<id>`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Labels(BTreeMap<u32, String>);

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn label(&self, class_id: u32) -> String {
        self.0
            .get(&class_id)
            .cloned()
            .unwrap_or_else(|| format!("class_{class_id}"))
    }
}

impl<const N: usize> From<[(u32, String); N]> for Labels {
    fn from(pairs: [(u32, String); N]) -> Self {
        Self(pairs.into_iter().collect())
    }
}

/// What a prepared job needs at the end: how it came, and what it asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct JobShape {
    /// A tensor job: answered with raw output tensors.
    pub raw: bool,
    /// The outputs a tensor job named (`None`: all).
    pub requested: Option<Vec<String>>,
    /// An image job: where the model's input pixels came from.
    pub geometry: Option<Geometry>,
}

/// A job ready for the model: its tensors in graph order, `rows` along the batch axis.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub inputs: Vec<Tensor>,
    pub rows: usize,
    pub shape: JobShape,
}

impl Prepared {
    /// Whether `other` can share a run with this job: the non-batch dimensions of every input
    /// are equal.
    pub fn batches_with(&self, other: &Prepared) -> bool {
        self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(a, b)| a.shape.get(1..) == b.shape.get(1..))
    }
}

#[derive(Debug, Clone)]
enum Input {
    Tensor,
    Image(image::ImageProcessor),
}

#[derive(Debug, Clone)]
enum Output {
    Tensor,
    Ssd {
        /// Graph output indices of num_detections, boxes, scores, classes.
        at: [usize; 4],
        score_threshold: f32,
    },
    Classification {
        at: usize,
        softmax: bool,
        top_k: usize,
    },
    Detection {
        at: usize,
        settings: detection::Settings,
    },
}

/// A model's processing, resolved against its graph.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub signature: Signature,
    input: Input,
    output: Output,
    labels: Labels,
    limits: InputLimits,
    /// Rows per job at most (the serving batch ceiling).
    max_rows: usize,
}

/// The formats a job body may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Json,
    Binary,
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";
const JPEG_MAGIC: &[u8] = b"\xff\xd8\xff";

impl Pipeline {
    /// The output processor, its tensors resolved to graph output indices.
    fn output(spec: &OutputSpec, signature: &Signature) -> Result<Output, Error> {
        let index = |name: &str| {
            signature
                .outputs
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| Error::Config(format!("the graph has no output `{name}`")))
        };
        let resolve = |tensor: &Option<String>| {
            signature
                .resolve_output(tensor.as_deref())
                .and_then(|p| index(&p.name))
        };
        let output = match spec {
            OutputSpec::Tensor => Output::Tensor,
            OutputSpec::Ssd {
                num_detections,
                boxes,
                scores,
                classes,
                score_threshold,
            } => Output::Ssd {
                at: [
                    index(num_detections)?,
                    index(boxes)?,
                    index(scores)?,
                    index(classes)?,
                ],
                score_threshold: *score_threshold,
            },
            OutputSpec::Classification {
                tensor,
                softmax,
                top_k,
            } => Output::Classification {
                at: resolve(tensor)?,
                softmax: *softmax,
                top_k: *top_k,
            },
            OutputSpec::Detection {
                tensor,
                layout,
                score_threshold,
                iou_threshold,
                max_detections,
            } => Output::Detection {
                at: resolve(tensor)?,
                settings: detection::Settings {
                    layout: *layout,
                    score_threshold: *score_threshold,
                    iou_threshold: *iou_threshold,
                    max_detections: *max_detections,
                },
            },
        };
        Ok(output)
    }

    /// Resolves `spec` against the graph: a name, type or rank that disagrees is an error that
    /// names both sides.
    pub fn new(
        spec: &ModelSpec,
        signature: Signature,
        limits: InputLimits,
        max_rows: usize,
    ) -> Result<Self, Error> {
        signature.check(spec)?;
        let input = match &spec.input {
            InputSpec::Tensor => Input::Tensor,
            InputSpec::Image(image) => Input::Image(image::ImageProcessor {
                spec: image.clone(),
            }),
        };
        let output = Self::output(&spec.output, &signature)?;
        if matches!(input, Input::Tensor)
            && matches!(output, Output::Ssd { .. } | Output::Detection { .. })
        {
            return Err(Error::Config(
                "the ssd and detection decoders map boxes to an image: they need an [input] of \
                 kind \"image\""
                    .into(),
            ));
        }
        Ok(Self {
            signature,
            input,
            output,
            labels: Labels(spec.labels.clone()),
            limits,
            max_rows,
        })
    }

    /// Rows per job at most.
    pub fn max_rows(&self) -> usize {
        if self.signature.batching {
            self.max_rows
        } else {
            usize::MAX
        }
    }

    /// Elements per input tensor at most: as many values as the largest image decodes to.
    fn max_elements(&self) -> usize {
        usize::try_from(self.limits.max_pixels.saturating_mul(3)).unwrap_or(usize::MAX)
    }

    /// Decodes and checks one job body (`header_length`: the binary extension's JSON length).
    pub fn prepare(
        &self,
        content_type: Option<&str>,
        header_length: Option<&str>,
        body: &[u8],
    ) -> Result<Prepared, Error> {
        if body.is_empty() {
            return Err(Error::InvalidInput("the job body is empty".into()));
        }
        if body.len() > self.limits.max_bytes {
            return Err(Error::InputTooLarge(format!(
                "the body is {} bytes; the limit is {}",
                body.len(),
                self.limits.max_bytes
            )));
        }
        let header_length = header_length
            .map(|h| {
                h.trim().parse::<usize>().map_err(|_| {
                    Error::InvalidInput(format!(
                        "inference-header-content-length `{h}` is not a length"
                    ))
                })
            })
            .transpose()?;
        match self.format(content_type, header_length, body)? {
            Format::Json => self.prepare_tensors(oip::decode(body, None, self.max_elements())?),
            Format::Binary => {
                self.prepare_tensors(oip::decode(body, header_length, self.max_elements())?)
            }
            format => {
                let Input::Image(processor) = &self.input else {
                    return Err(Error::UnsupportedContentType(
                        "an image, for a model that takes tensors (send application/json or the \
                         binary tensor extension)"
                            .into(),
                    ));
                };
                let (tensor, geometry) =
                    processor.prepare(format == Format::Png, body, self.limits)?;
                Ok(Prepared {
                    inputs: vec![tensor],
                    rows: 1,
                    shape: JobShape {
                        raw: false,
                        requested: None,
                        geometry: Some(geometry),
                    },
                })
            }
        }
    }

    /// The format a job's content type names. A missing or generic content type (plain AMQP
    /// clients often send none) is resolved from the body's magic bytes.
    fn format(
        &self,
        content_type: Option<&str>,
        header_length: Option<usize>,
        body: &[u8],
    ) -> Result<Format, Error> {
        let essence = content_type
            .map(|ct| {
                ct.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        match essence.as_str() {
            "image/png" => Ok(Format::Png),
            "image/jpeg" | "image/jpg" => Ok(Format::Jpeg),
            "application/json" => Ok(Format::Json),
            ember_core::protocol::content_type::OIP_BINARY => match header_length {
                Some(_) => Ok(Format::Binary),
                None => Err(Error::InvalidInput(
                    "a binary tensor job needs the inference-header-content-length header".into(),
                )),
            },
            "" | "application/octet-stream" => {
                if body.starts_with(PNG_MAGIC) {
                    Ok(Format::Png)
                } else if body.starts_with(JPEG_MAGIC) {
                    Ok(Format::Jpeg)
                } else if header_length.is_some() {
                    Ok(Format::Binary)
                } else {
                    Err(Error::InvalidImage(
                        "no content type and the body is neither PNG nor JPEG".into(),
                    ))
                }
            }
            _ => Err(Error::UnsupportedContentType(essence)),
        }
    }

    fn prepare_tensors(&self, request: oip::TensorRequest) -> Result<Prepared, Error> {
        if let Some(requested) = &request.outputs {
            for name in requested {
                if self.signature.output(name).is_none() {
                    return Err(Error::InvalidInput(format!(
                        "unknown output `{name}`; the model's outputs are {}",
                        self.signature
                            .outputs
                            .iter()
                            .map(|p| format!("`{}`", p.name))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        let inputs = self.signature.arrange(request.inputs)?;
        let rows = inputs.first().map_or(1, Tensor::rows);
        if rows > self.max_rows() {
            return Err(Error::InvalidInput(format!(
                "the job has {rows} rows; this model takes at most {} per job",
                self.max_rows()
            )));
        }
        Ok(Prepared {
            inputs,
            rows,
            shape: JobShape {
                raw: true,
                requested: request.outputs,
                geometry: None,
            },
        })
    }

    /// A job of zeros with `rows` rows (warm-up; dynamic non-batch dimensions become 1).
    pub fn blank(&self, rows: usize) -> Result<Prepared, Error> {
        let inputs = match &self.input {
            Input::Image(processor) => {
                let spec = &processor.spec;
                let one = processor.layout(vec![0; (spec.width * spec.height * 3) as usize])?;
                vec![Tensor::stack(vec![one; rows])?]
            }
            Input::Tensor => self
                .signature
                .inputs
                .iter()
                .map(|port| {
                    let mut shape: Vec<i64> = port.shape.iter().map(|&d| d.max(1)).collect();
                    if self.signature.batching
                        && let Some(first) = shape.first_mut()
                    {
                        *first = rows as i64;
                    }
                    let n = crate::tensor::element_count(&shape)?;
                    Tensor::new(shape, Data::zeros(port.dtype, n))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Prepared {
            inputs,
            rows,
            shape: JobShape {
                raw: true,
                requested: None,
                geometry: None,
            },
        })
    }

    /// One job's result from its rows of the graph's outputs (graph order).
    pub fn finish(
        &self,
        shape: &JobShape,
        rows: usize,
        outputs: Vec<Tensor>,
    ) -> Result<Outputs, Error> {
        let mut result = Outputs::default();
        let decode = !shape.raw || matches!(self.input, Input::Tensor);
        match (&self.output, decode) {
            (Output::Classification { at, softmax, top_k }, true) => {
                let port = &self.signature.outputs[*at].name;
                let scores = outputs[*at].as_f32(port)?;
                result.classes = Some(classification::top_k(
                    &scores,
                    rows,
                    *top_k,
                    *softmax,
                    &self.labels,
                )?);
            }
            (
                Output::Ssd {
                    at,
                    score_threshold,
                },
                true,
            ) => {
                let geometry = shape.geometry.unwrap_or(Geometry::identity(1, 1));
                let names = at.map(|i| self.signature.outputs[i].name.as_str());
                let [counts, boxes, scores, classes] =
                    [0, 1, 2, 3].map(|k| outputs[at[k]].as_f32(names[k]));
                let (counts, boxes, scores, classes) = (counts?, boxes?, scores?, classes?);
                result.detections = Some(ssd::decode(
                    ssd::SsdOutputs {
                        counts: &counts,
                        boxes: &boxes,
                        scores: &scores,
                        classes: &classes,
                    },
                    &geometry,
                    self.input_size(),
                    *score_threshold,
                    &self.labels,
                )?);
            }
            (Output::Detection { at, settings }, true) => {
                let geometry = shape.geometry.unwrap_or(Geometry::identity(1, 1));
                let port = &self.signature.outputs[*at].name;
                let data = outputs[*at].as_f32(port)?;
                result.detections = Some(detection::decode(
                    &data,
                    &outputs[*at].shape,
                    *settings,
                    &geometry,
                    &self.labels,
                )?);
            }
            _ => {}
        }
        if shape.raw || matches!(self.output, Output::Tensor) {
            let tensors = self
                .signature
                .outputs
                .iter()
                .zip(outputs)
                .filter(|(port, _)| {
                    shape
                        .requested
                        .as_ref()
                        .is_none_or(|r| r.contains(&port.name))
                })
                .map(|(port, tensor)| tensor.into_output(&port.name))
                .collect();
            result.tensors = Some(tensors);
        }
        Ok(result)
    }

    /// The image input's `(width, height)` (`(1, 1)` without one).
    fn input_size(&self) -> (u32, u32) {
        match &self.input {
            Input::Image(p) => (p.spec.width, p.spec.height),
            Input::Tensor => (1, 1),
        }
    }

    /// Whether jobs take images, and in which layout (for logs).
    pub fn describe(&self) -> String {
        match &self.input {
            Input::Tensor => "raw tensors".into(),
            Input::Image(p) => format!(
                "images at {}x{} ({}, {:?}) or raw tensors",
                p.spec.width,
                p.spec.height,
                match p.spec.layout {
                    Layout::Nhwc => "NHWC",
                    Layout::Nchw => "NCHW",
                },
                p.spec.dtype
            ),
        }
    }
}
