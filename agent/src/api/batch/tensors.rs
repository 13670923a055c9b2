//! Merging requests' inputs into one batch along the first dimension and
//! splitting the batch's outputs back, row-major, without I/O.

use crate::engine::IoSpec;
use crate::tensor::{DataType, Tensor, TensorData};

/// What two requests must share to be merged: for each input (in the
/// model's order), its datatype and every dimension after the first.
pub type Key = Vec<(DataType, Vec<usize>)>;

/// Why a batch's outputs cannot be split back per request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("output {name:?} has shape {shape:?}, whose first dimension is not the batch's {rows} rows; the model does not keep the batch dimension")]
    NotBatched {
        name: String,
        shape: Vec<usize>,
        rows: usize,
    },
}

/// Whether the model declares a batch dimension: every input's first
/// dimension is dynamic.
pub fn model_batches(inputs: &[IoSpec]) -> bool {
    !inputs.is_empty()
        && inputs
            .iter()
            .all(|spec| spec.shape.first().is_some_and(Option::is_none))
}

/// The merge key and row count of validated inputs (in the model's
/// order); `None` when they cannot join a batch (an input without
/// dimensions, inputs that disagree on their first dimension, no rows).
pub fn key_and_rows(inputs: &[Tensor]) -> Option<(Key, usize)> {
    let rows = *inputs.first()?.shape.first()?;
    if rows == 0 {
        return None;
    }
    let mut key = Vec::with_capacity(inputs.len());
    for tensor in inputs {
        let (&first, rest) = tensor.shape.split_first()?;
        if first != rows {
            return None;
        }
        key.push((tensor.data.datatype(), rest.to_vec()));
    }
    Some((key, rows))
}

/// Calls `$m!(Variant, ...)` with every [`TensorData`] variant.
macro_rules! each_variant {
    ($m:ident) => {
        $m!(Bool, Uint8, Uint16, Uint32, Uint64, Int8, Int16, Int32, Int64, Fp16, Fp32, Fp64)
    };
}

/// The elements of `parts` one after the other; `None` if their
/// datatypes differ.
fn concat(parts: &[&TensorData]) -> Option<TensorData> {
    let first = parts.first()?;
    let total = parts.iter().map(|p| p.len()).sum();
    macro_rules! cat {
        ($($v:ident),*) => {
            match first {
                $(TensorData::$v(_) => {
                    let mut out = Vec::with_capacity(total);
                    for part in parts {
                        match part {
                            TensorData::$v(values) => out.extend_from_slice(values),
                            _ => return None,
                        }
                    }
                    TensorData::$v(out)
                })*
            }
        };
    }
    Some(each_variant!(cat))
}

/// `data` cut into consecutive pieces of `lens` elements (which sum to
/// its length).
fn cut(data: &TensorData, lens: &[usize]) -> Vec<TensorData> {
    macro_rules! pieces {
        ($($v:ident),*) => {
            match data {
                $(TensorData::$v(values) => {
                    let mut start = 0;
                    lens.iter()
                        .map(|&len| {
                            let end = (start + len).min(values.len());
                            let piece = TensorData::$v(values[start.min(end)..end].to_vec());
                            start = end;
                            piece
                        })
                        .collect()
                })*
            }
        };
    }
    each_variant!(pieces)
}

/// The requests' inputs (each validated, in the model's order, all with
/// the same [`Key`]) concatenated along their first dimension; `None` if
/// they do not share a key after all.
pub fn merge(requests: &[&[Tensor]]) -> Option<Vec<Tensor>> {
    let first = requests.first()?;
    let key = key_and_rows(first)?.0;
    let mut rows = 0;
    for request in requests {
        let (other, n) = key_and_rows(request)?;
        if other != key {
            return None;
        }
        rows += n;
    }
    first
        .iter()
        .enumerate()
        .map(|(index, spec)| {
            let parts: Vec<&TensorData> = requests.iter().map(|r| &r[index].data).collect();
            let mut shape = spec.shape.clone();
            shape[0] = rows;
            Some(Tensor {
                name: spec.name.clone(),
                shape,
                data: concat(&parts)?,
            })
        })
        .collect()
}

/// `merged` (inputs of `rows` rows) grown to `to` rows with copies of its
/// first row. tract plans a model per input shape and keeps a few plans:
/// batches of any size would keep it planning, batches padded to a power
/// of two come in a handful of shapes. The padding rows' outputs are cut
/// off again (see [`split`]); they cost compute, not correctness, for a
/// model that treats rows independently (what batching requires anyway).
pub fn pad(merged: Vec<Tensor>, rows: usize, to: usize) -> Vec<Tensor> {
    if to <= rows || rows == 0 {
        return merged;
    }
    merged
        .into_iter()
        .map(|t| {
            let per_row = t.data.len() / rows;
            let first = cut(&t.data, &[per_row]).remove(0);
            let mut parts = vec![&t.data];
            parts.extend(std::iter::repeat_n(&first, to - rows));
            match concat(&parts) {
                Some(data) => {
                    let mut shape = t.shape.clone();
                    shape[0] = to;
                    Tensor {
                        name: t.name,
                        shape,
                        data,
                    }
                }
                None => t,
            }
        })
        .collect()
}

/// A batch's outputs cut back into each request's share: `rows[i]` rows
/// of every output for request `i`, in order.
pub fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, SplitError> {
    let total: usize = rows.iter().sum();
    let mut per_request: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in outputs {
        let not_batched = || SplitError::NotBatched {
            name: output.name.clone(),
            shape: output.shape.clone(),
            rows: total,
        };
        if output.shape.first() != Some(&total) || output.data.len() % total.max(1) != 0 {
            return Err(not_batched());
        }
        let per_row = output.data.len() / total.max(1);
        let lens: Vec<usize> = rows.iter().map(|r| r * per_row).collect();
        for ((piece, &n), request) in cut(&output.data, &lens)
            .into_iter()
            .zip(rows)
            .zip(&mut per_request)
        {
            let mut shape = output.shape.clone();
            shape[0] = n;
            request.push(Tensor {
                name: output.name.clone(),
                shape,
                data: piece,
            });
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp32(name: &str, shape: Vec<usize>, values: Vec<f32>) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            data: TensorData::Fp32(values),
        }
    }

    #[test]
    fn only_models_whose_every_input_has_a_dynamic_first_dimension_batch() {
        let spec = |shape: Vec<Option<usize>>| IoSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape,
        };
        assert!(model_batches(&[spec(vec![None, Some(3)])]));
        assert!(!model_batches(&[spec(vec![Some(1), Some(3)])]));
        assert!(!model_batches(&[spec(vec![None]), spec(vec![])]));
        assert!(!model_batches(&[]));
    }

    #[test]
    fn requests_merge_along_the_first_dimension_and_split_back() {
        let a = vec![
            fp32("x", vec![1, 2], vec![1.0, 2.0]),
            Tensor {
                name: "k".into(),
                shape: vec![1],
                data: TensorData::Int64(vec![7]),
            },
        ];
        let b = vec![
            fp32("x", vec![2, 2], vec![3.0, 4.0, 5.0, 6.0]),
            Tensor {
                name: "k".into(),
                shape: vec![2],
                data: TensorData::Int64(vec![8, 9]),
            },
        ];
        assert_eq!(key_and_rows(&a).unwrap().1, 1);
        assert_eq!(key_and_rows(&a).unwrap().0, key_and_rows(&b).unwrap().0);
        let merged = merge(&[&a, &b]).unwrap();
        assert_eq!(merged[0].shape, vec![3, 2]);
        assert_eq!(
            merged[0].data,
            TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
        assert_eq!(merged[1].data, TensorData::Int64(vec![7, 8, 9]));
        // The merged inputs, as a row-wise model would answer them.
        let back = split(merged.clone(), &[1, 2]).unwrap();
        assert_eq!(back, vec![a.clone(), b.clone()]);
        // Padded to 4 rows with copies of the first; the padding's
        // answers are cut off as a request of their own.
        let padded = pad(merged.clone(), 3, 4);
        assert_eq!(padded[0].shape, vec![4, 2]);
        assert_eq!(
            padded[0].data,
            TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 2.0])
        );
        assert_eq!(padded[1].data, TensorData::Int64(vec![7, 8, 9, 7]));
        let back = split(padded, &[1, 2, 1]).unwrap();
        assert_eq!(back[..2], [a, b]);
        assert_eq!(pad(merged.clone(), 3, 3), merged);
    }

    #[test]
    fn shapes_that_cannot_merge_are_told_apart() {
        let a = vec![fp32("x", vec![1, 2], vec![0.0; 2])];
        let wider = vec![fp32("x", vec![1, 3], vec![0.0; 3])];
        assert_ne!(key_and_rows(&a).unwrap().0, key_and_rows(&wider).unwrap().0);
        assert_eq!(merge(&[&a, &wider]), None);
        // Inputs disagreeing on their rows, no rows, a scalar.
        let disagree = vec![
            fp32("x", vec![1, 2], vec![0.0; 2]),
            fp32("y", vec![2, 2], vec![0.0; 4]),
        ];
        assert_eq!(key_and_rows(&disagree), None);
        assert_eq!(key_and_rows(&[fp32("x", vec![0, 2], vec![])]), None);
        assert_eq!(key_and_rows(&[fp32("x", vec![], vec![1.0])]), None);
        let mut int = a.clone();
        int[0].data = TensorData::Int32(vec![0; 2]);
        assert_ne!(key_and_rows(&a).unwrap().0, key_and_rows(&int).unwrap().0);
    }

    #[test]
    fn outputs_without_the_batch_dimension_are_refused() {
        // A model that reduced over the rows answers one row for three.
        let err = split(vec![fp32("y", vec![1, 2], vec![0.0; 2])], &[1, 2]).unwrap_err();
        assert!(err.to_string().contains("\"y\""), "{err}");
        assert!(split(vec![fp32("y", vec![], vec![0.0])], &[1]).is_err());
    }
}
