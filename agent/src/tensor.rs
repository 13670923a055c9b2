//! Runtime-independent tensors: what the local API decodes requests into
//! and what every engine takes and returns.
//!
//! Datatype names are the Open Inference Protocol's (`FP32`, `INT64`, ...).
//! Tensors come in two wire forms: JSON numbers (nested or flat, row-major)
//! and raw little-endian bytes (Triton's binary tensor extension). The
//! JSON form's reader and writer are in `json`.

use std::fmt;
use std::str::FromStr;

use half::f16;
use serde_json::Value;

mod json;

pub use json::{decode_json_data, DecodeError};
use json::{
    f32_from_fast, parse_flat, shortest_json, write_json_array, write_shortest, Number, Problem,
};

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

            /// JSON text of the elements, flat: `[1.5,-2.0]`. Floats are
            /// written in their shortest exact form, non-finite ones as
            /// null (see [`Element::write_json`]).
            pub fn write_json(&self, out: &mut Vec<u8>) {
                match self {
                    $(Self::$variant(v) => write_json_array(v, out)),*
                }
            }

            /// Raw little-endian bytes (the binary tensor extension).
            pub fn to_le_bytes(&self) -> Vec<u8> {
                let mut out = Vec::new();
                self.write_le_bytes(&mut out);
                out
            }

            /// Appends the raw little-endian bytes to `out` (a response
            /// body), without an intermediate buffer.
            pub fn write_le_bytes(&self, out: &mut Vec<u8>) {
                match self {
                    $(Self::$variant(v) => <$t as Element>::write_le_slice(v, out)),*
                }
            }

            /// Parses raw little-endian bytes of `datatype`: one copy, from
            /// the request body into the tensor's own (aligned) buffer.
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
                    $(DataType::$variant => Self::$variant(<$t as Element>::read_le_slice(bytes)?)),*
                })
            }

            /// Decodes JSON text (a number, or nested or flat arrays of
            /// them) straight into typed elements, without building a
            /// JSON tree first. `len_hint` (the element count the
            /// request's shape declares) sizes the buffer up front; a
            /// wrong hint costs only a reallocation.
            pub fn from_json_text(
                input: &str,
                datatype: DataType,
                text: &str,
                len_hint: usize,
            ) -> Result<Self, DecodeError> {
                Ok(match datatype {
                    $(DataType::$variant => Self::$variant(parse_flat::<$t>(input, datatype, text, len_hint)?)),*
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

/// One element type: conversions from JSON text, to JSON, f64 and bytes.
trait Element: Sized + Copy {
    /// What a JSON element must be for this type, for error messages.
    const EXPECTED: &'static str;
    /// From a JSON number token.
    fn from_number(n: &Number<'_>) -> Result<Self, Problem>;
    fn from_bool(_: bool) -> Result<Self, Problem> {
        Err(Problem::WrongKind)
    }
    fn to_json(self) -> Value;
    /// Appends the element's JSON text.
    fn write_json(self, out: &mut Vec<u8>);
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
    fn write_le_slice(v: &[Self], out: &mut Vec<u8>);
    fn read_le_slice(bytes: &[u8]) -> Result<Vec<Self>, String>;
}

/// Raw little-endian conversions for the fixed-size number types. The
/// loops work on whole slices so the compiler turns them into plain
/// copies on little-endian machines.
macro_rules! le_slices {
    ($t:ty) => {
        fn write_le_slice(v: &[Self], out: &mut Vec<u8>) {
            const N: usize = size_of::<$t>();
            let start = out.len();
            out.resize(start + v.len() * N, 0);
            for (dst, x) in out[start..].chunks_exact_mut(N).zip(v) {
                dst.copy_from_slice(&x.to_le_bytes());
            }
        }
        fn read_le_slice(bytes: &[u8]) -> Result<Vec<Self>, String> {
            const N: usize = size_of::<$t>();
            Ok(bytes
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    <$t>::from_le_bytes(a)
                })
                .collect())
        }
    };
}

macro_rules! int_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            const EXPECTED: &'static str = "an integer";
            fn from_number(n: &Number<'_>) -> Result<Self, Problem> {
                if !n.integer {
                    return Err(Problem::OutOfRange);
                }
                match n.text.parse::<$t>() {
                    Ok(x) => Ok(x),
                    // JSON's only signed zero; the unsigned parsers refuse
                    // any sign.
                    Err(_) if n.text == "-0" => Ok(0),
                    Err(_) => Err(Problem::OutOfRange),
                }
            }
            fn to_json(self) -> Value {
                Value::from(self)
            }
            fn write_json(self, out: &mut Vec<u8>) {
                out.extend_from_slice(itoa::Buffer::new().format(self).as_bytes());
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            le_slices!($t);
        }
    )*};
}

int_element!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Element for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_number(_: &Number<'_>) -> Result<Self, Problem> {
        Err(Problem::WrongKind)
    }
    fn from_bool(b: bool) -> Result<Self, Problem> {
        Ok(b)
    }
    fn to_json(self) -> Value {
        Value::Bool(self)
    }
    fn write_json(self, out: &mut Vec<u8>) {
        out.extend_from_slice(if self { b"true" } else { b"false" });
    }
    fn to_f64(self) -> f64 {
        f64::from(u8::from(self))
    }
    fn from_f64(x: f64) -> Self {
        x != 0.0
    }
    fn write_le_slice(v: &[Self], out: &mut Vec<u8>) {
        out.extend(v.iter().map(|&b| u8::from(b)));
    }
    fn read_le_slice(bytes: &[u8]) -> Result<Vec<Self>, String> {
        bytes
            .iter()
            .map(|&b| match b {
                0 => Ok(false),
                1 => Ok(true),
                b => Err(format!("BOOL byte must be 0 or 1, got {b}")),
            })
            .collect()
    }
}

/// A float element. `parse` turns a JSON number token into the nearest
/// value of the type (ties to even); a finite decimal beyond the type's
/// largest finite value is out of range rather than infinity.
macro_rules! float_element {
    ($t:ty, $parse:expr, $from:expr, $to:expr, $write:expr) => {
        impl Element for $t {
            const EXPECTED: &'static str = "a number";
            fn from_number(n: &Number<'_>) -> Result<Self, Problem> {
                let x: Option<$t> = $parse(n);
                match x {
                    Some(x) if $to(x).is_finite() => Ok(x),
                    _ => Err(Problem::OutOfRange),
                }
            }
            fn to_json(self) -> Value {
                shortest_json(self, $to(self).is_finite())
            }
            fn write_json(self, out: &mut Vec<u8>) {
                $write(self, out)
            }
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(x: f64) -> Self {
                $from(x)
            }
            le_slices!($t);
        }
    };
}

// A float is read by Clinger's fast path when the token allows it (see
// [`Number::fast`]), otherwise by the standard library's parser for the
// target type; both round the decimal correctly, and the standard
// library's does so straight to f32 (an f32 read through f64 is rounded
// twice and can land one ULP off; `f32_from_fast` accepts the f64 only
// where that cannot happen). Half precision has no such parser: it goes
// through f64, as it always has here.
float_element!(
    f16,
    |n: &Number<'_>| n
        .nearest()
        .or_else(|| n.text.parse::<f64>().ok())
        .map(f16::from_f64),
    f16::from_f64,
    f16::to_f64,
    |x: f16, out: &mut Vec<u8>| write_shortest(x.to_f32(), x.is_finite(), out)
);
float_element!(
    f32,
    |n: &Number<'_>| n
        .fast
        .and_then(|v| f32_from_fast(v, n.fast_is_nearest))
        .or_else(|| n.text.parse::<f32>().ok()),
    |x: f64| x as f32,
    f64::from,
    |x: f32, out: &mut Vec<u8>| write_shortest(x, x.is_finite(), out)
);
float_element!(
    f64,
    |n: &Number<'_>| n.nearest().or_else(|| n.text.parse::<f64>().ok()),
    |x: f64| x,
    |x: f64| x,
    |x: f64, out: &mut Vec<u8>| write_shortest(x, x.is_finite(), out)
);

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
