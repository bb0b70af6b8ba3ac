//! The `ssd` output processor: TensorFlow Object Detection API outputs (counts, normalised
//! `ymin, xmin, ymax, xmax` boxes, scores, 1-based classes) -> detections at or above the score
//! threshold, boxes in the original image's pixels.

use ember_core::protocol::Detection;

use super::Labels;
use super::image::Geometry;
use crate::Error;

/// One image's four SSD outputs, flattened.
#[derive(Debug, Clone, Copy)]
pub struct SsdOutputs<'a> {
    pub counts: &'a [f32],
    pub boxes: &'a [f32],
    pub scores: &'a [f32],
    pub classes: &'a [f32],
}

/// The detections of one image whose model input was `input_width x input_height`.
pub fn decode(
    out: SsdOutputs<'_>,
    geometry: &Geometry,
    input: (u32, u32),
    threshold: f32,
    labels: &Labels,
) -> Result<Vec<Detection>, Error> {
    let [count] = out.counts else {
        return Err(Error::Model(format!(
            "num_detections has {} entries for one image",
            out.counts.len()
        )));
    };
    let slots = out.scores.len();
    if out.classes.len() != slots || out.boxes.len() != slots * 4 {
        return Err(Error::Model("SSD output shapes disagree".into()));
    }
    let count = (count.max(0.0) as usize).min(slots);
    let (w, h) = (input.0 as f32, input.1 as f32);
    let mut detections = Vec::new();
    for k in 0..count {
        let score = out.scores[k];
        if score < threshold {
            continue;
        }
        let b = &out.boxes[k * 4..k * 4 + 4];
        let unit = |v: f32| v.clamp(0.0, 1.0);
        let class_id = out.classes[k].round().max(0.0) as u32;
        detections.push(Detection {
            label: labels.label(class_id),
            class_id,
            score,
            bbox: geometry.to_original([
                unit(b[1]) * w,
                unit(b[0]) * h,
                unit(b[3]) * w,
                unit(b[2]) * h,
            ]),
        });
    }
    Ok(detections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detections_are_thresholded_and_in_the_original_pixels() {
        let labels = Labels::from([(1, "person".to_string())]);
        let boxes = [0.1, 0.2, 0.5, 0.6, 0.0, 0.0, 1.5, 1.0, 0.0, 0.0, 0.0, 0.0];
        let out = SsdOutputs {
            counts: &[2.0],
            boxes: &boxes,
            scores: &[0.9, 0.6, 0.0],
            classes: &[1.0, 2.0, 0.0],
        };
        // A 100x200 original stretched to a 10x10 input.
        let geometry = Geometry {
            original_width: 100,
            original_height: 200,
            scale_x: 0.1,
            scale_y: 0.05,
            offset_x: 0.0,
            offset_y: 0.0,
        };
        let found = decode(out, &geometry, (10, 10), 0.5, &labels).expect("decodes");
        assert_eq!(found.len(), 2);
        assert_eq!((found[0].label.as_str(), found[0].class_id), ("person", 1));
        for (got, want) in found[0].bbox.iter().zip([20.0, 20.0, 60.0, 100.0]) {
            assert!((got - want).abs() < 1e-3, "{:?}", found[0].bbox);
        }
        assert_eq!(found[1].label, "class_2");
        assert_eq!(found[1].bbox, [0.0, 0.0, 100.0, 200.0], "ymax is clamped");
        let above = decode(out, &geometry, (10, 10), 0.7, &labels).expect("decodes");
        assert_eq!(above.len(), 1, "the 0.6 detection is under the threshold");
    }

    #[test]
    fn mismatched_output_shapes_are_a_model_error() {
        let out = SsdOutputs {
            counts: &[1.0],
            boxes: &[0.0; 3],
            scores: &[0.9],
            classes: &[1.0],
        };
        let error =
            decode(out, &Geometry::identity(1, 1), (1, 1), 0.5, &Labels::new()).expect_err("fails");
        assert_eq!(error.code(), ember_core::protocol::ErrorCode::ModelError);
    }
}
