//! The `detection` output processor for one-tensor detectors: YOLOv5-style `[1, A, 5 + C]`
//! (`anchors_first`: `cx, cy, w, h, objectness, class scores`) or YOLOv8-style `[1, 4 + C, A]`
//! (`attributes_first`: `cx, cy, w, h, class scores` as rows) in model-input pixels -> scored
//! boxes, per-class non-maximum suppression, boxes mapped back through the letterbox (or crop,
//! or stretch) to the original image.

use ember_core::model::DetectionLayout;
use ember_core::protocol::Detection;

use super::Labels;
use super::image::Geometry;
use crate::Error;

/// The decoding settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub layout: DetectionLayout,
    pub score_threshold: f32,
    pub iou_threshold: f32,
    pub max_detections: usize,
}

/// One image's detections from its output tensor `data` of `shape` (`[1, ., .]`).
pub fn decode(
    data: &[f32],
    shape: &[i64],
    settings: Settings,
    geometry: &Geometry,
    labels: &Labels,
) -> Result<Vec<Detection>, Error> {
    let &[1, d1, d2] = shape else {
        return Err(Error::Model(format!(
            "a detection output of one image must be [1, ., .], not {shape:?}"
        )));
    };
    let (d1, d2) = (d1.max(0) as usize, d2.max(0) as usize);
    if data.len() != d1 * d2 {
        return Err(Error::Model(
            "detection output size disagrees with its shape".into(),
        ));
    }
    let (anchors, attributes) = match settings.layout {
        DetectionLayout::AnchorsFirst => (d1, d2),
        DetectionLayout::AttributesFirst => (d2, d1),
    };
    let (first_class, least) = match settings.layout {
        DetectionLayout::AnchorsFirst => (5, 6),
        DetectionLayout::AttributesFirst => (4, 5),
    };
    if attributes < least {
        return Err(Error::Model(format!(
            "{attributes} values per anchor; the layout needs at least {least}"
        )));
    }
    let at = |anchor: usize, attribute: usize| match settings.layout {
        DetectionLayout::AnchorsFirst => data[anchor * attributes + attribute],
        DetectionLayout::AttributesFirst => data[attribute * anchors + anchor],
    };
    let mut candidates = Vec::new();
    for a in 0..anchors {
        let objectness = match settings.layout {
            DetectionLayout::AnchorsFirst => at(a, 4),
            DetectionLayout::AttributesFirst => 1.0,
        };
        if objectness < settings.score_threshold {
            continue;
        }
        let (class, best) = (first_class..attributes)
            .map(|c| (c - first_class, at(a, c)))
            .fold((0, f32::NEG_INFINITY), |m, x| if x.1 > m.1 { x } else { m });
        let score = objectness * best;
        if score < settings.score_threshold {
            continue;
        }
        let (cx, cy, w, h) = (at(a, 0), at(a, 1), at(a, 2), at(a, 3));
        let bbox = [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0];
        candidates.push((class as u32, score, bbox));
    }
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept: Vec<(u32, f32, [f32; 4])> = Vec::new();
    for candidate in candidates {
        if kept.len() >= settings.max_detections {
            break;
        }
        let overlaps = kept
            .iter()
            .any(|k| k.0 == candidate.0 && iou(&k.2, &candidate.2) > settings.iou_threshold);
        if !overlaps {
            kept.push(candidate);
        }
    }
    Ok(kept
        .into_iter()
        .map(|(class_id, score, bbox)| Detection {
            label: labels.label(class_id),
            class_id,
            score,
            bbox: geometry.to_original(bbox),
        })
        .collect())
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes.
fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(layout: DetectionLayout) -> Settings {
        Settings {
            layout,
            score_threshold: 0.25,
            iou_threshold: 0.5,
            max_detections: 10,
        }
    }

    #[test]
    fn yolov8_rows_are_scored_suppressed_and_mapped_back_through_the_letterbox() {
        // Three anchors, two classes; attributes as rows: cx, cy, w, h, class0, class1.
        // Anchors 0 and 1 overlap heavily (same class): only the better stays. Anchor 2 is
        // under the threshold.
        let rows: [[f32; 3]; 6] = [
            [50.0, 52.0, 10.0],
            [50.0, 50.0, 10.0],
            [20.0, 20.0, 4.0],
            [20.0, 20.0, 4.0],
            [0.9, 0.8, 0.1],
            [0.0, 0.1, 0.2],
        ];
        let data: Vec<f32> = rows.concat();
        // A 200x100 original letterboxed into 100x100: scale 0.5, 25 px bars top and bottom.
        let geometry = Geometry {
            original_width: 200,
            original_height: 100,
            scale_x: 0.5,
            scale_y: 0.5,
            offset_x: 0.0,
            offset_y: 25.0,
        };
        let labels = Labels::from([(0, "a".to_string())]);
        let found = decode(
            &data,
            &[1, 6, 3],
            settings(DetectionLayout::AttributesFirst),
            &geometry,
            &labels,
        )
        .expect("decodes");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].label.as_str(), found[0].score), ("a", 0.9));
        assert_eq!(found[0].bbox, [80.0, 30.0, 120.0, 70.0]);
    }

    #[test]
    fn yolov5_rows_multiply_objectness_and_keep_other_classes_apart() {
        // Two identical boxes of different classes both survive class-wise suppression.
        let data = [
            10.0, 10.0, 4.0, 4.0, 0.9, 0.9, 0.1, //
            10.0, 10.0, 4.0, 4.0, 0.8, 0.2, 0.9, //
            10.0, 10.0, 4.0, 4.0, 0.1, 0.9, 0.9,
        ];
        let found = decode(
            &data,
            &[1, 3, 7],
            settings(DetectionLayout::AnchorsFirst),
            &Geometry::identity(20, 20),
            &Labels::new(),
        )
        .expect("decodes");
        let classes: Vec<u32> = found.iter().map(|d| d.class_id).collect();
        assert_eq!(classes, [0, 1]);
        assert!((found[0].score - 0.81).abs() < 1e-6);
        assert_eq!(found[0].bbox, [8.0, 8.0, 12.0, 12.0]);
        assert!(
            decode(
                &data,
                &[1, 7, 3],
                settings(DetectionLayout::AnchorsFirst),
                &Geometry::identity(1, 1),
                &Labels::new()
            )
            .is_err()
        );
    }
}
