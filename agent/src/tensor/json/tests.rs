//! The JSON codec's unit tests.

use super::*;
use half::f16;
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
        TensorData::from_json_text("x", DataType::Int32, "[[[1]], [2, [3, 4]]]", 0).unwrap(),
        TensorData::Int32(vec![1, 2, 3, 4])
    );
    assert_eq!(
        TensorData::from_json_text("x", DataType::Int64, "[-1, 9223372036854775807]", 0).unwrap(),
        TensorData::Int64(vec![-1, i64::MAX])
    );
    let err = TensorData::from_json_text("x", DataType::Int64, "[-1, 18446744073709551615]", 0)
        .unwrap_err();
    assert!(
        matches!(err, DecodeError::OutOfRange { index: 1, .. }),
        "{err}"
    );
    let err = TensorData::from_json_text("x", DataType::Fp64, "[1, null]", 0).unwrap_err();
    assert_eq!(
        err.to_string(),
        "element 1 of input \"x\" is null, expected a number"
    );
    let err = TensorData::from_json_text("x", DataType::Fp32, "[1, {\"a\": 1}]", 0).unwrap_err();
    assert!(err.to_string().contains("is an object"), "{err}");
    assert!(TensorData::from_json_text("x", DataType::Fp32, "[1, 2", 0).is_err());
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
fn eight_digits_at_once_read_as_one_at_a_time() {
    for text in ["00000000", "12345678", "99999999", "10000001", "07060504"] {
        assert_eq!(
            eight_digits(text.as_bytes(), 0),
            Some(text.parse().unwrap()),
            "{text}"
        );
    }
    for text in [
        "1234567", "1234567/", "1234567:", "1234.678", "-1234567", "1234 678",
    ] {
        assert_eq!(eight_digits(text.as_bytes(), 0), None, "{text}");
    }
    let mut m = 0;
    let mut exact = true;
    let text = b"123456789012345678901234x";
    assert_eq!(read_digits(text, 0, &mut m, &mut exact), 24);
    assert_eq!((m, exact), (123_456_789_012_345_678, false));
}

fn fp32(text: &str) -> Result<f32, DecodeError> {
    match TensorData::from_json_text("x", DataType::Fp32, text, 1)? {
        TensorData::Fp32(v) if v.len() == 1 => Ok(v[0]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fp32_text_is_rounded_once_to_the_nearest_f32() {
    assert_eq!(fp32("0.1").unwrap(), 0.1f32);
    assert_eq!(fp32("0.33333334").unwrap(), 1.0f32 / 3.0);
    assert_eq!(fp32("-2.5e0").unwrap(), -2.5);
    assert!(fp32("-0").unwrap().is_sign_negative());
    // 2^24 + 1 lies halfway between two f32s: ties go to the even one.
    assert_eq!(fp32("16777217").unwrap(), 16_777_216.0);
    assert_eq!(fp32("16777219").unwrap(), 16_777_220.0);
    // The largest f32, and the decimals either side of the halfway
    // point to 2^128 (3.40282356779...e38).
    assert_eq!(fp32("3.4028235e38").unwrap(), f32::MAX);
    assert_eq!(fp32("3.40282356e38").unwrap(), f32::MAX);
    let err = fp32("3.4028236e38").unwrap_err();
    assert_eq!(
        err.to_string(),
        "element 0 of input \"x\" (3.4028236e38) is out of range for FP32"
    );
    // Below half the smallest subnormal is zero; just above it, the
    // smallest subnormal (half is 7.00649232162408535...e-46).
    assert_eq!(fp32("1e-46").unwrap(), 0.0);
    assert_eq!(fp32("7.0064923216240853e-46").unwrap(), 0.0);
    assert_eq!(fp32("7.0064923216240854e-46").unwrap(), f32::from_bits(1));
    assert_eq!(fp32("1.4e-45").unwrap(), f32::from_bits(1));
    // Just above the halfway point between 1 and the next f32
    // (1 + 2^-24): through f64 this lands exactly on that halfway
    // point and a second rounding would give 1.0.
    assert_eq!(
        fp32("1.000000059604644775390626").unwrap(),
        1.0 + f32::EPSILON
    );
    assert_eq!(fp32("1.000000059604644775390625").unwrap(), 1.0);
    // 16 digits, so the f64 fast path reads them, and the f64 they
    // round to is halfway between two f32s, on the other side of the
    // decimal: rounding that f64 again would pick the wrong one.
    assert_eq!(fp32("0.6179186999797821").unwrap().to_bits(), 0x3f1e_2feb);
    assert_eq!(fp32("2.408908724784851").unwrap().to_bits(), 0x401a_2b8f);
    // 17 digits, either side of that halfway point: rounded twice on
    // the fast path, so near a halfway point it must not be trusted.
    assert_eq!(fp32("1.0000000596046448").unwrap(), 1.0 + f32::EPSILON);
    assert_eq!(fp32("1.0000000596046447").unwrap(), 1.0);
}

/// The fast paths agree with the standard library's parser on the
/// forms clients send: shortest f32 digits, 17-digit doubles (Python's
/// `tolist()` of float32 data), and a few digits more or less.
#[test]
fn fast_paths_agree_with_the_standard_parser() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..200_000 {
        let x = f32::from_bits((next() >> 32) as u32);
        if !x.is_finite() {
            continue;
        }
        let scaled = f64::from(x) * 10f64.powi((i % 9) - 4);
        for text in [
            format!("{x}"),
            format!("{}", f64::from(x)),
            format!("{scaled:e}"),
            format!("{scaled:.15e}"),
            format!("{scaled:.17e}"),
            format!("{:.8}", f64::from(x)),
        ] {
            let want = text.parse::<f32>().unwrap();
            match TensorData::from_json_text("x", DataType::Fp32, &text, 1) {
                Ok(TensorData::Fp32(v)) => assert_eq!(v[0].to_bits(), want.to_bits(), "{text}"),
                Err(DecodeError::OutOfRange { .. }) => assert!(want.is_infinite(), "{text}"),
                other => panic!("{text}: {other:?}"),
            }
            let want = text.parse::<f64>().unwrap();
            match TensorData::from_json_text("x", DataType::Fp64, &text, 1) {
                Ok(TensorData::Fp64(v)) => assert_eq!(v[0].to_bits(), want.to_bits(), "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}

#[test]
fn other_float_widths_round_to_their_own_precision() {
    let fp64 = |t: &str| TensorData::from_json_text("x", DataType::Fp64, t, 0);
    assert_eq!(
        fp64("[0.1, 5e-324, 1.7976931348623157e308]").unwrap(),
        TensorData::Fp64(vec![0.1, f64::from_bits(1), f64::MAX])
    );
    assert!(matches!(
        fp64("[0, 1e400]").unwrap_err(),
        DecodeError::OutOfRange { index: 1, .. }
    ));
    let fp16 = |t: &str| TensorData::from_json_text("x", DataType::Fp16, t, 0);
    assert_eq!(fp16("[65504]").unwrap(), TensorData::Fp16(vec![f16::MAX]));
    assert!(matches!(
        fp16("[65520]").unwrap_err(),
        DecodeError::OutOfRange { index: 0, .. }
    ));
}

#[test]
fn non_json_numbers_are_refused_with_their_index() {
    for (text, index) in [
        ("[1, NaN]", 1),
        ("[Infinity]", 0),
        ("[2, -Infinity]", 1),
        ("[[1, 2], [3, nan]]", 3),
        ("[01]", 0),
        ("[1, 1.]", 1),
        ("[.5]", 0),
        ("[+1]", 0),
        ("[1e]", 0),
        ("[1, 2,]", 2),
        ("[1 2]", 1),
        ("[1]]", 1),
        ("[[1]", 1),
        ("", 0),
        ("[tru]", 0),
    ] {
        let err = TensorData::from_json_text("pixels", DataType::Fp32, text, 0).unwrap_err();
        match &err {
            DecodeError::BadElement {
                input,
                index: i,
                found,
                expected,
            } => {
                assert_eq!((input.as_str(), *i), ("pixels", index), "{text}: {err}");
                assert!(found.starts_with("invalid JSON"), "{text}: {err}");
                assert_eq!(*expected, "numbers");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    let err = TensorData::from_json_text("x", DataType::Fp32, "[1, 2, 1e39]", 0).unwrap_err();
    assert!(
        matches!(&err, DecodeError::OutOfRange { index: 2, value, datatype: DataType::Fp32, .. } if value == "1e39"),
        "{err:?}"
    );
}

#[test]
fn json_text_forms_and_element_errors() {
    let fp32 = |t: &str| TensorData::from_json_text("x", DataType::Fp32, t, 0);
    assert_eq!(fp32("[]").unwrap(), TensorData::Fp32(vec![]));
    assert_eq!(fp32(" [ [ ] , [] ] ").unwrap(), TensorData::Fp32(vec![]));
    assert_eq!(fp32(" 5 ").unwrap(), TensorData::Fp32(vec![5.0]));
    assert_eq!(
        fp32("[\n\t1e5,1E-2 ,\r-0.0e+1]").unwrap(),
        TensorData::Fp32(vec![1e5, 0.01, -0.0])
    );
    let err = fp32("[[1, 2], [3, \"a\\\"b\"]]").unwrap_err();
    assert_eq!(
        err.to_string(),
        "element 3 of input \"x\" is the string \"a\\\"b\", expected a number"
    );
    let err = fp32("[1, true]").unwrap_err();
    assert_eq!(
        err.to_string(),
        "element 1 of input \"x\" is true, expected a number"
    );
    let uint8 = |t: &str| TensorData::from_json_text("x", DataType::Uint8, t, 0);
    assert_eq!(
        uint8("[-0, 0, 255]").unwrap(),
        TensorData::Uint8(vec![0, 0, 255])
    );
    for (text, index) in [("[-1]", 0), ("[1, 1e3]", 1), ("[1, 2, 2.0]", 2)] {
        let err = uint8(text).unwrap_err();
        assert!(
            matches!(err, DecodeError::OutOfRange { index: i, .. } if i == index),
            "{text}: {err}"
        );
    }
    let err = uint8("[1, \"2\"]").unwrap_err();
    assert_eq!(
        err.to_string(),
        "element 1 of input \"x\" is the string \"2\", expected an integer"
    );
    let boolean = |t: &str| TensorData::from_json_text("x", DataType::Bool, t, 0);
    assert_eq!(
        boolean("[true, [false]]").unwrap(),
        TensorData::Bool(vec![true, false])
    );
    assert_eq!(
        boolean("[true, 0]").unwrap_err().to_string(),
        "element 1 of input \"x\" is 0, expected true or false"
    );
}

/// The JSON text writer's numbers read back as exactly the values
/// written (bit for bit), non-finite floats are null, and integers are
/// written as the `serde_json::Value` form writes them. Float text can
/// differ from that form's: zmij picks its own digits where two
/// shortest forms tie (3697036.25f32 is "3697036.2" or "3697036.3")
/// and switches f32 to exponent form at smaller magnitudes.
#[test]
fn written_json_reads_back_exactly() {
    let check = |data: TensorData| {
        let mut out = Vec::new();
        data.write_json(&mut out);
        let text = String::from_utf8(out).unwrap();
        let back = TensorData::from_json_text("x", data.datatype(), &text, 0).unwrap();
        assert_eq!(back.to_le_bytes(), data.to_le_bytes(), "{text}");
        if !matches!(
            data.datatype(),
            DataType::Fp16 | DataType::Fp32 | DataType::Fp64
        ) {
            assert_eq!(text, data.to_json().to_string());
        }
    };
    // A spread of f32 and f64 bit patterns (an LCG), with the edges.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state
    };
    let mut f32s: Vec<f32> = (0..20_000)
        .map(|_| f32::from_bits((next() >> 32) as u32))
        .collect();
    f32s.extend([
        0.0,
        -0.0,
        1.0,
        0.1,
        1e-7,
        1e20,
        123_456_790.0,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        3_697_036.2,
    ]);
    f32s.retain(|x| x.is_finite());
    check(TensorData::Fp32(f32s));
    let mut out = Vec::new();
    TensorData::Fp32(vec![f32::NAN, f32::INFINITY, -1.5]).write_json(&mut out);
    assert_eq!(out, b"[null,null,-1.5]");
    let mut f64s: Vec<f64> = (0..20_000).map(|_| f64::from_bits(next())).collect();
    f64s.extend([0.0, -0.0, 1.0, 0.1, 1e21, 1e-7, f64::MAX, f64::from_bits(1)]);
    f64s.retain(|x| x.is_finite());
    check(TensorData::Fp64(f64s));
    check(TensorData::Fp16(
        (0..=u16::MAX)
            .map(f16::from_bits)
            .filter(|x| x.is_finite())
            .collect(),
    ));
    check(TensorData::Int64(vec![i64::MIN, -1, 0, i64::MAX]));
    check(TensorData::Uint64(vec![0, u64::MAX]));
    check(TensorData::Bool(vec![true, false]));
    check(TensorData::Uint8(vec![]));
}
