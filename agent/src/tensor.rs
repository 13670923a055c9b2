//! Runtime-independent tensors: what the local API decodes requests into
//! and what every engine takes and returns.
//!
//! Datatype names are the Open Inference Protocol's (`FP32`, `INT64`, ...).
//! Tensors come in two wire forms: JSON numbers (nested or flat, row-major)
//! and raw little-endian bytes (Triton's binary tensor extension).

use std::fmt;
use std::str::FromStr;

use half::f16;
use serde_json::Value;

/// Calls `$m!(Variant, rust_type, "NAME", byte_size)` for every datatype.
macro_rules! for_each_datatype {
    ($m:ident) => {
        $m! {
            (Bool, bool, "BOOL", 1),
            (Uint8, u8, "UINT8", 1),
            (Uint16, u16, "UINT16", 2),
            (Uint32, u32, "UINT32", 4),
            (Uint64, u64, "UINT64", 8),
            (Int8, i8, "INT8", 1),
            (Int16, i16, "INT16", 2),
            (Int32, i32, "INT32", 4),
            (Int64, i64, "INT64", 8),
            (Fp16, f16, "FP16", 2),
            (Fp32, f32, "FP32", 4),
            (Fp64, f64, "FP64", 8)
        }
    };
}

macro_rules! define_types {
    ($(($variant:ident, $t:ty, $name:literal, $size:literal)),*) => {
        /// Element types the agent moves between clients and engines.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum DataType {
            $($variant),*
        }

        impl DataType {
            pub const ALL: &'static [DataType] = &[$(Self::$variant),*];

            /// The Open Inference Protocol name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name),*
                }
            }

            /// Bytes per element in the binary wire form.
            pub fn byte_size(self) -> usize {
                match self {
                    $(Self::$variant => $size),*
                }
            }
        }

        /// A tensor's elements, one variant per [`DataType`].
        #[derive(Debug, Clone, PartialEq)]
        pub enum TensorData {
            $($variant(Vec<$t>)),*
        }

        impl TensorData {
            pub fn datatype(&self) -> DataType {
                match self {
                    $(Self::$variant(_) => DataType::$variant),*
                }
            }

            pub fn len(&self) -> usize {
                match self {
                    $(Self::$variant(v) => v.len()),*
                }
            }

            /// Every element as f64 (booleans as 0/1), for tolerance comparisons.
            pub fn to_f64(&self) -> Vec<f64> {
                match self {
                    $(Self::$variant(v) => v.iter().map(|x| Element::to_f64(*x)).collect()),*
                }
            }

            /// Builds data of `datatype` from f64 values (signed test
            /// vectors carry JSON numbers).
            pub fn from_f64(datatype: DataType, values: &[f64]) -> Self {
                match datatype {
                    $(DataType::$variant => Self::$variant(values.iter().map(|&x| <$t as Element>::from_f64(x)).collect())),*
                }
            }

            /// JSON numbers (or booleans) for a response body.
            pub fn to_json(&self) -> Value {
                match self {
                    $(Self::$variant(v) => Value::Array(v.iter().map(|x| x.to_json()).collect())),*
                }
            }

            /// Raw little-endian bytes (the binary tensor extension).
            pub fn to_le_bytes(&self) -> Vec<u8> {
                let mut out = Vec::with_capacity(self.len() * self.datatype().byte_size());
                match self {
                    $(Self::$variant(v) => v.iter().for_each(|x| x.write_le(&mut out))),*
                }
                out
            }

            /// Parses raw little-endian bytes of `datatype`.
            pub fn from_le_bytes(datatype: DataType, bytes: &[u8]) -> Result<Self, String> {
                let size = datatype.byte_size();
                if bytes.len() % size != 0 {
                    return Err(format!(
                        "{} bytes is not a whole number of {} elements ({size} bytes each)",
                        bytes.len(),
                        datatype
                    ));
                }
                Ok(match datatype {
                    $(DataType::$variant => Self::$variant(
                        bytes.chunks_exact(size).map(<$t as Element>::read_le).collect::<Result<_, _>>()?,
                    )),*
                })
            }

            /// Decodes JSON text (nested or flat arrays) straight into
            /// typed elements, without building a JSON tree first.
            pub fn from_json_text(input: &str, datatype: DataType, text: &str) -> Result<Self, DecodeError> {
                Ok(match datatype {
                    $(DataType::$variant => Self::$variant(parse_flat::<$t>(input, datatype, text)?)),*
                })
            }

        }
    };
}

for_each_datatype!(define_types);

impl TensorData {
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            .iter()
            .copied()
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

/// Why one JSON element does not fit the datatype.
enum Problem {
    WrongKind(&'static str),
    OutOfRange,
}

impl Problem {
    fn at(self, input: &str, index: usize, v: &Value, datatype: DataType) -> DecodeError {
        match self {
            Problem::WrongKind(expected) => DecodeError::BadElement {
                input: input.to_string(),
                index,
                found: describe(v),
                expected,
            },
            Problem::OutOfRange => DecodeError::OutOfRange {
                input: input.to_string(),
                index,
                value: v.to_string(),
                datatype,
            },
        }
    }
}

/// One element type: conversions to and from JSON, f64 and bytes.
trait Element: Sized + Copy {
    fn from_json(v: &Value) -> Result<Self, Problem>;
    fn to_json(self) -> Value;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Result<Self, String>;
}

macro_rules! int_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn from_json(v: &Value) -> Result<Self, Problem> {
                if let Some(n) = v.as_i64() {
                    return <$t>::try_from(n).map_err(|_| Problem::OutOfRange);
                }
                if let Some(n) = v.as_u64() {
                    return <$t>::try_from(n).map_err(|_| Problem::OutOfRange);
                }
                Err(if v.is_number() { Problem::OutOfRange } else { Problem::WrongKind("an integer") })
            }
            fn to_json(self) -> Value {
                Value::from(self)
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Result<Self, String> {
                let array = bytes.try_into().map_err(|_| {
                    format!("expected {} bytes per element, got {}", size_of::<$t>(), bytes.len())
                })?;
                Ok(<$t>::from_le_bytes(array))
            }
        }
    )*};
}

int_element!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Element for bool {
    fn from_json(v: &Value) -> Result<Self, Problem> {
        v.as_bool().ok_or(Problem::WrongKind("true or false"))
    }
    fn to_json(self) -> Value {
        Value::Bool(self)
    }
    fn to_f64(self) -> f64 {
        f64::from(u8::from(self))
    }
    fn from_f64(x: f64) -> Self {
        x != 0.0
    }
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(u8::from(self));
    }
    fn read_le(bytes: &[u8]) -> Result<Self, String> {
        match bytes[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("BOOL byte must be 0 or 1, got {b}")),
        }
    }
}

/// The shortest decimal that reads back as the same value of the
/// element's own precision (`0.1f32` is written `0.1`, not
/// `0.10000000149011612`). Non-finite floats have no JSON form and become
/// null; the binary extension carries them exactly.
fn shortest_json<T: std::fmt::Display>(x: T, finite: bool) -> Value {
    if !finite {
        return Value::Null;
    }
    x.to_string()
        .parse::<f64>()
        .map(Value::from)
        .unwrap_or(Value::Null)
}

macro_rules! float_element {
    ($t:ty, $from:expr, $to:expr) => {
        impl Element for $t {
            fn from_json(v: &Value) -> Result<Self, Problem> {
                v.as_f64().map($from).ok_or(Problem::WrongKind("a number"))
            }
            fn to_json(self) -> Value {
                shortest_json(self, $to(self).is_finite())
            }
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(x: f64) -> Self {
                $from(x)
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Result<Self, String> {
                let array = bytes.try_into().map_err(|_| {
                    format!(
                        "expected {} bytes per element, got {}",
                        size_of::<$t>(),
                        bytes.len()
                    )
                })?;
                Ok(<$t>::from_le_bytes(array))
            }
        }
    };
}

float_element!(f16, f16::from_f64, f16::to_f64);
float_element!(f32, |x: f64| x as f32, f64::from);
float_element!(f64, |x: f64| x, |x: f64| x);

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

/// Parses nested JSON arrays of numbers into a flat `Vec<T>`.
fn parse_flat<T: Element>(
    input: &str,
    datatype: DataType,
    text: &str,
) -> Result<Vec<T>, DecodeError> {
    use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};

    struct Flat<'a, T> {
        out: &'a mut Vec<T>,
        failure: &'a mut Option<(Problem, Value)>,
    }

    impl<'de, T: Element> DeserializeSeed<'de> for Flat<'_, T> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<T: Element> Flat<'_, T> {
        fn push<E: serde::de::Error>(self, v: Value) -> Result<(), E> {
            match T::from_json(&v) {
                Ok(x) => {
                    self.out.push(x);
                    Ok(())
                }
                Err(problem) => {
                    *self.failure = Some((problem, v));
                    Err(E::custom("element rejected"))
                }
            }
        }
    }

    impl<'de, T: Element> Visitor<'de> for Flat<'_, T> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("numbers or nested arrays of numbers")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq
                .next_element_seed(Flat {
                    out: &mut *self.out,
                    failure: &mut *self.failure,
                })?
                .is_some()
            {}
            Ok(())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
            self.push(Value::Bool(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
            self.push(Value::from(v))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
            self.push(Value::from(v))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
            self.push(Value::from(v))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
            self.push(Value::String(v.to_string()))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
            self.push(Value::Null)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
            self.push(Value::Object(Default::default()))
        }
    }

    let mut out = Vec::new();
    let mut failure = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let result = Flat {
        out: &mut out,
        failure: &mut failure,
    }
    .deserialize(&mut de);
    match (result, failure) {
        (Ok(()), _) => Ok(out),
        (Err(_), Some((problem, value))) => Err(problem.at(input, out.len(), &value, datatype)),
        (Err(e), None) => Err(DecodeError::BadElement {
            input: input.to_string(),
            index: out.len(),
            found: format!("invalid JSON ({e})"),
            expected: "numbers",
        }),
    }
}

/// Flattens row-major nested (or already flat) JSON arrays into typed data.
pub fn decode_json_data(
    input: &str,
    datatype: DataType,
    data: &Value,
) -> Result<TensorData, DecodeError> {
    // One decoder for both forms: the typed text decoder the API uses.
    TensorData::from_json_text(input, datatype, &data.to_string())
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
    fn text_decoding_flattens_any_nesting_and_names_bad_elements() {
        assert_eq!(
            TensorData::from_json_text("x", DataType::Int32, "[[[1]], [2, [3, 4]]]").unwrap(),
            TensorData::Int32(vec![1, 2, 3, 4])
        );
        assert_eq!(
            TensorData::from_json_text("x", DataType::Int64, "[-1, 9223372036854775807]").unwrap(),
            TensorData::Int64(vec![-1, i64::MAX])
        );
        let err = TensorData::from_json_text("x", DataType::Int64, "[-1, 18446744073709551615]")
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::OutOfRange { index: 1, .. }),
            "{err}"
        );
        let err = TensorData::from_json_text("x", DataType::Fp64, "[1, null]").unwrap_err();
        assert_eq!(
            err.to_string(),
            "element 1 of input \"x\" is null, expected a number"
        );
        let err = TensorData::from_json_text("x", DataType::Fp32, "[1, {\"a\": 1}]").unwrap_err();
        assert!(err.to_string().contains("is an object"), "{err}");
        assert!(TensorData::from_json_text("x", DataType::Fp32, "[1, 2").is_err());
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
        assert_eq!(
            decode_json_data("x", DataType::Uint64, &json!([u64::MAX])).unwrap(),
            TensorData::Uint64(vec![u64::MAX])
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
        for &dt in DataType::ALL {
            assert_eq!(dt.as_str().parse::<DataType>().unwrap(), dt);
        }
        assert!("FP128"
            .parse::<DataType>()
            .unwrap_err()
            .contains("supported"));
    }

    #[test]
    fn f64_and_byte_forms_round_trip_for_each_type() {
        let values = [0.0, 1.0, 3.0];
        for &dt in DataType::ALL {
            let data = TensorData::from_f64(dt, &values);
            assert_eq!(data.datatype(), dt);
            let expected: Vec<f64> = if dt == DataType::Bool {
                vec![0.0, 1.0, 1.0]
            } else {
                values.to_vec()
            };
            assert_eq!(data.to_f64(), expected);
            let bytes = data.to_le_bytes();
            assert_eq!(bytes.len(), 3 * dt.byte_size());
            assert_eq!(TensorData::from_le_bytes(dt, &bytes).unwrap(), data);
            let json = data.to_json();
            assert_eq!(decode_json_data("x", dt, &json).unwrap(), data, "{dt}");
        }
    }

    #[test]
    fn floats_are_written_in_their_shortest_exact_form() {
        let json = TensorData::Fp32(vec![0.1, 1.0 / 3.0, f32::NAN]).to_json();
        assert_eq!(json.to_string(), "[0.1,0.33333334,null]");
        let back = decode_json_data("x", DataType::Fp32, &json!([0.1, 0.33333334])).unwrap();
        assert_eq!(back, TensorData::Fp32(vec![0.1, 1.0 / 3.0]));
        let half = TensorData::Fp16(vec![f16::from_f32(0.1), f16::from_f32(-2.5)]);
        assert_eq!(
            decode_json_data("x", DataType::Fp16, &half.to_json()).unwrap(),
            half
        );
    }

    #[test]
    fn bad_binary_data_is_refused() {
        assert!(TensorData::from_le_bytes(DataType::Fp32, &[0; 7])
            .unwrap_err()
            .contains("whole number"));
        assert!(TensorData::from_le_bytes(DataType::Bool, &[2])
            .unwrap_err()
            .contains("0 or 1"));
        assert_eq!(
            TensorData::from_le_bytes(DataType::Fp32, &1.5f32.to_le_bytes()).unwrap(),
            TensorData::Fp32(vec![1.5])
        );
    }
}
