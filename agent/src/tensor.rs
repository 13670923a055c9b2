//! Runtime-independent tensors: what the local API decodes requests into
//! and what every engine takes and returns.
//!
//! Datatype names are the Open Inference Protocol's (`FP32`, `INT64`, ...).

use std::fmt;
use std::str::FromStr;

use serde_json::Value;

/// Element types the agent moves between clients and engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp32,
    Fp64,
}

impl DataType {
    pub const ALL: [DataType; 8] = [
        Self::Bool,
        Self::Uint8,
        Self::Int8,
        Self::Int16,
        Self::Int32,
        Self::Int64,
        Self::Fp32,
        Self::Fp64,
    ];

    /// The Open Inference Protocol name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::Uint8 => "UINT8",
            Self::Int8 => "INT8",
            Self::Int16 => "INT16",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DataType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|d| d.as_str()).collect();
                format!(
                    "unsupported datatype {s:?} (supported: {})",
                    known.join(", ")
                )
            })
    }
}

/// A tensor's elements, one variant per [`DataType`].
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Int8(Vec<i8>),
    Int16(Vec<i16>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
}

impl TensorData {
    pub fn datatype(&self) -> DataType {
        match self {
            Self::Bool(_) => DataType::Bool,
            Self::Uint8(_) => DataType::Uint8,
            Self::Int8(_) => DataType::Int8,
            Self::Int16(_) => DataType::Int16,
            Self::Int32(_) => DataType::Int32,
            Self::Int64(_) => DataType::Int64,
            Self::Fp32(_) => DataType::Fp32,
            Self::Fp64(_) => DataType::Fp64,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Bool(v) => v.len(),
            Self::Uint8(v) => v.len(),
            Self::Int8(v) => v.len(),
            Self::Int16(v) => v.len(),
            Self::Int32(v) => v.len(),
            Self::Int64(v) => v.len(),
            Self::Fp32(v) => v.len(),
            Self::Fp64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element as f64 (booleans as 0/1), for tolerance comparisons.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Self::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
            Self::Uint8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Int8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Int16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Int32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Int64(v) => v.iter().map(|&x| x as f64).collect(),
            Self::Fp32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Fp64(v) => v.clone(),
        }
    }

    /// Builds data of `datatype` from f64 values (used for signed test
    /// vectors, whose numbers are JSON).
    pub fn from_f64(datatype: DataType, values: &[f64]) -> Self {
        match datatype {
            DataType::Bool => Self::Bool(values.iter().map(|&x| x != 0.0).collect()),
            DataType::Uint8 => Self::Uint8(values.iter().map(|&x| x as u8).collect()),
            DataType::Int8 => Self::Int8(values.iter().map(|&x| x as i8).collect()),
            DataType::Int16 => Self::Int16(values.iter().map(|&x| x as i16).collect()),
            DataType::Int32 => Self::Int32(values.iter().map(|&x| x as i32).collect()),
            DataType::Int64 => Self::Int64(values.iter().map(|&x| x as i64).collect()),
            DataType::Fp32 => Self::Fp32(values.iter().map(|&x| x as f32).collect()),
            DataType::Fp64 => Self::Fp64(values.to_vec()),
        }
    }

    /// JSON numbers (or booleans) for the response body.
    pub fn to_json(&self) -> Value {
        fn arr<T: Into<Value> + Copy>(v: &[T]) -> Value {
            Value::Array(v.iter().map(|&x| x.into()).collect())
        }
        match self {
            Self::Bool(v) => arr(v),
            Self::Uint8(v) => arr(v),
            Self::Int8(v) => arr(v),
            Self::Int16(v) => arr(v),
            Self::Int32(v) => arr(v),
            Self::Int64(v) => arr(v),
            // Non-finite floats have no JSON form; they become null, which
            // clients can detect (the binary extension carries them as-is).
            Self::Fp32(v) => Value::Array(v.iter().map(|&x| Value::from(f64::from(x))).collect()),
            Self::Fp64(v) => arr(v),
        }
    }
}

/// Why JSON `data` could not become a tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("element {index} of input {input:?} is {found}, expected {expected}")]
    BadElement {
        input: String,
        index: usize,
        found: String,
        expected: &'static str,
    },
    #[error("element {index} of input {input:?} ({value}) is out of range for {datatype}")]
    OutOfRange {
        input: String,
        index: usize,
        value: String,
        datatype: DataType,
    },
}

/// Flattens row-major nested (or already flat) JSON arrays into typed data.
pub fn decode_json_data(
    input: &str,
    datatype: DataType,
    data: &Value,
) -> Result<TensorData, DecodeError> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let bad = |index: usize, v: &Value, expected: &'static str| DecodeError::BadElement {
        input: input.to_string(),
        index,
        found: describe(v),
        expected,
    };
    let range = |index: usize, v: &Value| DecodeError::OutOfRange {
        input: input.to_string(),
        index,
        value: v.to_string(),
        datatype,
    };
    macro_rules! ints {
        ($variant:ident, $t:ty) => {{
            let mut out = Vec::with_capacity(flat.len());
            for (i, v) in flat.iter().enumerate() {
                let n = v.as_i64().ok_or_else(|| {
                    if v.is_number() {
                        range(i, v)
                    } else {
                        bad(i, v, "an integer")
                    }
                })?;
                out.push(<$t>::try_from(n).map_err(|_| range(i, v))?);
            }
            TensorData::$variant(out)
        }};
    }
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(
            flat.iter()
                .enumerate()
                .map(|(i, v)| v.as_bool().ok_or_else(|| bad(i, v, "true or false")))
                .collect::<Result<_, _>>()?,
        ),
        DataType::Uint8 => ints!(Uint8, u8),
        DataType::Int8 => ints!(Int8, i8),
        DataType::Int16 => ints!(Int16, i16),
        DataType::Int32 => ints!(Int32, i32),
        DataType::Int64 => ints!(Int64, i64),
        DataType::Fp32 => TensorData::Fp32(
            flat.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_f64()
                        .map(|x| x as f32)
                        .ok_or_else(|| bad(i, v, "a number"))
                })
                .collect::<Result<_, _>>()?,
        ),
        DataType::Fp64 => TensorData::Fp64(
            flat.iter()
                .enumerate()
                .map(|(i, v)| v.as_f64().ok_or_else(|| bad(i, v, "a number")))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|v| flatten(v, out)),
        other => out.push(other),
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// A named tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

impl Tensor {
    pub fn element_count(shape: &[usize]) -> Option<usize> {
        shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_and_flat_data_decode_the_same() {
        let nested = decode_json_data("x", DataType::Fp32, &json!([[1, 2.5], [3, 4]])).unwrap();
        let flat = decode_json_data("x", DataType::Fp32, &json!([1, 2.5, 3, 4])).unwrap();
        assert_eq!(nested, flat);
        assert_eq!(nested, TensorData::Fp32(vec![1.0, 2.5, 3.0, 4.0]));
    }

    #[test]
    fn integers_are_range_checked() {
        assert_eq!(
            decode_json_data("x", DataType::Uint8, &json!([0, 255])).unwrap(),
            TensorData::Uint8(vec![0, 255])
        );
        let err = decode_json_data("x", DataType::Uint8, &json!([0, 256])).unwrap_err();
        assert!(
            matches!(err, DecodeError::OutOfRange { index: 1, .. }),
            "{err}"
        );
        let err = decode_json_data("x", DataType::Int8, &json!([1.5])).unwrap_err();
        assert!(
            matches!(err, DecodeError::OutOfRange { index: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn wrong_element_types_name_the_problem() {
        let err = decode_json_data("pixels", DataType::Fp32, &json!([1, "two"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "element 1 of input \"pixels\" is the string \"two\", expected a number"
        );
        let err = decode_json_data("m", DataType::Bool, &json!([true, 1])).unwrap_err();
        assert!(err.to_string().contains("expected true or false"));
    }

    #[test]
    fn datatype_names_round_trip() {
        for dt in DataType::ALL {
            assert_eq!(dt.as_str().parse::<DataType>().unwrap(), dt);
        }
        assert!("FP128"
            .parse::<DataType>()
            .unwrap_err()
            .contains("supported"));
    }

    #[test]
    fn f64_conversion_round_trips_for_each_type() {
        let values = [0.0, 1.0, 3.0];
        for dt in DataType::ALL {
            let data = TensorData::from_f64(dt, &values);
            assert_eq!(data.datatype(), dt);
            let expected: Vec<f64> = if dt == DataType::Bool {
                vec![0.0, 1.0, 1.0]
            } else {
                values.to_vec()
            };
            assert_eq!(data.to_f64(), expected);
        }
    }
}
