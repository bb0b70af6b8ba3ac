//! A model directory: `model.onnx`, and optionally `model.toml` saying what the graph cannot say
//! (how to turn an image into its input, how to read its outputs, labels, batching). The graph is
//! the source of truth for tensor names, types and shapes: the worker checks this file against it
//! at load. A directory with only `model.onnx` serves raw tensors (docs/models.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `model.toml`, or the defaults of a bare directory.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Defaults to the directory's name.
    #[serde(default)]
    pub name: String,
    /// Defaults to `"1"`.
    #[serde(default = "default_version")]
    pub version: String,
    /// The ONNX file, relative to the directory.
    #[serde(default = "default_file")]
    pub file: PathBuf,
    /// Jobs (rows) per `session.run` at most; the worker's --max-batch may lower it.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    #[serde(default)]
    pub input: InputSpec,
    #[serde(default)]
    pub output: OutputSpec,
    /// Class id -> label.
    #[serde(default)]
    pub labels: BTreeMap<u32, String>,
    /// A file of labels, one per line, line N (from 0) naming class N; merged under `labels`.
    #[serde(default)]
    pub labels_file: Option<PathBuf>,
}

fn default_version() -> String {
    "1".into()
}
fn default_file() -> PathBuf {
    PathBuf::from("model.onnx")
}
fn default_max_batch() -> usize {
    8
}

/// How a job's input becomes the graph's input tensors.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InputSpec {
    /// Raw tensors (Open Inference Protocol v2), exactly as the graph declares them.
    #[default]
    Tensor,
    /// An encoded image (PNG/JPEG), decoded, resized and normalised into the one image input.
    /// Raw tensors are taken as well.
    Image(ImageInput),
}

/// The image processor's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    /// The graph input fed; may be left out when the graph has one input.
    #[serde(default)]
    pub tensor: Option<String>,
    pub layout: Layout,
    pub dtype: Dtype,
    pub width: u32,
    pub height: u32,
    #[serde(default)]
    pub resize: Resize,
    /// Letterbox padding value (0..=255 before scaling).
    #[serde(default)]
    pub fill: u8,
    #[serde(default)]
    pub channels: Channels,
    /// float32 only: each value is `(pixel * scale - mean[c]) / std[c]`.
    #[serde(default = "one")]
    pub scale: f32,
    #[serde(default)]
    pub mean: Option<[f32; 3]>,
    #[serde(default)]
    pub std: Option<[f32; 3]>,
}

fn one() -> f32 {
    1.0
}

impl ImageInput {
    /// `(mean, std)` per channel, defaults 0 and 1.
    pub fn normalisation(&self) -> ([f32; 3], [f32; 3]) {
        (self.mean.unwrap_or([0.0; 3]), self.std.unwrap_or([1.0; 3]))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    Nhwc,
    Nchw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    Uint8,
    Float32,
}

/// How an image of another aspect ratio reaches `width x height`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resize {
    /// Both sides scaled independently.
    #[default]
    Stretch,
    /// Scaled to fit inside, centred, the rest filled with `fill`.
    Letterbox,
    /// The shorter side scaled to fit, then the centre cut out.
    CenterCrop,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channels {
    #[default]
    Rgb,
    Bgr,
}

/// How the graph's outputs become a result.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(tag = "decoder", rename_all = "snake_case", deny_unknown_fields)]
pub enum OutputSpec {
    /// The raw output tensors.
    #[default]
    Tensor,
    /// TensorFlow Object Detection API SSD outputs: counts, normalised boxes, scores, classes.
    Ssd {
        num_detections: String,
        boxes: String,
        scores: String,
        classes: String,
        score_threshold: f32,
    },
    /// Class scores `[N, C]`: top-k labels.
    Classification {
        /// May be left out when the graph has one output.
        #[serde(default)]
        tensor: Option<String>,
        /// Apply softmax to the scores first (for logits).
        #[serde(default)]
        softmax: bool,
        #[serde(default = "default_top_k")]
        top_k: usize,
    },
    /// One-tensor detectors (YOLOv5/v8 style): boxes `cx, cy, w, h` in input pixels, scores,
    /// non-maximum suppression, boxes mapped back to the original image.
    Detection {
        #[serde(default)]
        tensor: Option<String>,
        layout: DetectionLayout,
        #[serde(default = "default_score_threshold")]
        score_threshold: f32,
        #[serde(default = "default_iou_threshold")]
        iou_threshold: f32,
        #[serde(default = "default_max_detections")]
        max_detections: usize,
    },
}

fn default_top_k() -> usize {
    5
}
fn default_score_threshold() -> f32 {
    0.25
}
fn default_iou_threshold() -> f32 {
    0.45
}
fn default_max_detections() -> usize {
    100
}

/// The single-tensor detector layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectionLayout {
    /// `[N, A, 5 + C]`: per anchor `cx, cy, w, h, objectness, class scores...` (YOLOv5).
    AnchorsFirst,
    /// `[N, 4 + C, A]`: per attribute row, anchors along the last axis (YOLOv8).
    AttributesFirst,
}

impl ModelSpec {
    /// Reads `<dir>/model.toml`, or takes the defaults when the directory has only the graph.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("model.toml");
        let mut spec = if path.exists() {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            Self::parse("").map_err(|e| format!("{}: {e}", dir.display()))?
        };
        if spec.name.is_empty() {
            // Checked where the name is final: a `--model-name` may replace it.
            spec.name = dir_name(dir)?;
        }
        if let Some(file) = &spec.labels_file {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("labels_file {}: {e}", path.display()))?;
            for (id, line) in text.lines().enumerate() {
                let id = u32::try_from(id).map_err(|_| "too many labels".to_string())?;
                spec.labels
                    .entry(id)
                    .or_insert_with(|| line.trim().to_string());
            }
        }
        Ok(spec)
    }

    /// Parses and checks a `model.toml` text (an empty text is a bare directory's defaults,
    /// but then the name is still empty: [`ModelSpec::load`] fills it in).
    pub fn parse(text: &str) -> Result<Self, String> {
        let spec: ModelSpec = toml::from_str(text).map_err(|e| e.to_string())?;
        if spec.max_batch == 0 {
            return Err("max_batch must be at least 1".into());
        }
        if let InputSpec::Image(image) = &spec.input {
            if image.width == 0 || image.height == 0 {
                return Err("input width and height must be positive".into());
            }
            let (_, std) = image.normalisation();
            if std.contains(&0.0) {
                return Err("input std must not be 0".into());
            }
            if image.dtype == Dtype::Uint8
                && (image.scale != 1.0 || image.mean.is_some() || image.std.is_some())
            {
                return Err("scale, mean and std need dtype = \"float32\"".into());
            }
        }
        match &spec.output {
            OutputSpec::Ssd {
                score_threshold, ..
            } => check_unit("score_threshold", *score_threshold)?,
            OutputSpec::Detection {
                score_threshold,
                iou_threshold,
                ..
            } => {
                check_unit("score_threshold", *score_threshold)?;
                check_unit("iou_threshold", *iou_threshold)?;
            }
            OutputSpec::Classification { top_k, .. } if *top_k == 0 => {
                return Err("top_k must be at least 1".into());
            }
            _ => {}
        }
        if !spec.name.is_empty() {
            check_name(&spec.name)?;
        }
        check_version(&spec.version)?;
        Ok(spec)
    }

    /// The label of a class id.
    pub fn label(&self, class_id: u32) -> String {
        self.labels
            .get(&class_id)
            .cloned()
            .unwrap_or_else(|| format!("class_{class_id}"))
    }
}

fn check_unit(key: &str, value: f32) -> Result<(), String> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!("{key} must be within 0..=1"))
    }
}

/// Model names become queue names and routing keys.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "model name `{name}`: use letters, digits, '-' and '_'"
        ))
    }
}

/// Model versions become queue names and routing keys too (`ember.jobs.<model>@<version>`).
pub fn check_version(version: &str) -> Result<(), String> {
    let ok = !version.is_empty()
        && version.len() <= 64
        && version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "model version `{version}`: use at most 64 letters, digits, '.', '-' and '_'"
        ))
    }
}

fn dir_name(dir: &Path) -> Result<String, String> {
    let canonical = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    canonical
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| format!("{}: the directory has no name", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models")
            .join(name)
    }

    #[test]
    fn the_bundled_model_toml_parses() {
        let spec =
            ModelSpec::load(&bundled("ssdlite-person")).expect("bundled model.toml is valid");
        assert_eq!(spec.name, "ssdlite-person");
        assert_eq!(spec.version, "1");
        assert_eq!(spec.label(1), "person");
        assert_eq!(spec.label(7), "class_7");
        let InputSpec::Image(image) = spec.input else {
            panic!("an image model")
        };
        assert_eq!((image.width, image.height), (300, 300));
        assert_eq!(image.resize, Resize::Stretch);
    }

    #[test]
    fn a_zero_batch_or_unknown_key_is_refused() {
        let good =
            std::fs::read_to_string(bundled("ssdlite-person").join("model.toml")).expect("reads");
        assert!(ModelSpec::parse(&good.replace("max_batch = 8", "max_batch = 0")).is_err());
        assert!(ModelSpec::parse(&format!("bogus = 1\n{good}")).is_err());
        assert!(
            ModelSpec::parse(&good.replace("score_threshold = 0.5", "score_threshold = 2.0"))
                .is_err()
        );
    }

    #[test]
    fn a_directory_with_only_the_graph_is_a_raw_tensor_model_named_after_it() {
        let dir = std::env::temp_dir().join(format!("ember-bare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let spec = ModelSpec::load(&dir).expect("a bare directory is valid");
        std::fs::remove_dir_all(&dir).ok();
        assert!(spec.name.starts_with("ember-bare-"), "{}", spec.name);
        assert_eq!(spec.file, PathBuf::from("model.onnx"));
        assert_eq!(spec.input, InputSpec::Tensor);
        assert_eq!(spec.output, OutputSpec::Tensor);
    }

    #[test]
    fn every_processor_key_parses_and_bad_values_are_refused() {
        let text = r#"
            name = "m"
            version = "3"
            [input]
            kind = "image"
            layout = "nchw"
            dtype = "float32"
            width = 224
            height = 224
            resize = "center_crop"
            channels = "bgr"
            scale = 0.00392156862745098
            mean = [0.485, 0.456, 0.406]
            std = [0.229, 0.224, 0.225]
            [output]
            decoder = "classification"
            softmax = true
            top_k = 3
        "#;
        let spec = ModelSpec::parse(text).expect("parses");
        assert_eq!(spec.version, "3");
        let InputSpec::Image(image) = &spec.input else {
            panic!("image")
        };
        assert_eq!(image.channels, Channels::Bgr);
        assert_eq!(image.resize, Resize::CenterCrop);
        assert!(ModelSpec::parse(&text.replace("0.229", "0.0")).is_err());
        assert!(ModelSpec::parse(&text.replace("top_k = 3", "top_k = 0")).is_err());
        assert!(ModelSpec::parse(&text.replace("float32", "uint8")).is_err());
        let detection = r#"
            [output]
            decoder = "detection"
            layout = "attributes_first"
            iou_threshold = 1.5
        "#;
        assert!(ModelSpec::parse(detection).is_err());
        assert!(ModelSpec::parse(&detection.replace("1.5", "0.5")).is_ok());
    }
}
