//! Reference profiles computed from files (the repository's digits
//! samples), the errors that name a bad file's problem, and scores of
//! known distributions: the reference's own distribution scores near
//! zero, a shifted one far over the threshold.

use edgefleet_shared::drift::Moments;
use edgefleet_shared::quality::{DriftTelemetry, Feature, FeatureStats};
use edgefleet_shared::{DeviceId, ModelTelemetry, TelemetryMessage, TensorSpec, SCHEMA_VERSION};

use std::collections::HashMap;

use super::view::WINDOW_SECS;
use super::*;

/// The repository's digits samples as a reference file: 16 inputs of 64
/// pixels and the model's probabilities for them.
fn digits_file() -> ReferenceFile {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/digits/samples.json");
    let samples: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let inputs = samples["inputs"].as_array().unwrap();
    let outputs = samples["fp32_probabilities"].as_array().unwrap();
    ReferenceFile {
        samples: inputs
            .iter()
            .zip(outputs)
            .map(|(i, o)| ReferenceSample {
                inputs: [(
                    "input".to_string(),
                    serde_json::from_value(i.clone()).unwrap(),
                )]
                .into(),
                outputs: [(
                    "probabilities".to_string(),
                    serde_json::from_value(o.clone()).unwrap(),
                )]
                .into(),
            })
            .collect(),
    }
}

fn digits_spec() -> ModelSpec {
    let tensor = |name: &str, width: i64| TensorSpec {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![-1, width],
    };
    ModelSpec {
        inputs: vec![tensor("input", 64)],
        outputs: vec![tensor("probabilities", 10)],
    }
}

fn bytes(file: &ReferenceFile) -> Vec<u8> {
    serde_json::to_vec(file).unwrap()
}

/// What an agent would report for `samples` in `profile`'s bins.
fn collect(profile: &ReferenceProfile, samples: &[ReferenceSample]) -> DriftTelemetry {
    DriftTelemetry {
        features: profile
            .features
            .iter()
            .map(|f| {
                let mut histogram = f.bins.histogram().unwrap();
                let mut moments = Moments::default();
                for s in samples {
                    let values = s
                        .inputs
                        .get(&f.bins.tensor)
                        .or_else(|| s.outputs.get(&f.bins.tensor))
                        .unwrap();
                    let v = feature_value(f.bins.feature, values);
                    histogram.push(v);
                    moments.push(v);
                }
                FeatureStats {
                    tensor: f.bins.tensor.clone(),
                    feature: f.bins.feature,
                    moments,
                    histogram,
                }
            })
            .collect(),
    }
}

#[test]
fn a_reference_from_the_digits_samples_bins_inputs_and_classes() {
    let profile = from_file(&digits_spec(), &bytes(&digits_file())).unwrap();
    assert_eq!(profile.samples, 16);
    assert_eq!(profile.source, "file");
    let names: Vec<(String, Feature)> = profile
        .features
        .iter()
        .map(|f| (f.bins.tensor.clone(), f.bins.feature))
        .collect();
    assert_eq!(
        names,
        [
            ("input".to_string(), Feature::Mean),
            ("input".to_string(), Feature::Std),
            ("probabilities".to_string(), Feature::Argmax),
            ("probabilities".to_string(), Feature::MaxValue),
        ]
    );
    // Pixel means lie in 0..16; the bins reach past the observed range.
    let mean = profile.feature("input", Feature::Mean).unwrap();
    assert_eq!(mean.moments.count, 16);
    assert!(mean.bins.lo < mean.moments.min && mean.bins.hi > mean.moments.max);
    assert!(
        mean.moments.mean > 1.0 && mean.moments.mean < 15.0,
        "{:?}",
        mean.moments
    );
    assert_eq!(mean.histogram.total(), 16);
    // One bin per class; the samples' labels cover several classes.
    let argmax = profile.feature("probabilities", Feature::Argmax).unwrap();
    assert_eq!(
        (argmax.bins.lo, argmax.bins.hi, argmax.bins.bins),
        (0.0, 10.0, 10)
    );
    assert!(argmax.histogram.counts.iter().filter(|c| **c > 0).count() >= 5);
    // The spec the agents get is valid for a signed slot.
    let spec = profile.spec();
    assert_eq!(spec.features.len(), 4);
    assert!(spec.features.iter().all(|f| f.bins > 0 && f.lo < f.hi));
}

#[test]
fn bad_reference_files_are_refused_naming_the_problem() {
    let spec = digits_spec();
    let err = |bytes: &[u8]| from_file(&spec, bytes).unwrap_err().to_string();
    assert!(err(b"not json").contains("not valid JSON"));
    assert!(err(br#"{"samples": []}"#).contains("no samples"));
    let mut file = digits_file();
    file.samples[3].inputs.insert("pixels".into(), vec![1.0]);
    let e = err(&bytes(&file));
    assert!(
        e.contains("sample 3") && e.contains("\"pixels\" is not in sample 0"),
        "{e}"
    );
    let mut file = digits_file();
    for s in &mut file.samples {
        s.inputs.insert("pixels".into(), vec![1.0]);
    }
    let e = err(&bytes(&file));
    assert!(
        e.contains("\"pixels\"") && e.contains("declared inputs (input)"),
        "{e}"
    );
    let mut file = digits_file();
    file.samples[2]
        .inputs
        .get_mut("input")
        .unwrap()
        .truncate(60);
    let e = err(&bytes(&file));
    assert!(
        e.contains("sample 2") && e.contains("60 values") && e.contains("64"),
        "{e}"
    );
    let mut file = digits_file();
    file.samples[5].outputs.clear();
    let e = err(&bytes(&file));
    assert!(e.contains("missing from sample 5"), "{e}");
    // Without a declared interface any tensor is taken, consistently.
    let loose = from_file(&ModelSpec::default(), &bytes(&digits_file())).unwrap();
    assert_eq!(loose.features.len(), 4);
}

#[test]
fn the_reference_distribution_scores_low_and_a_shifted_one_high() {
    let file = digits_file();
    let profile = from_file(&digits_spec(), &bytes(&file)).unwrap();
    let view = DriftView::new(DEFAULT_ALERT_PSI);
    view.set_reference("digits", 1, profile.clone());
    let same = collect(&profile, &file.samples);
    let psi = view.interval_score("digits", 1, &same).unwrap();
    assert!(psi < 0.01, "{psi}");
    // Inverted pixels (16 - x): the input mean moves out of the
    // reference's range.
    let inverted: Vec<ReferenceSample> = file
        .samples
        .iter()
        .map(|s| ReferenceSample {
            inputs: [(
                "input".to_string(),
                s.inputs["input"].iter().map(|x| 16.0 - x).collect(),
            )]
            .into(),
            outputs: s.outputs.clone(),
        })
        .collect();
    let shifted = collect(&profile, &inverted);
    let psi = view.interval_score("digits", 1, &shifted).unwrap();
    assert!(psi > DEFAULT_ALERT_PSI * 4.0, "{psi}");
    // No reference, no score.
    assert_eq!(view.interval_score("digits", 2, &same), None);
}

fn telemetry(device: &str, seq: u64, at: u64, drift: DriftTelemetry) -> TelemetryMessage {
    TelemetryMessage {
        schema: SCHEMA_VERSION,
        device_id: DeviceId::new(device).unwrap(),
        seq,
        at,
        interval_secs: 10.0,
        health: Default::default(),
        models: vec![ModelTelemetry {
            name: "digits".into(),
            version: 1,
            runtime: "tract-onnx".into(),
            inferences: 16,
            errors: 0,
            total_inferences: 16,
            total_errors: 0,
            p50_us: None,
            p95_us: None,
            p99_us: None,
            runtime_trials: vec![],
            variant: None,
            shadow: None,
            drift: Some(drift),
        }],
        outbox: Default::default(),
        link: Default::default(),
    }
}

#[test]
fn scores_per_device_class_and_fleet_merge_the_window() {
    let file = digits_file();
    let profile = from_file(&digits_spec(), &bytes(&file)).unwrap();
    let view = DriftView::new(0.25);
    view.set_reference("digits", 1, profile.clone());
    let same = collect(&profile, &file.samples);
    let rescaled: Vec<ReferenceSample> = file
        .samples
        .iter()
        .map(|s| ReferenceSample {
            inputs: [(
                "input".to_string(),
                s.inputs["input"].iter().map(|x| x * 4.0).collect(),
            )]
            .into(),
            outputs: s.outputs.clone(),
        })
        .collect();
    let shifted = collect(&profile, &rescaled);
    let now = 10_000;
    view.observe(&telemetry("pi-1", 1, now - 20, same.clone()), now);
    view.observe(&telemetry("pi-2", 1, now - 20, same.clone()), now);
    view.observe(&telemetry("jet-1", 1, now - 10, shifted), now);
    // Out of the window: counted for the device's latest only.
    view.observe(&telemetry("old", 1, now - WINDOW_SECS - 100, same), now);
    let classes: HashMap<String, String> =
        [("pi-1", "rpi4"), ("pi-2", "rpi4"), ("jet-1", "jetson")]
            .map(|(d, c)| (d.to_string(), c.to_string()))
            .into();
    let drift = view.model("digits", &classes, now);
    assert!(drift.drifting);
    let v = &drift.versions[0];
    assert_eq!(v.version, 1);
    assert_eq!(v.reference.as_ref().unwrap().samples, 16);
    let fleet = v.fleet.as_ref().unwrap();
    assert_eq!(fleet.intervals, 3);
    let class = |name: &str| &v.classes.iter().find(|c| c.class == name).unwrap().score;
    assert!(class("rpi4").psi.unwrap() < 0.01);
    assert!(class("jetson").drifting);
    // The fleet mixes one shifted device in three: in between.
    assert!(fleet.psi.unwrap() > class("rpi4").psi.unwrap());
    assert!(fleet.psi.unwrap() < class("jetson").psi.unwrap());
    let devices: Vec<(&str, bool)> = v
        .devices
        .iter()
        .map(|d| (d.device.as_str(), d.score.drifting))
        .collect();
    assert_eq!(
        devices,
        [
            ("jet-1", true),
            ("old", false),
            ("pi-1", false),
            ("pi-2", false)
        ]
    );
    let input_mean = v.devices[0]
        .score
        .features
        .iter()
        .find(|f| f.tensor == "input" && f.feature == "mean")
        .unwrap();
    assert!(input_mean.mean.unwrap() > input_mean.reference_mean * 3.0);
    let gauges = view.gauges(&classes, now);
    assert!(gauges.iter().any(|g| g.2 == "fleet"));
    assert!(gauges
        .iter()
        .any(|g| g.2 == "class" && g.3.as_deref() == Some("jetson") && g.4 > 0.25));
    assert!(gauges.iter().any(|g| g.2 == "device_max" && g.4 > 0.25));
    view.forget("jet-1");
    assert!(!view.model("digits", &classes, now).drifting);
}

#[test]
fn a_reference_from_traffic_merges_intervals_in_the_spec_bins() {
    let file = digits_file();
    let profile = from_file(&digits_spec(), &bytes(&file)).unwrap();
    let one = collect(&profile, &file.samples);
    let mut other_bins = one.clone();
    other_bins.features[0].histogram = Histogram::new(0.0, 1.0, 4).unwrap();
    let traffic =
        ReferenceProfile::from_traffic(&profile.spec(), [&one, &one, &other_bins]).unwrap();
    assert_eq!(traffic.source, "traffic");
    assert_eq!(traffic.samples, 48);
    // The input mean in other bins was left out of the third interval.
    assert_eq!(traffic.features[0].histogram.total(), 32);
    assert_eq!(traffic.features[1].histogram.total(), 48);
    let psi = edgefleet_shared::drift::psi(
        &profile.features[1].histogram,
        &traffic.features[1].histogram,
    )
    .unwrap();
    assert!(psi < 1e-9, "{psi}");
}

#[test]
fn interval_scores_tell_shifted_traffic_from_the_reference() {
    let file = digits_file();
    let profile = from_file(&digits_spec(), &bytes(&file)).unwrap();
    let view = DriftView::default();
    view.set_reference("digits", 1, profile.clone());
    let inverted: Vec<ReferenceSample> = file
        .samples
        .iter()
        .map(|s| ReferenceSample {
            inputs: [(
                "input".to_string(),
                s.inputs["input"].iter().map(|x| 16.0 - x).collect(),
            )]
            .into(),
            outputs: s.outputs.clone(),
        })
        .collect();
    // What the rollout gate (`Gates::judge_drift`) judges by.
    let same = view.interval_score("digits", 1, &collect(&profile, &file.samples));
    assert!(same.unwrap() < 0.1, "{same:?}");
    let shifted = view.interval_score("digits", 1, &collect(&profile, &inverted));
    assert!(shifted.unwrap() > 0.5, "{shifted:?}");
    // No reference, no score.
    assert_eq!(
        view.interval_score("digits", 2, &collect(&profile, &inverted)),
        None
    );
}
