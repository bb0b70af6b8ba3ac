//! The graph as the source of truth: its inputs and outputs (names, element types, shapes with
//! dynamic dimensions) read from the session at load, `model.toml` checked against them, and
//! each job's tensors checked against them before they reach ONNX Runtime.

use ember_core::model::{DetectionLayout, InputSpec, Layout, ModelSpec, OutputSpec};
use ember_core::protocol::ModelInfo;
use ember_core::protocol::oip::TensorMeta;
use ort::session::Session;
use ort::value::{Outlet, ValueType};

use crate::Error;
use crate::tensor::{DataType, Tensor};

/// One graph input or output; `-1` marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
}

impl Port {
    fn of(outlet: &Outlet, side: &str) -> Result<Self, Error> {
        let name = outlet.name().to_string();
        let ValueType::Tensor { ty, shape, .. } = outlet.dtype() else {
            return Err(Error::Config(format!(
                "graph {side} `{name}` is {}, not a tensor: Ember serves tensors (for a \
                 scikit-learn classifier, convert with skl2onnx's zipmap=False)",
                outlet.dtype()
            )));
        };
        let dtype = DataType::from_ort(*ty).ok_or_else(|| {
            Error::Config(format!(
                "graph {side} `{name}` has element type {ty}, which OIP v2 cannot carry"
            ))
        })?;
        Ok(Self {
            name,
            dtype,
            shape: shape.to_vec(),
        })
    }

    fn meta(&self) -> TensorMeta {
        TensorMeta {
            name: self.name.clone(),
            datatype: self.dtype.oip().to_string(),
            shape: self.shape.clone(),
        }
    }

    fn batch_dynamic(&self) -> bool {
        self.shape.first().is_some_and(|&d| d < 0)
    }
}

/// The graph's inputs and outputs, in graph order, and whether jobs can share a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
    /// The first dimension of every input and output is dynamic: rows of several jobs can be
    /// stacked into one run.
    pub batching: bool,
}

impl Signature {
    /// Reads the session's inputs and outputs.
    pub fn of(session: &Session) -> Result<Self, Error> {
        let inputs = session
            .inputs()
            .iter()
            .map(|o| Port::of(o, "input"))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .outputs()
            .iter()
            .map(|o| Port::of(o, "output"))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(inputs, outputs))
    }

    pub fn new(inputs: Vec<Port>, outputs: Vec<Port>) -> Self {
        let batching = inputs.iter().chain(&outputs).all(Port::batch_dynamic);
        Self {
            inputs,
            outputs,
            batching,
        }
    }

    fn input(&self, name: &str) -> Option<(usize, &Port)> {
        self.inputs.iter().enumerate().find(|(_, p)| p.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&Port> {
        self.outputs.iter().find(|p| p.name == name)
    }

    fn names(ports: &[Port]) -> String {
        ports
            .iter()
            .map(|p| format!("`{}` {} {:?}", p.name, p.dtype.oip(), p.shape))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The one input `tensor` names, or the only input: an error naming both sides otherwise.
    pub fn resolve_input(&self, tensor: Option<&str>) -> Result<usize, Error> {
        match tensor {
            Some(name) => self.input(name).map(|(i, _)| i).ok_or_else(|| {
                Error::Config(format!(
                    "model.toml names input `{name}`; the graph's inputs are {}",
                    Self::names(&self.inputs)
                ))
            }),
            None if self.inputs.len() == 1 => Ok(0),
            None => Err(Error::Config(format!(
                "the graph has {} inputs ({}); say which one takes the image with `tensor`",
                self.inputs.len(),
                Self::names(&self.inputs)
            ))),
        }
    }

    /// The output `tensor` names, or the only output.
    pub fn resolve_output(&self, tensor: Option<&str>) -> Result<&Port, Error> {
        match tensor {
            Some(name) => self.output(name).ok_or_else(|| {
                Error::Config(format!(
                    "model.toml names output `{name}`; the graph's outputs are {}",
                    Self::names(&self.outputs)
                ))
            }),
            None if self.outputs.len() == 1 => Ok(&self.outputs[0]),
            None => Err(Error::Config(format!(
                "the graph has {} outputs ({}); say which one to read with `tensor`",
                self.outputs.len(),
                Self::names(&self.outputs)
            ))),
        }
    }

    /// Checks `model.toml` against the graph: every name it gives exists, with the type and
    /// rank its processor needs. The error names both sides.
    pub fn check(&self, spec: &ModelSpec) -> Result<(), Error> {
        if let InputSpec::Image(image) = &spec.input {
            self.check_image(image)?;
        }
        self.check_output(&spec.output)
    }

    /// The image input: its tensor exists, with the declared type, rank 4, 3 channels where the
    /// layout puts them and the declared size (or dynamic dimensions); the only input.
    fn check_image(&self, image: &ember_core::model::ImageInput) -> Result<(), Error> {
        let index = self.resolve_input(image.tensor.as_deref())?;
        let port = &self.inputs[index];
        let want = match image.dtype {
            ember_core::model::Dtype::Uint8 => DataType::U8,
            ember_core::model::Dtype::Float32 => DataType::F32,
        };
        let channels = match image.layout {
            Layout::Nhwc => 3,
            Layout::Nchw => 1,
        };
        let fits = |at: usize, want: i64| port.shape.get(at).is_some_and(|&d| d < 0 || d == want);
        let (h_at, w_at) = match image.layout {
            Layout::Nhwc => (1, 2),
            Layout::Nchw => (2, 3),
        };
        let ok = port.dtype == want
            && port.shape.len() == 4
            && fits(channels, 3)
            && fits(h_at, i64::from(image.height))
            && fits(w_at, i64::from(image.width));
        if !ok {
            return Err(Error::Config(format!(
                "model.toml feeds input `{}` a {} {:?} image of {}x{} ({}); the graph \
                 declares {} {:?}",
                port.name,
                want.oip(),
                image.layout,
                image.width,
                image.height,
                match image.layout {
                    Layout::Nhwc => "[N, H, W, 3]",
                    Layout::Nchw => "[N, 3, H, W]",
                },
                port.dtype.oip(),
                port.shape
            )));
        }
        if self.inputs.len() != 1 {
            return Err(Error::Config(format!(
                "an image model must have one input; the graph has {}",
                Self::names(&self.inputs)
            )));
        }
        Ok(())
    }

    /// The outputs the processor reads: they exist, as float tensors of the rank it needs.
    fn check_output(&self, output: &OutputSpec) -> Result<(), Error> {
        let float_rank = |name: Option<&str>, rank: Option<usize>, what: &str| {
            let port = self.resolve_output(name)?;
            let float = matches!(port.dtype, DataType::F32 | DataType::F16 | DataType::F64);
            if !float || rank.is_some_and(|r| port.shape.len() != r) {
                return Err(Error::Config(format!(
                    "{what}: output `{}` must be a float tensor{}; the graph declares {} {:?}",
                    port.name,
                    rank.map(|r| format!(" of rank {r}")).unwrap_or_default(),
                    port.dtype.oip(),
                    port.shape
                )));
            }
            Ok(())
        };
        match output {
            OutputSpec::Tensor => {}
            OutputSpec::Ssd {
                num_detections,
                boxes,
                scores,
                classes,
                ..
            } => {
                float_rank(Some(num_detections), Some(1), "ssd num_detections")?;
                float_rank(Some(boxes), Some(3), "ssd boxes")?;
                float_rank(Some(scores), Some(2), "ssd scores")?;
                float_rank(Some(classes), Some(2), "ssd classes")?;
            }
            OutputSpec::Classification { tensor, .. } => {
                float_rank(tensor.as_deref(), Some(2), "classification")?;
            }
            OutputSpec::Detection { tensor, layout, .. } => {
                float_rank(tensor.as_deref(), Some(3), "detection")?;
                let port = self.resolve_output(tensor.as_deref())?;
                let attributes = match layout {
                    DetectionLayout::AnchorsFirst => port.shape[2],
                    DetectionLayout::AttributesFirst => port.shape[1],
                };
                let least = match layout {
                    DetectionLayout::AnchorsFirst => 6,
                    DetectionLayout::AttributesFirst => 5,
                };
                if attributes >= 0 && attributes < least {
                    return Err(Error::Config(format!(
                        "detection layout {layout:?} needs at least {least} values per anchor; \
                         output `{}` is {:?}",
                        port.name, port.shape
                    )));
                }
            }
        }
        Ok(())
    }

    /// Puts a job's named tensors in graph order and checks each against its input: every input
    /// given once, the declared type, rank and fixed dimensions, and (without batching) the
    /// declared batch dimension.
    pub fn arrange(&self, mut given: Vec<(String, Tensor)>) -> Result<Vec<Tensor>, Error> {
        if given.len() != self.inputs.len() {
            return Err(Error::InvalidInput(format!(
                "the model takes {} input(s) ({}); the job has {}",
                self.inputs.len(),
                Self::names(&self.inputs),
                given.len()
            )));
        }
        let mut rows = None;
        let mut arranged = Vec::with_capacity(self.inputs.len());
        for port in &self.inputs {
            let at = given
                .iter()
                .position(|(name, _)| *name == port.name)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "input `{}` is missing; the model takes {}",
                        port.name,
                        Self::names(&self.inputs)
                    ))
                })?;
            let (_, tensor) = given.swap_remove(at);
            check_port(port, &tensor)?;
            let n = tensor.shape.first().copied().unwrap_or(1);
            if let Some((first, r)) = &rows
                && *r != n
            {
                return Err(Error::InvalidInput(format!(
                    "inputs disagree on the batch size: `{first}` has {r} rows, `{}` has {n}",
                    port.name
                )));
            }
            rows.get_or_insert((port.name.as_str(), n));
            arranged.push(tensor);
        }
        if arranged.first().is_some_and(|t| t.rows() == 0) {
            return Err(Error::InvalidInput("the job has no rows".into()));
        }
        Ok(arranged)
    }

    /// What heartbeats publish.
    pub fn info(&self, spec: &ModelSpec, max_batch: usize) -> ModelInfo {
        ModelInfo {
            version: spec.version.clone(),
            inputs: self.inputs.iter().map(Port::meta).collect(),
            outputs: self.outputs.iter().map(Port::meta).collect(),
            max_batch: u32::try_from(max_batch).unwrap_or(u32::MAX),
            input: match spec.input {
                InputSpec::Tensor => "tensor",
                InputSpec::Image(_) => "image",
            }
            .into(),
            decoder: match spec.output {
                OutputSpec::Tensor => "tensor",
                OutputSpec::Ssd { .. } => "ssd",
                OutputSpec::Classification { .. } => "classification",
                OutputSpec::Detection { .. } => "detection",
            }
            .into(),
        }
    }
}

fn check_port(port: &Port, tensor: &Tensor) -> Result<(), Error> {
    let fits = tensor.shape.len() == port.shape.len()
        && tensor
            .shape
            .iter()
            .zip(&port.shape)
            .all(|(&got, &want)| want < 0 || got == want);
    if tensor.dtype() != port.dtype || !fits {
        return Err(Error::InvalidInput(format!(
            "input `{}` is {} {:?}; the model expects {} {:?} (-1: any size)",
            port.name,
            tensor.dtype().oip(),
            tensor.shape,
            port.dtype.oip(),
            port.shape
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Data;
    use ember_core::protocol::ErrorCode;

    fn port(name: &str, dtype: DataType, shape: &[i64]) -> Port {
        Port {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn two_inputs() -> Signature {
        Signature::new(
            vec![
                port("x", DataType::F32, &[-1, 3]),
                port("k", DataType::I64, &[-1, 1]),
            ],
            vec![port("y", DataType::F32, &[-1, 2])],
        )
    }

    #[test]
    fn batching_needs_every_first_dimension_dynamic() {
        assert!(two_inputs().batching);
        let fixed = Signature::new(
            vec![port("x", DataType::F32, &[1, 3])],
            vec![port("y", DataType::F32, &[-1, 2])],
        );
        assert!(!fixed.batching);
    }

    #[test]
    fn a_job_is_arranged_in_graph_order_and_bad_tensors_are_invalid_input() {
        let sig = two_inputs();
        let x = Tensor::new(vec![2, 3], Data::F32(vec![0.0; 6])).expect("x");
        let k = Tensor::new(vec![2, 1], Data::I64(vec![1, 2])).expect("k");
        let arranged = sig
            .arrange(vec![("k".into(), k.clone()), ("x".into(), x.clone())])
            .expect("arranges");
        assert_eq!(arranged, vec![x.clone(), k.clone()]);
        let bad = [
            vec![("x".to_string(), x.clone())],
            vec![("x".into(), x.clone()), ("q".into(), k.clone())],
            vec![("x".into(), k.clone()), ("k".into(), x.clone())],
            vec![
                (
                    "x".into(),
                    Tensor::new(vec![2, 4], Data::F32(vec![0.0; 8])).expect("t"),
                ),
                ("k".into(), k.clone()),
            ],
            vec![
                (
                    "x".into(),
                    Tensor::new(vec![1, 3], Data::F32(vec![0.0; 3])).expect("t"),
                ),
                ("k".into(), k.clone()),
            ],
        ];
        for case in bad {
            let error = sig.arrange(case).expect_err("refused");
            assert_eq!(error.code(), ErrorCode::InvalidInput, "{error}");
        }
    }

    #[test]
    fn model_toml_names_and_types_are_checked_against_the_graph() {
        let sig = Signature::new(
            vec![port("images", DataType::F32, &[-1, 3, 224, 224])],
            vec![port("logits", DataType::F32, &[-1, 1000])],
        );
        let toml = |extra: &str| {
            ModelSpec::parse(&format!(
                "[input]\nkind = \"image\"\nlayout = \"nchw\"\ndtype = \"float32\"\nwidth = 224\n\
                 height = 224\n{extra}\n[output]\ndecoder = \"classification\"\n"
            ))
            .expect("parses")
        };
        sig.check(&toml("")).expect("fits");
        let error = sig
            .check(&toml("tensor = \"pixels\""))
            .expect_err("no such input");
        assert!(error.to_string().contains("`images`"), "{error}");
        let wrong = ModelSpec::parse(
            "[input]\nkind = \"image\"\nlayout = \"nhwc\"\ndtype = \"uint8\"\nwidth = 224\nheight = 224\n",
        )
        .expect("parses");
        let error = sig.check(&wrong).expect_err("layout and type disagree");
        assert!(error.to_string().contains("FP32"), "{error}");
    }
}
