//! Per-model runtime choice.
//!
//! At activation a model is loaded in every available runtime that handles
//! its format; each is checked (against the model's signed test vector, or
//! against the others on a probe input when there is none), timed over a
//! few runs, and the fastest correct one serves. The trials are kept so the
//! choice and its timings can be reported.

use std::sync::Arc;
use std::time::Instant;

use edgefleet_shared::{ModelFormat, TensorSpec, TestVector};

use super::{guard, infer, Engine, EngineError, IoSpec};
use crate::tensor::{DataType, Tensor, TensorData};

/// Input shapes the model's configuration declares (`-1`: dynamic). A
/// runtime that needs concrete shapes to plan a model uses them.
pub type ShapeHints = [TensorSpec];

type Loader = Arc<dyn Fn(&[u8], &ShapeHints) -> Result<Box<dyn Engine>, EngineError> + Send + Sync>;

/// A runtime this agent can use for one model format.
#[derive(Clone)]
pub struct RuntimeEntry {
    pub name: &'static str,
    pub format: ModelFormat,
    load: Loader,
}

impl RuntimeEntry {
    pub fn new(
        name: &'static str,
        format: ModelFormat,
        load: impl Fn(&[u8], &ShapeHints) -> Result<Box<dyn Engine>, EngineError>
            + Send
            + Sync
            + 'static,
    ) -> Self {
        Self {
            name,
            format,
            load: Arc::new(load),
        }
    }
}

/// What happened when a runtime was tried on a model.
#[derive(Debug, Clone, PartialEq)]
pub enum TrialOutcome {
    /// Could not load or run the model.
    Failed(String),
    /// Ran, but its outputs were wrong.
    Incorrect(String),
    /// Correct (or unverifiable, when it is the only runtime and there is
    /// no test vector) with this median latency.
    Timed { p50_us: f64, verified: bool },
}

/// One runtime's trial.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub runtime: &'static str,
    pub load_ms: f64,
    pub outcome: TrialOutcome,
}

impl Trial {
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({"runtime": self.runtime, "load_ms": round(self.load_ms)});
        match &self.outcome {
            TrialOutcome::Failed(reason) => {
                v["status"] = "failed".into();
                v["reason"] = reason.clone().into();
            }
            TrialOutcome::Incorrect(reason) => {
                v["status"] = "incorrect".into();
                v["reason"] = reason.clone().into();
            }
            TrialOutcome::Timed { p50_us, verified } => {
                v["status"] = if *verified { "ok" } else { "unverified" }.into();
                v["p50_us"] = round(*p50_us).into();
            }
        }
        v
    }
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The chosen engine and every trial behind the choice.
pub struct Selection {
    pub engine: Box<dyn Engine>,
    pub trials: Vec<Trial>,
}

/// How a candidate's outputs are judged.
#[derive(Debug, Clone, Copy)]
pub enum Check<'a> {
    TestVector(&'a TestVector),
    /// Compare runtimes with each other on a deterministic probe input.
    CrossCompare,
}

/// Every runtime available to this agent.
#[derive(Clone, Default)]
pub struct Runtimes {
    entries: Vec<RuntimeEntry>,
}

impl std::fmt::Debug for Runtimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| e.name))
            .finish()
    }
}

/// Timed runs per candidate (fewer when the budget runs out first).
const TIMED_RUNS: usize = 15;
/// Fast models are timed for at least this long (up to MAX_TIMED_RUNS).
const MIN_TIMING_MS: f64 = 20.0;
const MAX_TIMED_RUNS: usize = 2000;
const WARM_UP_MS: f64 = 5.0;
const TIMING_BUDGET_MS: f64 = 400.0;

impl Runtimes {
    /// The pure-Rust runtimes every build has.
    pub fn builtin() -> Self {
        super::tract::configure_kernels();
        Self {
            entries: vec![
                RuntimeEntry::new(super::tract::TRACT_ONNX, ModelFormat::Onnx, |b, hints| {
                    super::tract::TractEngine::load_onnx(b, hints)
                        .map(|e| Box::new(e) as Box<dyn Engine>)
                }),
                RuntimeEntry::new(
                    super::tract::TRACT_TFLITE,
                    ModelFormat::Tflite,
                    |b, hints| {
                        super::tract::TractEngine::load_tflite(b, hints)
                            .map(|e| Box::new(e) as Box<dyn Engine>)
                    },
                ),
            ],
        }
    }

    /// Adds a runtime, ahead of the built-in ones (it is the reference for
    /// cross-comparison when no test vector exists).
    pub fn prepend(&mut self, entry: RuntimeEntry) {
        self.entries.insert(0, entry);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }

    fn for_format(
        &self,
        format: ModelFormat,
        pin: Option<&str>,
    ) -> Result<Vec<&RuntimeEntry>, EngineError> {
        let candidates: Vec<_> = self.entries.iter().filter(|e| e.format == format).collect();
        if candidates.is_empty() {
            return Err(EngineError::UnsupportedFormat(format));
        }
        match pin {
            None => Ok(candidates),
            Some(name) => {
                let pinned: Vec<_> = candidates
                    .iter()
                    .copied()
                    .filter(|e| e.name == name)
                    .collect();
                if pinned.is_empty() {
                    let names: Vec<_> = candidates.iter().map(|e| e.name).collect();
                    return Err(EngineError::Load {
                        runtime: "selection",
                        reason: format!(
                            "pinned runtime {name:?} is not available for {format} models here (available: {})",
                            names.join(", ")
                        ),
                    });
                }
                Ok(pinned)
            }
        }
    }

    /// Loads `bytes` in every candidate runtime, checks and times each,
    /// and returns the fastest correct one.
    pub fn select(
        &self,
        format: ModelFormat,
        bytes: &[u8],
        hints: &ShapeHints,
        check: Check<'_>,
        pin: Option<&str>,
    ) -> Result<Selection, EngineError> {
        let candidates = self.for_format(format, pin)?;
        let mut trials = Vec::new();
        let mut loaded: Vec<(usize, Box<dyn Engine>)> = Vec::new();
        for entry in &candidates {
            let started = Instant::now();
            let result = guard(entry.name, || (entry.load)(bytes, hints));
            let load_ms = started.elapsed().as_secs_f64() * 1000.0;
            match result {
                Ok(engine) => {
                    loaded.push((trials.len(), engine));
                    trials.push(Trial {
                        runtime: entry.name,
                        load_ms,
                        outcome: TrialOutcome::Timed {
                            p50_us: 0.0,
                            verified: false,
                        },
                    });
                }
                Err(e) => trials.push(Trial {
                    runtime: entry.name,
                    load_ms,
                    outcome: TrialOutcome::Failed(e.to_string()),
                }),
            }
        }
        if loaded.is_empty() {
            let reasons: Vec<String> = trials
                .iter()
                .map(|t| match &t.outcome {
                    TrialOutcome::Failed(r) => r.clone(),
                    _ => String::new(),
                })
                .collect();
            return Err(EngineError::Load {
                runtime: "selection",
                reason: format!("no runtime could load the model: {}", reasons.join("; ")),
            });
        }

        // Correctness. Without a test vector the runtimes are compared on
        // a probe input; dynamic dimensions are tried at a few sizes, since
        // some models (audio front-ends) need more than one sample.
        let (inputs, verdicts) = match check {
            Check::TestVector(tv) => {
                let inputs = test_vector_inputs(tv).map_err(|reason| EngineError::Load {
                    runtime: "selection",
                    reason,
                })?;
                let verdicts = loaded
                    .iter()
                    .map(|(index, engine)| {
                        let verdict = match infer(engine.as_ref(), inputs.clone()) {
                            Err(e) => Err(TrialOutcome::Failed(e.to_string())),
                            Ok(outputs) => compare_test_vector(&outputs, tv)
                                .map(|()| true)
                                .map_err(TrialOutcome::Incorrect),
                        };
                        (*index, verdict)
                    })
                    .collect::<Vec<_>>();
                (Some(inputs), verdicts)
            }
            Check::CrossCompare => cross_compare(&loaded),
        };
        // Speed, for the ones that passed.
        let mut best: Option<(f64, Box<dyn Engine>)> = None;
        for ((index, engine), (_, verdict)) in loaded.into_iter().zip(verdicts) {
            match verdict {
                Err(outcome) => trials[index].outcome = outcome,
                Ok(verified) => {
                    // Without a runnable probe there is nothing to time:
                    // keep the first (preferred) runtime that loaded.
                    let p50_us = match &inputs {
                        Some(inputs) => time_runs(engine.as_ref(), inputs),
                        None => f64::NAN,
                    };
                    trials[index].outcome = TrialOutcome::Timed { p50_us, verified };
                    if best.as_ref().is_none_or(|(b, _)| p50_us < *b) {
                        best = Some((p50_us, engine));
                    }
                }
            }
        }
        match best {
            Some((_, engine)) => {
                tracing::info!(
                    chosen = engine.runtime(),
                    trials = %serde_json::Value::Array(trials.iter().map(Trial::to_json).collect()),
                    "runtime selected"
                );
                Ok(Selection { engine, trials })
            }
            None => Err(EngineError::Incorrect(
                serde_json::Value::Array(trials.iter().map(Trial::to_json).collect()).to_string(),
            )),
        }
    }
}

type Verdicts = Vec<(usize, Result<bool, TrialOutcome>)>;

/// Runs every loaded engine on probe inputs and compares them with the
/// first one (the preferred, reference runtime). Returns the probe that
/// worked, or `None` when no probe size ran anywhere: then every runtime
/// is unverified.
fn cross_compare(loaded: &[(usize, Box<dyn Engine>)]) -> (Option<Vec<Tensor>>, Verdicts) {
    for dynamic in [1, 64, 1024] {
        let inputs = probe_inputs(loaded[0].1.inputs(), dynamic);
        let results: Vec<_> = loaded
            .iter()
            .map(|(index, engine)| (*index, infer(engine.as_ref(), inputs.clone())))
            .collect();
        let Some(reference) = results.iter().find_map(|(_, r)| r.as_ref().ok()).cloned() else {
            continue;
        };
        let several = results.iter().filter(|(_, r)| r.is_ok()).count() > 1;
        let verdicts = results
            .into_iter()
            .map(|(index, result)| {
                let verdict = match result {
                    Err(e) => Err(TrialOutcome::Failed(e.to_string())),
                    Ok(outputs) => compare_outputs(&outputs, &reference)
                        .map(|()| several)
                        .map_err(TrialOutcome::Incorrect),
                };
                (index, verdict)
            })
            .collect();
        return (Some(inputs), verdicts);
    }
    (
        None,
        loaded
            .iter()
            .map(|(index, _)| (*index, Ok(false)))
            .collect(),
    )
}

fn time_runs(engine: &dyn Engine, inputs: &[Tensor]) -> f64 {
    // Warm up: at least 2 runs, and for fast models until caches and
    // allocators have settled (5 ms).
    let warm = Instant::now();
    for i in 0..MAX_TIMED_RUNS {
        let _ = infer(engine, inputs.to_vec());
        if i >= 1 && warm.elapsed().as_secs_f64() * 1000.0 >= WARM_UP_MS {
            break;
        }
    }
    let started = Instant::now();
    let elapsed_ms = || started.elapsed().as_secs_f64() * 1000.0;
    let mut samples = Vec::with_capacity(TIMED_RUNS);
    // Slow models: TIMED_RUNS runs within the budget. Fast ones (a few
    // microseconds, where one run is noise): until MIN_TIMING_MS of them.
    while samples.len() < MAX_TIMED_RUNS
        && (samples.len() < 3
            || (samples.len() < TIMED_RUNS || elapsed_ms() < MIN_TIMING_MS)
                && elapsed_ms() < TIMING_BUDGET_MS)
    {
        let t = Instant::now();
        let _ = infer(engine, inputs.to_vec());
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Deterministic inputs for the model's declared interface: dynamic
/// dimensions become `dynamic` (a leading batch dimension 1), floats a
/// fixed pattern in [0, 1), integers 0.
pub fn probe_inputs(specs: &[IoSpec], dynamic: usize) -> Vec<Tensor> {
    specs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, d)| d.unwrap_or(if i == 0 { 1 } else { dynamic }))
                .collect();
            let n = Tensor::element_count(&shape).unwrap_or(0);
            let values: Vec<f64> = match spec.datatype {
                DataType::Fp16 | DataType::Fp32 | DataType::Fp64 => {
                    (0..n).map(|i| ((i as f64) * 0.618_034).fract()).collect()
                }
                _ => vec![0.0; n],
            };
            Tensor {
                name: spec.name.clone(),
                shape,
                data: TensorData::from_f64(spec.datatype, &values),
            }
        })
        .collect()
}

fn test_vector_inputs(tv: &TestVector) -> Result<Vec<Tensor>, String> {
    tv.inputs
        .iter()
        .map(|t| {
            let datatype: DataType = t.datatype.parse()?;
            Ok(Tensor {
                name: t.name.clone(),
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                data: TensorData::from_f64(datatype, &t.data),
            })
        })
        .collect()
}

/// Checks outputs against a signed test vector's expected values.
pub fn compare_test_vector(outputs: &[Tensor], tv: &TestVector) -> Result<(), String> {
    for expected in &tv.expected {
        let actual = outputs
            .iter()
            .find(|o| o.name == expected.name)
            .ok_or_else(|| format!("test vector: model has no output {:?}", expected.name))?;
        let got = actual.data.to_f64();
        if got.len() != expected.data.len() {
            return Err(format!(
                "test vector: output {:?} has {} elements, expected {}",
                expected.name,
                got.len(),
                expected.data.len()
            ));
        }
        if let Some((i, (g, e))) = got
            .iter()
            .zip(&expected.data)
            .enumerate()
            .find(|(_, (g, e))| (*g - *e).abs().is_nan() || (*g - *e).abs() > tv.tolerance)
        {
            return Err(format!(
                "test vector failed: output {:?}[{i}] is {g}, expected {e} ± {}",
                expected.name, tv.tolerance
            ));
        }
    }
    Ok(())
}

/// Two runtimes agree when every element is within 1e-3 absolute plus 1%
/// relative of the reference.
pub fn compare_outputs(outputs: &[Tensor], reference: &[Tensor]) -> Result<(), String> {
    for r in reference {
        let o = outputs
            .iter()
            .find(|o| o.name == r.name)
            .ok_or_else(|| format!("output {:?} missing", r.name))?;
        if o.shape != r.shape {
            return Err(format!(
                "output {:?} has shape {:?}, reference {:?}",
                r.name, o.shape, r.shape
            ));
        }
        for (i, (a, b)) in o.data.to_f64().iter().zip(r.data.to_f64()).enumerate() {
            let diff = (a - b).abs();
            if diff.is_nan() && !(a.is_nan() && b.is_nan()) || diff > 1e-3 + 1e-2 * b.abs() {
                return Err(format!(
                    "output {:?}[{i}] is {a}, reference runtime gives {b}",
                    r.name
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake engine: y = x * factor, taking `cost` spins per call.
    struct Scale {
        name: &'static str,
        factor: f32,
        spins: u64,
        io: Vec<IoSpec>,
    }

    impl Engine for Scale {
        fn runtime(&self) -> &'static str {
            self.name
        }
        fn inputs(&self) -> &[IoSpec] {
            &self.io
        }
        fn outputs(&self) -> &[IoSpec] {
            &self.io
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
            let mut acc = 0u64;
            for i in 0..self.spins {
                acc = std::hint::black_box(acc.wrapping_add(i));
            }
            let TensorData::Fp32(v) = &inputs[0].data else {
                unreachable!()
            };
            Ok(vec![Tensor {
                name: "x".into(),
                shape: inputs[0].shape.clone(),
                data: TensorData::Fp32(v.iter().map(|x| x * self.factor).collect()),
            }])
        }
    }

    fn entry(name: &'static str, factor: f32, spins: u64) -> RuntimeEntry {
        RuntimeEntry::new(name, ModelFormat::Onnx, move |_, _| {
            Ok(Box::new(Scale {
                name,
                factor,
                spins,
                io: vec![IoSpec {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    shape: vec![None, Some(4)],
                }],
            }) as Box<dyn Engine>)
        })
    }

    fn runtimes(entries: Vec<RuntimeEntry>) -> Runtimes {
        Runtimes { entries }
    }

    #[test]
    fn the_fastest_correct_runtime_wins_and_wrong_ones_are_marked() {
        let rt = runtimes(vec![
            entry("reference", 2.0, 200_000),
            entry("fast-but-wrong", 3.0, 0),
            entry("fast", 2.0, 0),
        ]);
        let sel = rt
            .select(ModelFormat::Onnx, b"", &[], Check::CrossCompare, None)
            .unwrap();
        assert_eq!(sel.engine.runtime(), "fast");
        assert!(matches!(sel.trials[1].outcome, TrialOutcome::Incorrect(_)));
        assert!(matches!(
            sel.trials[0].outcome,
            TrialOutcome::Timed { verified: true, .. }
        ));
    }

    #[test]
    fn pinning_restricts_the_choice_and_unknown_pins_are_named() {
        let rt = runtimes(vec![
            entry("reference", 2.0, 100_000),
            entry("fast", 2.0, 0),
        ]);
        let sel = rt
            .select(
                ModelFormat::Onnx,
                b"",
                &[],
                Check::CrossCompare,
                Some("reference"),
            )
            .unwrap();
        assert_eq!(sel.engine.runtime(), "reference");
        assert_eq!(sel.trials.len(), 1);
        let err = rt
            .select(
                ModelFormat::Onnx,
                b"",
                &[],
                Check::CrossCompare,
                Some("gpu"),
            )
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("\"gpu\" is not available"),
            "{err}"
        );
        assert!(err.to_string().contains("reference, fast"), "{err}");
    }

    #[test]
    fn a_test_vector_rejects_every_runtime_that_misses_it() {
        use edgefleet_shared::documents::TestTensor;
        let tv = TestVector {
            inputs: vec![TestTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                data: vec![1.0, 2.0, 3.0, 4.0],
            }],
            expected: vec![TestTensor {
                name: "x".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                data: vec![3.0, 6.0, 9.0, 12.0],
            }],
            tolerance: 1e-6,
        };
        let rt = runtimes(vec![entry("double", 2.0, 0), entry("triple", 3.0, 0)]);
        let sel = rt
            .select(ModelFormat::Onnx, b"", &[], Check::TestVector(&tv), None)
            .unwrap();
        assert_eq!(sel.engine.runtime(), "triple");
        let rt = runtimes(vec![entry("double", 2.0, 0)]);
        let err = rt
            .select(ModelFormat::Onnx, b"", &[], Check::TestVector(&tv), None)
            .err()
            .unwrap();
        assert!(matches!(err, EngineError::Incorrect(_)), "{err}");
        assert!(
            err.to_string()
                .contains("no runtime produced correct results"),
            "{err}"
        );
    }

    #[test]
    fn panicking_and_failing_loaders_are_reported_not_fatal() {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        let rt = runtimes(vec![
            RuntimeEntry::new("panics", ModelFormat::Onnx, |_, _| {
                CALLS.fetch_add(1, Ordering::SeqCst);
                panic!("bad op")
            }),
            RuntimeEntry::new("fails", ModelFormat::Onnx, |_, _| {
                Err(EngineError::Load {
                    runtime: "fails",
                    reason: "unsupported op If".into(),
                })
            }),
            entry("works", 1.0, 0),
        ]);
        let sel = rt
            .select(ModelFormat::Onnx, b"", &[], Check::CrossCompare, None)
            .unwrap();
        assert_eq!(sel.engine.runtime(), "works");
        assert!(matches!(&sel.trials[0].outcome, TrialOutcome::Failed(r) if r.contains("bad op")));
        assert!(matches!(&sel.trials[1].outcome, TrialOutcome::Failed(r) if r.contains("If")));
        // Alone and unverifiable, the survivor is marked as such.
        assert!(matches!(
            sel.trials[2].outcome,
            TrialOutcome::Timed {
                verified: false,
                ..
            }
        ));
        assert_eq!(CALLS.load(Ordering::SeqCst), 1);
        let err = runtimes(vec![])
            .select(ModelFormat::Tflite, b"", &[], Check::CrossCompare, None)
            .err()
            .unwrap();
        assert_eq!(err, EngineError::UnsupportedFormat(ModelFormat::Tflite));
    }
}
