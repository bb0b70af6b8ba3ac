//! The `classification` output processor: class scores `[rows, C]` -> per row the top-k
//! classes, best first, after an optional softmax (for models that give logits).

use ember_core::protocol::Class;

use super::Labels;
use crate::Error;

/// The top `k` classes of each of `rows` rows of `scores`.
pub fn top_k(
    scores: &[f32],
    rows: usize,
    k: usize,
    softmax: bool,
    labels: &Labels,
) -> Result<Vec<Vec<Class>>, Error> {
    if rows == 0 || !scores.len().is_multiple_of(rows) {
        return Err(Error::Model(format!(
            "{} class scores do not split into {rows} rows",
            scores.len()
        )));
    }
    let classes = scores.len() / rows;
    let mut out = Vec::with_capacity(rows);
    let mut row_scores = Vec::with_capacity(classes);
    for row in scores.chunks_exact(classes) {
        row_scores.clear();
        row_scores.extend_from_slice(row);
        if softmax {
            let max = row_scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for v in &mut row_scores {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in &mut row_scores {
                *v /= sum;
            }
        }
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| row_scores[b].total_cmp(&row_scores[a]).then(a.cmp(&b)));
        out.push(
            order
                .into_iter()
                .take(k)
                .map(|i| {
                    let class_id = i as u32;
                    Class {
                        label: labels.label(class_id),
                        class_id,
                        score: row_scores[i],
                    }
                })
                .collect(),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_gets_its_top_k_best_first() {
        let labels = Labels::from([(0, "cat".to_string()), (2, "dog".to_string())]);
        let scores = [0.1, 0.2, 0.7, 0.6, 0.3, 0.1];
        let top = top_k(&scores, 2, 2, false, &labels).expect("ranks");
        assert_eq!(top.len(), 2);
        assert_eq!((top[0][0].label.as_str(), top[0][0].score), ("dog", 0.7));
        assert_eq!(top[0][1].label, "class_1");
        assert_eq!((top[1][0].label.as_str(), top[1].len()), ("cat", 2));
        assert!(top_k(&scores, 4, 1, false, &labels).is_err());
    }

    #[test]
    fn softmax_turns_logits_into_probabilities() {
        let top = top_k(&[0.0, (3.0f32).ln()], 1, 2, true, &Labels::new()).expect("ranks");
        assert_eq!(top[0][0].class_id, 1);
        assert!((top[0][0].score - 0.75).abs() < 1e-6);
        assert!((top[0][1].score - 0.25).abs() < 1e-6);
    }
}
