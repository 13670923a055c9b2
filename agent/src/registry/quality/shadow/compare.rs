//! Comparing one output of a shadow candidate with the served version's
//! output for the same request, as the slot's [`Comparison`] says.
//!
//! Pure functions over tensors: the shadow worker calls them after the
//! candidate ran, and the unit tests check each kind on hand-made
//! tensors.

use edgefleet_shared::quality::Comparison;

use crate::tensor::Tensor;

/// What comparing one output found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compared {
    /// Whether the candidate's output passes the comparison.
    pub agreed: bool,
    /// The largest absolute difference of any element (`None` when the
    /// shapes differ and no element pairs up).
    pub max_abs: Option<f64>,
    /// The cosine similarity of the flattened outputs, for
    /// [`Comparison::Cosine`] only.
    pub cosine: Option<f64>,
}

/// Compares `candidate` with `served` (the same output of both versions).
/// Outputs of different shapes never agree: a candidate that answers in
/// another shape would break the clients of the served version.
pub fn compare(comparison: Comparison, candidate: &Tensor, served: &Tensor) -> Compared {
    if candidate.shape != served.shape || candidate.data.len() != served.data.len() {
        return Compared {
            agreed: false,
            max_abs: None,
            cosine: None,
        };
    }
    let (c, s) = (candidate.data.to_f64(), served.data.to_f64());
    let max_abs = c
        .iter()
        .zip(&s)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, |m, d| {
            if m.is_nan() || d.is_nan() {
                f64::NAN
            } else {
                m.max(d)
            }
        });
    let max_abs = Some(max_abs);
    match comparison {
        Comparison::Top1 => Compared {
            agreed: top1_rows_agree(&c, &s, served.shape.last().copied().unwrap_or(1)),
            max_abs,
            cosine: None,
        },
        Comparison::MaxAbs { limit } => Compared {
            // A NaN difference is never within a limit.
            agreed: max_abs.is_some_and(|m| m <= limit),
            max_abs,
            cosine: None,
        },
        Comparison::MaxRel { limit } => Compared {
            agreed: c.iter().zip(&s).all(|(a, b)| {
                let allowed = if b.abs() > 1.0 {
                    limit * b.abs()
                } else {
                    limit
                };
                (a - b).abs() <= allowed
            }),
            max_abs,
            cosine: None,
        },
        Comparison::Cosine { min } => {
            let cosine = cosine(&c, &s);
            Compared {
                agreed: cosine >= min,
                max_abs,
                cosine: Some(cosine),
            }
        }
    }
}

/// Whether every row (a run of `row` elements along the last axis) has its
/// largest element at the same index in both. A batch of classifications
/// agrees only when every item does.
fn top1_rows_agree(candidate: &[f64], served: &[f64], row: usize) -> bool {
    let row = row.max(1);
    candidate
        .chunks(row)
        .zip(served.chunks(row))
        .all(|(c, s)| argmax(c) == argmax(s))
}

/// The index of the first largest element; NaN counts as smaller than
/// any number.
fn argmax(values: &[f64]) -> Option<usize> {
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .fold(None, |best: Option<(usize, f64)>, (i, &v)| match best {
            Some((_, b)) if b >= v => best,
            _ => Some((i, v)),
        })
        .map(|(i, _)| i)
}

/// The cosine similarity of two vectors of equal length: 1 for two zero
/// vectors (identical), 0 when only one is zero.
fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let (na, nb) = (
        a.iter().map(|x| x * x).sum::<f64>().sqrt(),
        b.iter().map(|x| x * x).sum::<f64>().sqrt(),
    );
    match (na == 0.0, nb == 0.0) {
        (true, true) => 1.0,
        (true, false) | (false, true) => 0.0,
        _ => (dot / (na * nb)).clamp(-1.0, 1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorData;

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor {
            name: "y".into(),
            shape: shape.to_vec(),
            data: TensorData::Fp32(v.to_vec()),
        }
    }

    #[test]
    fn top1_compares_the_class_of_every_row_of_a_batch() {
        let served = t(&[2, 3], &[0.1, 0.7, 0.2, 0.5, 0.3, 0.2]);
        let same = t(&[2, 3], &[0.2, 0.5, 0.3, 0.6, 0.1, 0.3]);
        let r = compare(Comparison::Top1, &same, &served);
        assert!(r.agreed);
        assert!((r.max_abs.unwrap() - 0.2).abs() < 1e-6, "{r:?}");
        // Only the second row's class differs: the request disagrees.
        let second_row_differs = t(&[2, 3], &[0.1, 0.7, 0.2, 0.2, 0.3, 0.5]);
        assert!(!compare(Comparison::Top1, &second_row_differs, &served).agreed);
        // Row-wise, not over the flattened batch: the overall maximum is
        // in the same place here, yet the second row's class differs.
        let flat_same = t(&[2, 3], &[0.1, 0.9, 0.0, 0.1, 0.5, 0.4]);
        assert!(!compare(Comparison::Top1, &flat_same, &served).agreed);
        // Another shape never agrees.
        assert!(
            !compare(
                Comparison::Top1,
                &t(&[6], &[0.1, 0.7, 0.2, 0.5, 0.3, 0.2]),
                &served
            )
            .agreed
        );
    }

    #[test]
    fn max_abs_holds_every_element_to_the_limit() {
        let served = t(&[3], &[1.0, -2.0, 3.0]);
        let close = t(&[3], &[1.05, -2.0, 2.97]);
        let limit = |limit| Comparison::MaxAbs { limit };
        let r = compare(limit(0.06), &close, &served);
        assert!(r.agreed);
        assert!((r.max_abs.unwrap() - 0.05).abs() < 1e-6);
        assert!(!compare(limit(0.04), &close, &served).agreed);
        let nan = t(&[3], &[f32::NAN, -2.0, 3.0]);
        assert!(!compare(limit(10.0), &nan, &served).agreed);
    }

    #[test]
    fn max_rel_scales_with_the_served_magnitude_and_is_absolute_near_zero() {
        let served = t(&[3], &[100.0, 0.001, -50.0]);
        let rel = Comparison::MaxRel { limit: 0.01 };
        // 0.9 off at 100 is 0.9 %; near zero 0.005 is within 0.01 absolute.
        assert!(compare(rel, &t(&[3], &[100.9, 0.006, -50.4]), &served).agreed);
        // 1.1 off at 100 is 1.1 %.
        assert!(!compare(rel, &t(&[3], &[101.1, 0.001, -50.0]), &served).agreed);
        // Near zero the limit is absolute: 0.02 off is too much.
        assert!(!compare(rel, &t(&[3], &[100.0, 0.021, -50.0]), &served).agreed);
    }

    #[test]
    fn cosine_reports_the_similarity_and_holds_it_to_the_minimum() {
        let served = t(&[1, 3], &[1.0, 0.0, 0.0]);
        let cos = |min| Comparison::Cosine { min };
        let tilted = t(&[1, 3], &[1.0, 1.0, 0.0]);
        let r = compare(cos(0.7), &tilted, &served);
        let expected = std::f64::consts::FRAC_1_SQRT_2;
        assert!((r.cosine.unwrap() - expected).abs() < 1e-9, "{r:?}");
        assert!(r.agreed);
        assert!(!compare(cos(0.71), &tilted, &served).agreed);
        // Scale does not matter; direction does.
        assert_eq!(
            compare(cos(0.999), &t(&[1, 3], &[5.0, 0.0, 0.0]), &served).cosine,
            Some(1.0)
        );
        assert_eq!(
            compare(cos(0.0), &t(&[1, 3], &[-1.0, 0.0, 0.0]), &served).cosine,
            Some(-1.0)
        );
        assert_eq!(
            compare(cos(0.5), &t(&[1, 3], &[0.0; 3]), &served).cosine,
            Some(0.0)
        );
    }
}
