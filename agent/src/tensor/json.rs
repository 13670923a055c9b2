//! The JSON form of tensor data: the `data` array read straight into
//! typed elements by a scanner of its own (JSON's number grammar checked,
//! each number correctly rounded to the element type), and elements
//! written back in their shortest exact form.

use serde_json::Value;

use super::{DataType, Element, TensorData};

/// Why one JSON element does not fit the datatype.
pub(super) enum Problem {
    /// Not the kind of JSON value the datatype takes
    /// ([`Element::EXPECTED`] says which).
    WrongKind,
    /// A number the datatype cannot hold: a fraction or exponent for an
    /// integer type, an integer beyond its range, a float beyond the
    /// largest finite value.
    OutOfRange,
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

/// The shortest decimal that reads back as the same value of the
/// element's own precision (`0.1f32` is written `0.1`, not
/// `0.10000000149011612`). Non-finite floats have no JSON form and become
/// null; the binary extension carries them exactly.
pub(super) fn shortest_json<T: std::fmt::Display>(x: T, finite: bool) -> Value {
    if !finite {
        return Value::Null;
    }
    x.to_string()
        .parse::<f64>()
        .map(Value::from)
        .unwrap_or(Value::Null)
}

/// The same shortest form as [`shortest_json`], written as text: the
/// shortest round-trip digits in the element's own precision from zmij,
/// serde_json's own float formatter, so laid out as serde_json lays out
/// numbers (`1.0`, `0.1`, `1e-7`, `1e+20`).
pub(super) fn write_shortest<F: zmij::Float>(x: F, finite: bool, out: &mut Vec<u8>) {
    if finite {
        out.extend_from_slice(zmij::Buffer::new().format_finite(x).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

pub(super) fn write_json_array<T: Element>(v: &[T], out: &mut Vec<u8>) {
    out.push(b'[');
    for (i, &x) in v.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        x.write_json(out);
    }
    out.push(b']');
}

/// The f32 nearest to a decimal, given an f64 near it (the nearest when
/// `nearest`, else within 2 ULPs), where that is certain. Rounding the
/// f64 to f32 gives the decimal's f32 unless a halfway point between two
/// f32s lies between the decimal and the f64, or on the f64 while the
/// decimal is just off it. For the nearest f64 that can only be the f64
/// sitting exactly on a halfway point (which is itself an f64); for one
/// within 2 ULPs, one lying within 2 ULPs of a halfway point (8 are
/// allowed for). Those, and the ranges where f32 has fewer bits
/// (subnormals) or none (overflow), go to the standard library's f32
/// parser instead.
pub(super) fn f32_from_fast(v: f64, nearest: bool) -> Option<f32> {
    let magnitude = v.abs();
    if magnitude == 0.0 {
        return Some(v as f32);
    }
    if !(f64::from(f32::MIN_POSITIVE)..=f64::from(f32::MAX)).contains(&magnitude) {
        return None;
    }
    // f64 keeps 29 fraction bits more than f32: halfway is the top one
    // set and the rest clear.
    const BELOW_F32: u64 = (1 << 29) - 1;
    const HALFWAY: u64 = 1 << 28;
    let below = v.to_bits() & BELOW_F32;
    let clear = if nearest {
        below != HALFWAY
    } else {
        below.abs_diff(HALFWAY) > 8
    };
    clear.then_some(v as f32)
}

/// A JSON number token, checked against JSON's grammar.
pub(super) struct Number<'a> {
    pub(super) text: &'a str,
    /// Neither a fraction nor an exponent.
    pub(super) integer: bool,
    /// The significant digits (up to 18) scaled by a power of ten an f64
    /// holds exactly (up to 10^22): one multiplication or division.
    pub(super) fast: Option<f64>,
    /// Whether `fast` is the nearest f64 (Clinger's fast path: the digits
    /// are at most 2^53, so the only rounding is the final one). Longer
    /// digit strings (the 17 digits Python and serde_json write for an
    /// f32 value held as a double) are rounded twice, which leaves `fast`
    /// within 2 ULPs of the decimal: enough for f32, see `f32_from_fast`.
    pub(super) fast_is_nearest: bool,
}

impl Number<'_> {
    /// The nearest f64, when the fast path gives it.
    pub(super) fn nearest(&self) -> Option<f64> {
        self.fast.filter(|_| self.fast_is_nearest)
    }
}

/// The powers of ten an f64 holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Reads decimal digits from `i` into `mantissa` (while it has room:
/// `exact` is cleared once a digit no longer fits); returns the end.
/// Eight digits at a time where it can: tensor data is mostly long runs
/// of fraction digits.
fn read_digits(b: &[u8], mut i: usize, mantissa: &mut u64, exact: &mut bool) -> usize {
    while *mantissa < 10_000_000_000 {
        let Some(eight) = eight_digits(b, i) else {
            break;
        };
        *mantissa = *mantissa * 100_000_000 + eight;
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if !c.is_ascii_digit() {
            break;
        }
        if *mantissa < 100_000_000_000_000_000 {
            *mantissa = *mantissa * 10 + u64::from(c - b'0');
        } else {
            *exact = false;
        }
        i += 1;
    }
    i
}

/// The value of the eight bytes at `i` when all are ASCII digits, read
/// as one word: each byte's high bits say whether it is below '0' or
/// above '9', and three multiplications combine the digits pairwise.
fn eight_digits(b: &[u8], i: usize) -> Option<u64> {
    let mut word = [0u8; 8];
    word.copy_from_slice(b.get(i..i + 8)?);
    let v = u64::from_le_bytes(word);
    let below = v.wrapping_sub(0x3030_3030_3030_3030);
    let above = v.wrapping_add(0x4646_4646_4646_4646);
    if (below | above) & 0x8080_8080_8080_8080 != 0 {
        return None;
    }
    // Adjacent digits into two-digit values, then pairs of those into
    // four-digit values, then the two halves (the first digit is the
    // lowest byte).
    let v = below * 10 + (below >> 8);
    let low = (v & 0x0000_00FF_0000_00FF).wrapping_mul(100 + (1_000_000 << 32));
    let high = ((v >> 16) & 0x0000_00FF_0000_00FF).wrapping_mul(1 + (10_000 << 32));
    Some((low.wrapping_add(high) >> 32) & 0xFFFF_FFFF)
}

/// The JSON number starting at `start` (`-?(0|[1-9][0-9]*)(\.[0-9]+)?
/// ([eE][+-]?[0-9]+)?`) and where it ends; `None` when the text there is
/// not one.
fn scan_number(text: &str, start: usize) -> Option<(usize, Number<'_>)> {
    let b = text.as_bytes();
    let mut i = start;
    let negative = b.get(i) == Some(&b'-');
    if negative {
        i += 1;
    }
    let mut mantissa = 0u64;
    let mut exact = true;
    i = match b.get(i)? {
        // No leading zeros: "01" is not a JSON number.
        b'0' if b.get(i + 1).is_some_and(u8::is_ascii_digit) => return None,
        b'0' => i + 1,
        b'1'..=b'9' => read_digits(b, i, &mut mantissa, &mut exact),
        _ => return None,
    };
    let mut integer = true;
    let mut exponent = 0i64;
    if b.get(i) == Some(&b'.') {
        let end = read_digits(b, i + 1, &mut mantissa, &mut exact);
        if end == i + 1 {
            return None;
        }
        exponent -= (end - i - 1) as i64;
        i = end;
        integer = false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let sign = match b.get(i) {
            Some(b'-') => {
                i += 1;
                -1
            }
            Some(b'+') => {
                i += 1;
                1
            }
            _ => 1,
        };
        let from = i;
        let mut written = 0i64;
        while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
            // Saturates: any exponent this large is outside the fast path.
            written = (written * 10 + i64::from(c - b'0')).min(1 << 32);
            i += 1;
        }
        if i == from {
            return None;
        }
        exponent += sign * written;
        integer = false;
    }
    let fast = (exact && (-22..=22).contains(&exponent)).then(|| {
        let m = mantissa as f64;
        let v = if exponent < 0 {
            m / POW10[exponent.unsigned_abs() as usize]
        } else {
            m * POW10[exponent as usize]
        };
        if negative {
            -v
        } else {
            v
        }
    });
    Some((
        i,
        Number {
            text: &text[start..i],
            integer,
            fast,
            fast_is_nearest: mantissa <= 1 << 53,
        },
    ))
}

/// The end (one past the closing quote) of the JSON string starting at
/// `start`.
fn scan_string(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn skip_whitespace(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

/// Parses a JSON number or nested arrays of them into a flat `Vec<T>`.
///
/// A scanner of its own rather than serde_json: the workspace's
/// serde_json reads floats exactly (`float_roundtrip`) but slowly, and
/// always as f64. Here each number token is checked against JSON's
/// grammar and handed to the standard library's parser for `T`, which
/// is both fast and correctly rounded. Errors name the element's index
/// in the flattened tensor and what was found there.
pub(super) fn parse_flat<T: Element>(
    input: &str,
    datatype: DataType,
    text: &str,
    len_hint: usize,
) -> Result<Vec<T>, DecodeError> {
    let b = text.as_bytes();
    // Every element takes at least two bytes of text ("1,"), which bounds
    // what a client's shape can make us reserve.
    let mut out: Vec<T> = Vec::with_capacity(len_hint.min(b.len() / 2 + 1));
    let invalid = |out: &Vec<T>, what: &str, at: usize| DecodeError::BadElement {
        input: input.to_string(),
        index: out.len(),
        found: format!("invalid JSON ({what} at byte {at})"),
        expected: "numbers",
    };
    let bad = |out: &Vec<T>, problem: Problem, found: String| match problem {
        Problem::WrongKind => DecodeError::BadElement {
            input: input.to_string(),
            index: out.len(),
            found,
            expected: T::EXPECTED,
        },
        Problem::OutOfRange => DecodeError::OutOfRange {
            input: input.to_string(),
            index: out.len(),
            value: found,
            datatype,
        },
    };
    let mut depth = 0usize;
    let mut i = 0;
    loop {
        // A value is expected at `i`.
        i = skip_whitespace(b, i);
        let c = b.get(i).copied();
        match c {
            Some(b'[') => {
                depth += 1;
                i = skip_whitespace(b, i + 1);
                if b.get(i) != Some(&b']') {
                    continue;
                }
                depth -= 1;
                i += 1;
            }
            Some(b'-' | b'0'..=b'9') => {
                let (end, number) =
                    scan_number(text, i).ok_or_else(|| invalid(&out, "malformed number", i))?;
                match T::from_number(&number) {
                    Ok(x) => out.push(x),
                    Err(problem) => return Err(bad(&out, problem, number.text.to_string())),
                }
                i = end;
            }
            Some(b't' | b'f') => {
                let (value, word): (bool, &[u8]) = if c == Some(b't') {
                    (true, b"true")
                } else {
                    (false, b"false")
                };
                if !b[i..].starts_with(word) {
                    return Err(invalid(&out, "expected a value", i));
                }
                match T::from_bool(value) {
                    Ok(x) => out.push(x),
                    Err(problem) => return Err(bad(&out, problem, value.to_string())),
                }
                i += word.len();
            }
            Some(b'n') if b[i..].starts_with(b"null") => {
                return Err(bad(&out, Problem::WrongKind, "null".into()))
            }
            Some(b'"') => {
                let found = scan_string(b, i)
                    .and_then(|end| serde_json::from_str::<String>(&text[i..end]).ok())
                    .ok_or_else(|| invalid(&out, "malformed string", i))?;
                return Err(bad(
                    &out,
                    Problem::WrongKind,
                    format!("the string {found:?}"),
                ));
            }
            Some(b'{') => return Err(bad(&out, Problem::WrongKind, "an object".into())),
            Some(_) => return Err(invalid(&out, "expected a value", i)),
            None => return Err(invalid(&out, "unexpected end", i)),
        }
        // After a value: the next one, the end of an array, or the end.
        loop {
            i = skip_whitespace(b, i);
            if depth == 0 {
                if i == b.len() {
                    return Ok(out);
                }
                return Err(invalid(&out, "trailing characters", i));
            }
            match b.get(i) {
                Some(b',') => {
                    i += 1;
                    break;
                }
                Some(b']') => {
                    depth -= 1;
                    i += 1;
                }
                Some(_) => return Err(invalid(&out, "expected ',' or ']'", i)),
                None => return Err(invalid(&out, "unexpected end", i)),
            }
        }
    }
}

/// Flattens row-major nested (or already flat) JSON arrays into typed data.
pub fn decode_json_data(
    input: &str,
    datatype: DataType,
    data: &Value,
) -> Result<TensorData, DecodeError> {
    // One decoder for both forms: the typed text decoder the API uses.
    TensorData::from_json_text(input, datatype, &data.to_string(), 0)
}

#[cfg(test)]
mod tests;
