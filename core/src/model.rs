//! A model directory: `model.toml` says how to feed the graph and how to read its outputs. The
//! worker serves it; the dispatcher reads it for model metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `model.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    /// The ONNX file, relative to the directory.
    pub file: PathBuf,
    pub max_batch: usize,
    pub input: InputSpec,
    pub output: OutputSpec,
    #[serde(default)]
    pub labels: BTreeMap<u32, String>,
}

/// How a job's input becomes the graph's input tensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum InputSpec {
    /// An encoded image, decoded to RGB and resized to width x height, fed as uint8 NHWC.
    Image {
        tensor: String,
        layout: Layout,
        dtype: Dtype,
        width: u32,
        height: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    Nhwc,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dtype {
    Uint8,
}

/// How the graph's outputs become a result.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "decoder", rename_all = "snake_case", deny_unknown_fields)]
pub enum OutputSpec {
    /// TensorFlow Object Detection API SSD outputs: counts, normalised boxes, scores, classes.
    Ssd {
        num_detections: String,
        boxes: String,
        scores: String,
        classes: String,
        score_threshold: f32,
    },
}

impl ModelSpec {
    /// Reads and checks `<dir>/model.toml`.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let path = dir.join("model.toml");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses and checks a `model.toml` text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let spec: ModelSpec = toml::from_str(text).map_err(|e| e.to_string())?;
        if spec.max_batch == 0 {
            return Err("max_batch must be at least 1".into());
        }
        let InputSpec::Image { width, height, .. } = &spec.input;
        if *width == 0 || *height == 0 {
            return Err("input width and height must be positive".into());
        }
        let OutputSpec::Ssd {
            score_threshold, ..
        } = &spec.output;
        if !(0.0..=1.0).contains(score_threshold) {
            return Err("score_threshold must be within 0..=1".into());
        }
        if spec.name.is_empty() || spec.name.contains(['.', '*', '#', ' ']) {
            return Err("name must be non-empty, without '.', '*', '#' or spaces".into());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundled_model_toml_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ssdlite-person");
        let spec = ModelSpec::load(&dir).expect("bundled model.toml is valid");
        assert_eq!(spec.name, "ssdlite-person");
        assert_eq!(spec.label(1), "person");
        assert_eq!(spec.label(7), "class_7");
        let InputSpec::Image { width, height, .. } = spec.input;
        assert_eq!((width, height), (300, 300));
    }

    #[test]
    fn a_zero_batch_or_unknown_key_is_refused() {
        let good = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ssdlite-person/model.toml"),
        )
        .expect("reads");
        assert!(ModelSpec::parse(&good.replace("max_batch = 8", "max_batch = 0")).is_err());
        assert!(ModelSpec::parse(&format!("bogus = 1\n{good}")).is_err());
        assert!(
            ModelSpec::parse(&good.replace("score_threshold = 0.5", "score_threshold = 2.0"))
                .is_err()
        );
    }
}
