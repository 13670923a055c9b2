//! The collector on known tensors, under concurrent requests, on the real
//! digits model (in-distribution against inverted inputs, scored with the
//! server's PSI), and through the local API over a real socket.

use std::path::Path;
use std::sync::Arc;

use edgefleet_shared::drift::psi;
use edgefleet_shared::quality::{DriftSpec, Feature, FeatureBins, FeatureStats};
use edgefleet_shared::ModelFormat;

use super::*;
use crate::engine::load::select_local;
use crate::engine::{Engine, Runtimes};
use crate::tensor::{DataType, TensorData};

fn bins(tensor: &str, feature: Feature, lo: f64, hi: f64, bins: u32) -> FeatureBins {
    FeatureBins {
        tensor: tensor.into(),
        feature,
        lo,
        hi,
        bins,
    }
}

fn tensor(name: &str, shape: &[usize], values: &[f64]) -> Tensor {
    Tensor {
        name: name.into(),
        shape: shape.to_vec(),
        data: TensorData::from_f64(DataType::Fp32, values),
    }
}

pub(crate) fn stats<'a>(t: &'a DriftTelemetry, tensor: &str, feature: Feature) -> &'a FeatureStats {
    t.features
        .iter()
        .find(|f| f.tensor == tensor && f.feature == feature)
        .unwrap_or_else(|| panic!("no {tensor}/{} in {t:?}", feature.as_str()))
}

/// A [4, 10] "probabilities" output whose row `r` peaks at class
/// `classes[r]` with score `0.55 + r / 10` (mid-bin, clear of f32
/// rounding at the edges).
fn probabilities(classes: [usize; 4]) -> Tensor {
    let mut values = vec![0.0; 40];
    for (r, &c) in classes.iter().enumerate() {
        for (i, v) in values[r * 10..(r + 1) * 10].iter_mut().enumerate() {
            *v = 0.01 * i as f64;
        }
        values[r * 10 + c] = 0.55 + r as f64 / 10.0;
    }
    tensor("probabilities", &[4, 10], &values)
}

fn full_spec() -> DriftSpec {
    DriftSpec {
        features: vec![
            bins("x", Feature::Mean, 0.0, 10.0, 10),
            bins("x", Feature::Std, 0.0, 10.0, 10),
            bins("x", Feature::Min, 0.0, 10.0, 10),
            bins("x", Feature::Max, 0.0, 10.0, 10),
            bins("probabilities", Feature::Argmax, 0.0, 10.0, 10),
            bins("probabilities", Feature::MaxValue, 0.0, 1.0, 10),
            bins("x", Feature::Argmax, 0.0, 8.0, 8),
            bins("probabilities", Feature::Mean, 0.0, 1.0, 10),
        ],
    }
}

#[test]
fn features_of_known_tensors_land_in_their_bins() {
    let collector = DriftCollector::new(full_spec());
    // Mean 5, population std 2, min 2, max 9 at index 7.
    let x = tensor("x", &[2, 4], &[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
    let features = collector.input_features(&[x]);
    collector.record(features, &[probabilities([3, 3, 7, 0])]);
    let t = collector.take();
    // One entry per spec feature, in spec order.
    let order: Vec<(&str, Feature)> = t
        .features
        .iter()
        .map(|f| (f.tensor.as_str(), f.feature))
        .collect();
    let spec = full_spec();
    let wanted: Vec<(&str, Feature)> = spec
        .features
        .iter()
        .map(|f| (f.tensor.as_str(), f.feature))
        .collect();
    assert_eq!(order, wanted);
    let one = |feature, value: f64, bin: usize| {
        let s = stats(&t, "x", feature);
        assert_eq!(s.moments.count, 1, "{s:?}");
        assert!((s.moments.mean - value).abs() < 1e-12, "{s:?}");
        let mut counts = vec![0; s.histogram.counts.len()];
        counts[bin] = 1;
        assert_eq!(s.histogram.counts, counts, "{s:?}");
    };
    // counts[0] is below lo, counts[1] the first bin.
    one(Feature::Mean, 5.0, 6);
    one(Feature::Std, 2.0, 3);
    one(Feature::Min, 2.0, 3);
    one(Feature::Max, 9.0, 10);
    // An input's argmax is over the whole tensor (row-major).
    one(Feature::Argmax, 7.0, 8);
    // An output's argmax and score count once per row.
    let argmax = stats(&t, "probabilities", Feature::Argmax);
    assert_eq!(argmax.moments.count, 4);
    assert_eq!(
        argmax.histogram.counts,
        vec![0, 1, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0]
    );
    assert_eq!((argmax.moments.min, argmax.moments.max), (0.0, 7.0));
    let score = stats(&t, "probabilities", Feature::MaxValue);
    assert_eq!(score.moments.count, 4);
    assert_eq!(
        score.histogram.counts,
        vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    );
    // Whole-tensor features of an output count once per request.
    assert_eq!(stats(&t, "probabilities", Feature::Mean).moments.count, 1);
}

#[test]
fn take_hands_over_the_interval_and_starts_an_empty_one() {
    let collector = DriftCollector::new(full_spec());
    for _ in 0..3 {
        let x = tensor("x", &[3], &[1.0, 2.0, 3.0]);
        let features = collector.input_features(&[x]);
        collector.record(features, &[probabilities([1, 2, 3, 4])]);
    }
    let first = collector.take();
    assert_eq!(stats(&first, "x", Feature::Mean).moments.count, 3);
    assert_eq!(
        stats(&first, "probabilities", Feature::Argmax)
            .histogram
            .total(),
        12
    );
    let second = collector.take();
    assert_eq!(second.features.len(), full_spec().features.len());
    for f in &second.features {
        assert_eq!((f.moments.count, f.histogram.total()), (0, 0), "{f:?}");
    }
}

#[test]
fn a_missing_tensor_or_a_value_without_a_number_is_skipped_for_its_feature_only() {
    let collector = DriftCollector::new(full_spec());
    // No "x" at all: the output features still count.
    let features = collector.input_features(&[tensor("other", &[1], &[1.0])]);
    collector.record(features, &[probabilities([0, 1, 2, 3])]);
    // An empty "x" and NaN in it have no mean; the extremes skip NaN.
    let features = collector.input_features(&[tensor("x", &[0], &[])]);
    collector.record(features, &[]);
    let features = collector.input_features(&[tensor("x", &[2], &[f64::NAN, 4.0])]);
    collector.record(features, &[]);
    let t = collector.take();
    assert_eq!(stats(&t, "x", Feature::Mean).moments.count, 0);
    assert_eq!(stats(&t, "x", Feature::Mean).histogram.total(), 0);
    assert_eq!(stats(&t, "x", Feature::Max).moments.count, 1);
    assert_eq!(stats(&t, "probabilities", Feature::Argmax).moments.count, 4);
    // Every datatype is read; booleans as 0 and 1.
    let collector = DriftCollector::new(full_spec());
    for &dt in DataType::ALL {
        let x = Tensor {
            name: "x".into(),
            shape: vec![4],
            data: TensorData::from_f64(dt, &[0.0, 1.0, 1.0, 0.0]),
        };
        let features = collector.input_features(&[x]);
        collector.record(features, &[]);
    }
    let t = collector.take();
    let mean = stats(&t, "x", Feature::Mean);
    assert_eq!(mean.moments.count, DataType::ALL.len() as u64);
    assert_eq!((mean.moments.min, mean.moments.max), (0.5, 0.5));
}

#[test]
fn concurrent_requests_all_count() {
    const THREADS: usize = 8;
    const REQUESTS: usize = 500;
    let collector = Arc::new(DriftCollector::new(full_spec()));
    let handles: Vec<_> = (0..THREADS)
        .map(|thread| {
            let collector = Arc::clone(&collector);
            std::thread::spawn(move || {
                for i in 0..REQUESTS {
                    // Means 0.5 .. 7.5, one thread per value.
                    let v = thread as f64 + 0.5;
                    let x = tensor("x", &[2], &[v, v]);
                    let features = collector.input_features(&[x]);
                    collector.record(features, &[probabilities([i % 10, 0, 0, 0])]);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let t = collector.take();
    let mean = stats(&t, "x", Feature::Mean);
    assert_eq!(mean.moments.count, (THREADS * REQUESTS) as u64);
    assert!((mean.moments.mean - 4.0).abs() < 1e-9, "{mean:?}");
    let per_bin = REQUESTS as u64;
    let mut expected = vec![per_bin; THREADS];
    expected.insert(0, 0);
    expected.extend([0, 0, 0]);
    assert_eq!(mean.histogram.counts, expected);
    let argmax = stats(&t, "probabilities", Feature::Argmax);
    assert_eq!(argmax.histogram.total(), (THREADS * REQUESTS * 4) as u64);
}

// ---- the real digits model ----

pub(crate) fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn digits_engine() -> Box<dyn Engine> {
    let path = repo_file("models/digits/digits_fp32.onnx");
    select_local(&Runtimes::builtin(), ModelFormat::Onnx, &path, None, None)
        .unwrap()
        .engine
}

/// The 8x8 handwritten digits of models/digits/samples.json, pixels 0..16.
pub(crate) fn digit_samples() -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(repo_file("models/digits/samples.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(json["inputs"].clone()).unwrap()
}

/// Each sample `draws` times with reproducible pixel noise in [-1, 1]
/// (clamped to the 0..16 range): more requests from the same population,
/// as a camera's noise would give them.
fn noisy(samples: &[Vec<f64>], draws: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut state = seed;
    let mut unit = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..draws)
        .flat_map(|_| samples.iter())
        .map(|s| {
            s.iter()
                .map(|&x| (x + 2.0 * unit() - 1.0).clamp(0.0, 16.0))
                .collect()
        })
        .collect()
}

pub(crate) fn digits_spec() -> DriftSpec {
    DriftSpec {
        features: vec![
            bins("input", Feature::Mean, 0.0, 16.0, 16),
            bins("probabilities", Feature::Argmax, 0.0, 10.0, 10),
        ],
    }
}

/// Runs each image through the model as its own request, as the API
/// does: input features, inference, record. Returns the interval.
fn serve(engine: &dyn Engine, collector: &DriftCollector, images: &[Vec<f64>]) -> DriftTelemetry {
    for image in images {
        let inputs = vec![tensor("input", &[1, 64], image)];
        let features = collector.input_features(&inputs);
        let outputs = engine.run(inputs).unwrap();
        collector.record(features, &outputs);
    }
    collector.take()
}

#[test]
fn inverted_digits_drift_and_more_of_the_same_digits_do_not() {
    let engine = digits_engine();
    let collector = DriftCollector::new(digits_spec());
    let samples = digit_samples();
    assert_eq!(samples.len(), 16);
    let reference = serve(engine.as_ref(), &collector, &noisy(&samples, 4, 1));
    let same = serve(engine.as_ref(), &collector, &noisy(&samples, 4, 2));
    let inverted: Vec<Vec<f64>> = samples
        .iter()
        .map(|s| s.iter().map(|x| 16.0 - x).collect())
        .collect();
    let shifted = serve(engine.as_ref(), &collector, &noisy(&inverted, 4, 2));
    for t in [&reference, &same, &shifted] {
        assert_eq!(stats(t, "input", Feature::Mean).moments.count, 64);
        assert_eq!(stats(t, "probabilities", Feature::Argmax).moments.count, 64);
    }
    let psi_of = |current: &DriftTelemetry, tensor: &str, feature| {
        psi(
            &stats(&reference, tensor, feature).histogram,
            &stats(current, tensor, feature).histogram,
        )
        .unwrap()
    };
    let same_input = psi_of(&same, "input", Feature::Mean);
    let same_output = psi_of(&same, "probabilities", Feature::Argmax);
    let shifted_input = psi_of(&shifted, "input", Feature::Mean);
    let shifted_output = psi_of(&shifted, "probabilities", Feature::Argmax);
    eprintln!("PSI in-distribution: input mean {same_input:.4}, argmax {same_output:.4}; inverted: input mean {shifted_input:.4}, argmax {shifted_output:.4}");
    assert!(same_input < 0.1, "{same_input}");
    assert!(same_output < 0.1, "{same_output}");
    assert!(shifted_input > 0.25, "{shifted_input}");
    assert!(shifted_output > 0.25, "{shifted_output}");
    // The moments tell the same story: inverted pixels average 16 - mean.
    let mean = |t: &DriftTelemetry| stats(t, "input", Feature::Mean).moments.mean;
    assert!((mean(&reference) + mean(&shifted) - 16.0).abs() < 0.5);
}
