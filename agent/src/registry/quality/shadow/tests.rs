//! The shadow runtime with a controllable candidate: sampling, the queue
//! bound, the CPU budget and the worker's end. Comparisons on real models
//! are tested through the API (`quality/tests.rs`).

use std::sync::mpsc as std_mpsc;

use edgefleet_shared::quality::{Comparison, ModelArtifact, OutputComparison};
use edgefleet_shared::ModelFormat;

use super::*;
use crate::engine::{EngineError, IoSpec};
use crate::tensor::{DataType, TensorData};

/// y = x * scale, after `before` runs (a sleep, or waiting on a gate).
struct Scale {
    io: (Vec<IoSpec>, Vec<IoSpec>),
    scale: f32,
    before: Box<dyn Fn() + Send + Sync>,
}

impl Engine for Scale {
    fn runtime(&self) -> &'static str {
        "scale"
    }
    fn inputs(&self) -> &[IoSpec] {
        &self.io.0
    }
    fn outputs(&self) -> &[IoSpec] {
        &self.io.1
    }
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        (self.before)();
        let x = inputs.into_iter().next().expect("validated");
        let TensorData::Fp32(v) = x.data else {
            unreachable!("validated as FP32")
        };
        Ok(vec![Tensor {
            name: "y".into(),
            shape: x.shape,
            data: TensorData::Fp32(v.iter().map(|x| x * self.scale).collect()),
        }])
    }
}

fn spec_io(name: &str) -> IoSpec {
    IoSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        shape: vec![None],
    }
}

fn candidate(scale: f32, before: impl Fn() + Send + Sync + 'static) -> Candidate {
    Candidate {
        version: 2,
        engine: Box::new(Scale {
            io: (vec![spec_io("x")], vec![spec_io("y")]),
            scale,
            before: Box::new(before),
        }),
    }
}

fn spec(sample_rate: f64, max_queue: u32, cpu_budget: f64) -> ShadowSpec {
    ShadowSpec {
        candidate: ModelArtifact {
            version: 2,
            format: ModelFormat::Onnx,
            sha256: "ab".repeat(32),
            size: 1,
            urls: vec!["http://x/".into()],
            zstd: None,
        },
        sample_rate,
        compare: vec![OutputComparison {
            output: "y".into(),
            comparison: Comparison::MaxAbs { limit: 0.01 },
        }],
        max_queue,
        cpu_budget,
    }
}

fn x(v: &[f32]) -> Vec<Tensor> {
    vec![Tensor {
        name: "x".into(),
        shape: vec![v.len()],
        data: TensorData::Fp32(v.to_vec()),
    }]
}

fn y(v: &[f32]) -> Vec<Tensor> {
    vec![Tensor {
        name: "y".into(),
        shape: vec![v.len()],
        data: TensorData::Fp32(v.to_vec()),
    }]
}

fn drain(shadow: &Shadow) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while shadow.pending() > 0 {
        assert!(
            Instant::now() < deadline,
            "the shadow worker never caught up"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn samples_at_the_spec_rate() {
    for rate in [0.1, 0.5] {
        let shadow = Shadow::new(spec(rate, 8, 1.0), candidate(1.0, || {})).unwrap();
        let n = 10_000;
        let sampled = (0..n).filter(|_| shadow.sample()).count() as f64;
        // Four standard deviations of a binomial draw.
        let tolerance = 4.0 * (n as f64 * rate * (1.0 - rate)).sqrt();
        assert!(
            (sampled - n as f64 * rate).abs() < tolerance,
            "rate {rate}: {sampled} of {n} sampled"
        );
    }
    let all = Shadow::new(spec(1.0, 8, 1.0), candidate(1.0, || {})).unwrap();
    assert!((0..1000).all(|_| all.sample()));
}

#[test]
fn agreement_and_errors_are_counted_and_taken_per_interval() {
    let shadow = Shadow::new(spec(1.0, 8, 1.0), candidate(1.001, || {})).unwrap();
    shadow.offer(x(&[1.0, 2.0]), &y(&[1.0, 2.0]));
    drain(&shadow);
    // The served answer differed by 1 from the candidate's: disagreement.
    shadow.offer(x(&[1.0, 2.0]), &y(&[2.0, 2.0]));
    drain(&shadow);
    // The candidate refuses an input the served version took.
    shadow.offer(
        x(&[])
            .into_iter()
            .map(|t| Tensor {
                name: "z".into(),
                ..t
            })
            .collect(),
        &y(&[]),
    );
    drain(&shadow);
    let t = shadow.take();
    assert_eq!(
        (t.compared, t.agreed, t.errors, t.dropped),
        (2, 1, 1, 0),
        "{t:?}"
    );
    assert_eq!(t.candidate_version, 2);
    assert!((t.max_abs_error.unwrap() - 0.999).abs() < 1e-4, "{t:?}");
    assert!(t.p50_us.is_some() && t.p99_us >= t.p50_us, "{t:?}");
    let next = shadow.take();
    assert_eq!((next.compared, next.errors, next.p50_us), (0, 0, None));
    assert_eq!(shadow.totals().compared, 2, "totals outlive the interval");
}

#[test]
fn a_full_queue_drops_and_counts_without_blocking_the_caller() {
    let (started_tx, started) = std_mpsc::channel::<()>();
    let (release, gate) = std_mpsc::channel::<()>();
    let (started_tx, gate) = (Mutex::new(started_tx), Mutex::new(gate));
    let shadow = Shadow::new(
        spec(1.0, 4, 1.0),
        candidate(1.0, move || {
            started_tx.lock().unwrap().send(()).unwrap();
            gate.lock().unwrap().recv().unwrap();
        }),
    )
    .unwrap();
    shadow.offer(x(&[1.0]), &y(&[1.0]));
    started.recv().unwrap();
    // One running, four queued: the next five are dropped at once.
    let offered = Instant::now();
    for _ in 0..9 {
        shadow.offer(x(&[1.0]), &y(&[1.0]));
    }
    assert!(
        offered.elapsed() < Duration::from_millis(100),
        "offer waited"
    );
    assert_eq!(shadow.pending(), 5);
    for _ in 0..5 {
        release.send(()).unwrap();
    }
    drain(&shadow);
    let t = shadow.take();
    assert_eq!((t.compared, t.agreed, t.dropped), (5, 5, 5), "{t:?}");
}

/// Runs for `cpu` of this thread's CPU time.
fn spin(cpu: Duration) {
    let start = thread_cpu_time().expect("thread CPU time on Linux");
    while thread_cpu_time().unwrap() - start < cpu {
        std::hint::spin_loop();
    }
}

#[test]
fn a_candidate_over_its_cpu_budget_is_skipped() {
    // 0.1 % of a core over 100 s: 100 ms, five runs of 20 ms of CPU
    // (however long the loaded machine takes to give them).
    let window = Duration::from_secs(100);
    let shadow = Shadow::with_window(
        spec(1.0, 8, 0.001),
        candidate(1.0, || spin(Duration::from_millis(20))),
        window,
    )
    .unwrap();
    for _ in 0..30 {
        shadow.offer(x(&[1.0]), &y(&[1.0]));
        drain(&shadow);
    }
    let t = shadow.take();
    assert_eq!((t.compared, t.dropped), (5, 25), "{t:?}");
}

#[test]
fn the_cpu_budget_recovers_once_its_runs_leave_the_window() {
    // 10 % of 300 ms: 30 ms, two runs of 20 ms.
    let window = Duration::from_millis(300);
    let shadow = Shadow::with_window(
        spec(1.0, 8, 0.1),
        candidate(1.0, || spin(Duration::from_millis(20))),
        window,
    )
    .unwrap();
    for _ in 0..4 {
        shadow.offer(x(&[1.0]), &y(&[1.0]));
        drain(&shadow);
    }
    let t = shadow.take();
    assert_eq!((t.compared, t.dropped), (2, 2), "{t:?}");
    std::thread::sleep(window + Duration::from_millis(50));
    shadow.offer(x(&[1.0]), &y(&[1.0]));
    drain(&shadow);
    assert_eq!(shadow.take().compared, 1, "the budget recovers");
}

#[test]
fn the_worker_ends_when_the_shadow_is_dropped() {
    struct Flag(std_mpsc::Sender<()>);
    impl Drop for Flag {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }
    let (tx, ended) = std_mpsc::channel();
    let flag = Flag(tx);
    let shadow = Shadow::new(
        spec(1.0, 8, 1.0),
        candidate(1.0, move || {
            let _ = &flag;
        }),
    )
    .unwrap();
    shadow.offer(x(&[1.0]), &y(&[1.0]));
    drain(&shadow);
    assert!(ended.try_recv().is_err(), "the candidate is still loaded");
    drop(shadow);
    ended
        .recv_timeout(Duration::from_secs(5))
        .expect("the worker (and the candidate it holds) went away");
}
