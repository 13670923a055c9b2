//! The example digits classifier (fp32 and int8 QDQ) on tract-onnx:
//! predictions match the held-out labels and onnxruntime's probabilities.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;

use edgefleet_agent::engine::{self, EngineError};
use edgefleet_agent::tensor::{DataType, Tensor, TensorData};
use edgefleet_shared::ModelFormat;
use serde::Deserialize;

#[derive(Deserialize)]
struct Samples {
    inputs: Vec<Vec<f32>>,
    labels: Vec<usize>,
    fp32_probabilities: Vec<Vec<f32>>,
    int8_probabilities: Vec<Vec<f32>>,
}

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/digits")
}

fn samples() -> Samples {
    serde_json::from_slice(&std::fs::read(models_dir().join("samples.json")).unwrap()).unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

fn check(file: &str, expected: impl Fn(&Samples) -> &Vec<Vec<f32>>, tolerance: f32) {
    let bytes = std::fs::read(models_dir().join(file)).unwrap();
    let engine = engine::load(ModelFormat::Onnx, &bytes).unwrap();
    assert_eq!(engine.inputs()[0].name, "input");
    assert_eq!(engine.inputs()[0].datatype, DataType::Fp32);
    assert_eq!(engine.inputs()[0].shape, vec![None, Some(64)]);
    assert_eq!(engine.outputs()[0].name, "probabilities");
    let s = samples();
    // The whole batch at once, then one sample at a time.
    let batch = Tensor {
        name: "input".into(),
        shape: vec![s.inputs.len(), 64],
        data: TensorData::Fp32(s.inputs.concat()),
    };
    let out = engine::infer(engine.as_ref(), vec![batch]).unwrap();
    assert_eq!(out[0].shape, vec![s.inputs.len(), 10]);
    let TensorData::Fp32(probs) = &out[0].data else {
        panic!("expected FP32")
    };
    for (i, row) in probs.chunks(10).enumerate() {
        assert_eq!(argmax(row), s.labels[i], "{file} sample {i}");
        for (got, want) in row.iter().zip(&expected(&s)[i]) {
            assert!(
                (got - want).abs() <= tolerance,
                "{file} sample {i}: {got} vs onnxruntime {want}"
            );
        }
    }
    let single = Tensor {
        name: "input".into(),
        shape: vec![1, 64],
        data: TensorData::Fp32(s.inputs[3].clone()),
    };
    let out = engine::infer(engine.as_ref(), vec![single]).unwrap();
    let TensorData::Fp32(p) = &out[0].data else {
        panic!()
    };
    assert_eq!(argmax(p), s.labels[3]);
}

#[test]
fn fp32_model_matches_labels_and_onnxruntime() {
    check("digits_fp32.onnx", |s| &s.fp32_probabilities, 1e-4);
}

#[test]
fn int8_model_matches_labels_and_onnxruntime() {
    check("digits_int8.onnx", |s| &s.int8_probabilities, 1e-2);
}

#[test]
fn garbage_is_refused_at_load_with_a_reason() {
    let err = engine::load(ModelFormat::Onnx, b"this is not an onnx model")
        .err()
        .unwrap();
    assert!(matches!(err, EngineError::Load { .. }), "{err}");
    let bytes = std::fs::read(models_dir().join("digits_int8.onnx")).unwrap();
    let err = engine::load(ModelFormat::Onnx, &bytes[..bytes.len() / 2])
        .err()
        .unwrap();
    assert!(
        matches!(err, EngineError::Load { .. } | EngineError::Panicked { .. }),
        "{err}"
    );
}

#[test]
fn wrong_shape_is_refused_before_the_runtime() {
    let bytes = std::fs::read(models_dir().join("digits_int8.onnx")).unwrap();
    let engine = engine::load(ModelFormat::Onnx, &bytes).unwrap();
    let bad = Tensor {
        name: "input".into(),
        shape: vec![1, 63],
        data: TensorData::Fp32(vec![0.0; 63]),
    };
    let err = engine::infer(engine.as_ref(), vec![bad]).unwrap_err();
    assert!(err.is_client_error());
    assert!(err.to_string().contains("[-1, 64]"), "{err}");
}
