//! The numbers drift bins, read straight from a tensor's typed elements:
//! one pass over the data per tensor, computing only what the spec asks
//! for, with no copy of the tensor as f64 (a camera frame is millions of
//! elements, and this runs on every request).

use half::f16;

use crate::tensor::TensorData;

/// An element read as f64 (booleans as 0 and 1, as
/// [`TensorData::to_f64`] reads them).
trait AsF64: Copy {
    fn as_f64(self) -> f64;
}

macro_rules! lossless_as_f64 {
    ($($t:ty),*) => {$(
        impl AsF64 for $t {
            fn as_f64(self) -> f64 {
                f64::from(self)
            }
        }
    )*};
}

lossless_as_f64!(u8, u16, u32, i8, i16, i32, f32, f64);

impl AsF64 for u64 {
    fn as_f64(self) -> f64 {
        // Rounds above 2^53; drift statistics need no more precision.
        self as f64
    }
}

impl AsF64 for i64 {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl AsF64 for f16 {
    fn as_f64(self) -> f64 {
        self.to_f64()
    }
}

impl AsF64 for bool {
    fn as_f64(self) -> f64 {
        f64::from(u8::from(self))
    }
}

/// Runs `$body` with `$v` bound to the typed element slice of `$data`,
/// whatever its datatype.
macro_rules! with_elements {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => $body,
            TensorData::Uint8($v) => $body,
            TensorData::Uint16($v) => $body,
            TensorData::Uint32($v) => $body,
            TensorData::Uint64($v) => $body,
            TensorData::Int8($v) => $body,
            TensorData::Int16($v) => $body,
            TensorData::Int32($v) => $body,
            TensorData::Int64($v) => $body,
            TensorData::Fp16($v) => $body,
            TensorData::Fp32($v) => $body,
            TensorData::Fp64($v) => $body,
        }
    };
}

/// Which whole-tensor statistics one pass computes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Needs {
    /// For the mean (and the standard deviation).
    pub sum: bool,
    /// For the standard deviation.
    pub squares: bool,
    pub min: bool,
    /// For the maximum and the index of its first occurrence.
    pub max: bool,
}

impl Needs {
    pub fn any(self) -> bool {
        self.sum || self.squares || self.min || self.max
    }
}

/// Whole-tensor statistics of one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Summary {
    count: usize,
    /// The first element: the sums are of differences from it, so the
    /// variance of large values close together does not cancel away.
    shift: f64,
    sum: f64,
    squares: f64,
    min: f64,
    max: f64,
    argmax: Option<usize>,
}

impl Summary {
    /// One pass over `data`, computing what `needs` names.
    pub fn of(data: &TensorData, needs: Needs) -> Self {
        with_elements!(data, v => summarize(v, needs))
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.shift + self.sum / self.count as f64)
    }

    /// The population standard deviation.
    pub fn std(&self) -> Option<f64> {
        (self.count > 0).then(|| {
            let n = self.count as f64;
            ((self.squares - self.sum * self.sum / n) / n)
                .max(0.0)
                .sqrt()
        })
    }

    /// The smallest element, ignoring NaN.
    pub fn min(&self) -> Option<f64> {
        (self.min < f64::INFINITY).then_some(self.min)
    }

    /// The largest element, ignoring NaN.
    pub fn max(&self) -> Option<f64> {
        self.argmax.map(|_| self.max)
    }

    /// Where the largest element first occurs, in row-major order.
    pub fn argmax(&self) -> Option<f64> {
        self.argmax.map(|i| i as f64)
    }
}

fn summarize<T: AsF64>(values: &[T], needs: Needs) -> Summary {
    let shift = values.first().map_or(0.0, |x| x.as_f64());
    let (mut sum, mut squares) = (0.0, 0.0);
    let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut argmax = None;
    for (i, x) in values.iter().enumerate() {
        let x = x.as_f64();
        if needs.sum || needs.squares {
            let d = x - shift;
            sum += d;
            if needs.squares {
                squares += d * d;
            }
        }
        if needs.min && x < min {
            min = x;
        }
        if needs.max && (x > max || (argmax.is_none() && x == max)) {
            max = x;
            argmax = Some(i);
        }
    }
    Summary {
        count: values.len(),
        shift,
        sum,
        squares,
        min,
        max,
        argmax,
    }
}

/// The largest element of one row and its index in the row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RowMax {
    pub index: usize,
    pub value: f64,
}

/// The largest element of each row of `row_len` elements (a classifier's
/// class and score per batch row), in order. A row of only NaN has none.
pub(super) fn row_maxima(data: &TensorData, row_len: usize) -> Vec<Option<RowMax>> {
    if row_len == 0 {
        return Vec::new();
    }
    with_elements!(data, v => v.chunks(row_len).map(row_max).collect())
}

fn row_max<T: AsF64>(row: &[T]) -> Option<RowMax> {
    let mut best: Option<RowMax> = None;
    for (index, x) in row.iter().enumerate() {
        let value = x.as_f64();
        let better = match best {
            Some(b) => value > b.value,
            None => !value.is_nan(),
        };
        if better {
            best = Some(RowMax { index, value });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Needs = Needs {
        sum: true,
        squares: true,
        min: true,
        max: true,
    };

    #[test]
    fn summaries_match_a_direct_computation_for_every_datatype() {
        let values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0];
        let mean = values.iter().sum::<f64>() / 8.0;
        let std = (values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 8.0).sqrt();
        for &dt in crate::tensor::DataType::ALL {
            if dt == crate::tensor::DataType::Bool {
                continue;
            }
            let s = Summary::of(&TensorData::from_f64(dt, &values), ALL);
            assert!((s.mean().unwrap() - mean).abs() < 1e-12, "{dt}");
            assert!((s.std().unwrap() - std).abs() < 1e-12, "{dt}");
            assert_eq!(
                (s.min(), s.max(), s.argmax()),
                (Some(1.0), Some(9.0), Some(5.0))
            );
        }
        let s = Summary::of(&TensorData::Bool(vec![false, true, true, false]), ALL);
        assert_eq!(
            (s.mean(), s.std(), s.argmax()),
            (Some(0.5), Some(0.5), Some(1.0))
        );
    }

    #[test]
    fn large_values_close_together_keep_their_spread() {
        let values: Vec<f64> = (0..1000).map(|i| 1e9 + (i % 2) as f64).collect();
        let s = Summary::of(&TensorData::Fp64(values), ALL);
        assert!((s.std().unwrap() - 0.5).abs() < 1e-9, "{:?}", s.std());
    }

    #[test]
    fn only_what_is_needed_is_computed_and_empty_or_nan_tensors_give_nothing() {
        let data = TensorData::Fp32(vec![2.0, -1.0, 7.0]);
        let min_only = Summary::of(
            &data,
            Needs {
                min: true,
                ..Needs::default()
            },
        );
        assert_eq!((min_only.min(), min_only.max()), (Some(-1.0), None));
        let empty = Summary::of(&TensorData::Fp32(vec![]), ALL);
        assert_eq!(
            (empty.mean(), empty.std(), empty.min(), empty.max()),
            (None, None, None, None)
        );
        let nan = Summary::of(&TensorData::Fp32(vec![f32::NAN, f32::NAN]), ALL);
        assert!(nan.mean().unwrap().is_nan());
        assert_eq!((nan.min(), nan.max(), nan.argmax()), (None, None, None));
        // NaN elements are passed over by the extremes.
        let some = Summary::of(&TensorData::Fp32(vec![f32::NAN, 3.0, -2.0]), ALL);
        assert_eq!(
            (some.min(), some.max(), some.argmax()),
            (Some(-2.0), Some(3.0), Some(1.0))
        );
    }

    #[test]
    fn row_maxima_take_the_first_largest_element_of_each_row() {
        let data = TensorData::Fp32(vec![0.1, 0.7, 0.7, 0.2, f32::NAN, 0.3, 0.5, 0.1, f32::NAN]);
        let rows = row_maxima(&data, 3);
        assert_eq!(
            rows,
            vec![
                Some(RowMax {
                    index: 1,
                    value: f64::from(0.7f32)
                }),
                Some(RowMax {
                    index: 2,
                    value: f64::from(0.3f32)
                }),
                Some(RowMax {
                    index: 0,
                    value: 0.5
                }),
            ]
        );
        assert_eq!(
            row_maxima(&TensorData::Fp32(vec![f32::NAN; 2]), 2),
            vec![None]
        );
        assert!(row_maxima(&data, 0).is_empty());
    }
}
