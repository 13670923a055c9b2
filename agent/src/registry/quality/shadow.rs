//! A shadow candidate on the device: a version the fleet is considering,
//! run on a sampled share of live requests after the caller has its
//! answer, its outputs compared with the served version's.
//!
//! The caller never waits for it. [`Shadow::offer`] hands a sampled
//! request (its inputs and the served outputs) to a bounded queue with a
//! non-blocking send; one worker thread per candidate, at the lowest CPU
//! priority, runs the candidate and compares. A sampled request is
//! dropped, and counted, rather than queued when:
//!
//! - the queue holds `max_queue` requests already;
//! - the candidate used more than `cpu_budget` of one core over the last
//!   [`BUDGET_WINDOW`]. Its cost is the worker thread's CPU time for each
//!   run: the runtimes run a model on the calling thread (ONNX Runtime
//!   with one intra-op thread, tract always), so that is the whole of it.
//!   Wall time would charge the candidate for the time the served models
//!   preempted it, and starve it exactly when it is cheapest to run;
//! - the device is busy serving ([`Shadow::drop_busy`], decided by the
//!   API from its inference permits).
//!
//! [`Shadow::take`] returns the interval's figures for telemetry and
//! starts the next interval. Dropping the [`Shadow`] closes the queue and
//! the worker ends after the request it is running.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use edgefleet_shared::quality::{ShadowSpec, ShadowTelemetry};

use super::random::Random;
use crate::engine::{self, Engine};
use crate::tensor::Tensor;

mod compare;
#[cfg(test)]
mod tests;

pub use compare::{compare, Compared};

/// How far back the candidate's CPU use is held to its budget.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(4);

/// Candidate latencies kept per interval for its percentiles; beyond
/// this the oldest are overwritten.
const MAX_LATENCIES: usize = 4096;

/// Why a shadow candidate cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("cannot start the shadow worker thread for candidate version {version}: {source}")]
    Spawn {
        version: u64,
        source: std::io::Error,
    },
}

/// The candidate version, loaded in the runtime it would serve on.
pub struct Candidate {
    pub version: u64,
    pub engine: Box<dyn Engine>,
}

/// A sampled request waiting for the candidate.
struct Job {
    inputs: Vec<Tensor>,
    served: Vec<Tensor>,
}

/// Figures over one stretch of time.
#[derive(Debug, Default, Clone)]
struct Tally {
    compared: u64,
    agreed: u64,
    errors: u64,
    dropped: u64,
    max_abs: Option<f64>,
    min_cosine: Option<f64>,
    latencies_us: Vec<f64>,
    /// Where the next latency goes once `latencies_us` is full.
    next_latency: usize,
}

impl Tally {
    fn latency(&mut self, us: f64) {
        if self.latencies_us.len() < MAX_LATENCIES {
            self.latencies_us.push(us);
        } else {
            self.latencies_us[self.next_latency % MAX_LATENCIES] = us;
        }
        self.next_latency = self.next_latency.wrapping_add(1);
    }

    fn compared(&mut self, agreed: bool, max_abs: Option<f64>, min_cosine: Option<f64>) {
        self.compared += 1;
        self.agreed += u64::from(agreed);
        self.max_abs = max_of(self.max_abs, max_abs, f64::max);
        self.min_cosine = max_of(self.min_cosine, min_cosine, f64::min);
    }

    fn telemetry(&self, candidate_version: u64) -> ShadowTelemetry {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_by(f64::total_cmp);
        let percentile = |q: f64| {
            let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
            sorted.get(rank - 1).copied()
        };
        ShadowTelemetry {
            candidate_version,
            compared: self.compared,
            agreed: self.agreed,
            errors: self.errors,
            dropped: self.dropped,
            p50_us: percentile(0.50),
            p99_us: percentile(0.99),
            max_abs_error: self.max_abs,
            min_cosine: self.min_cosine,
        }
    }
}

/// Combines two optional figures with `pick`; NaN wins (it is a finding).
fn max_of(a: Option<f64>, b: Option<f64>, pick: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a.is_nan() || b.is_nan() => Some(f64::NAN),
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    }
}

/// The candidate's runs over the last [`BUDGET_WINDOW`].
#[derive(Debug)]
struct Budget {
    /// Share of one core.
    share: f64,
    window: Duration,
    runs: VecDeque<(Instant, Duration)>,
    spent: Duration,
}

impl Budget {
    fn prune(&mut self, now: Instant) {
        while let Some(&(at, cost)) = self.runs.front() {
            if now.saturating_duration_since(at) <= self.window {
                break;
            }
            self.runs.pop_front();
            self.spent = self.spent.saturating_sub(cost);
        }
    }

    fn exhausted(&mut self, now: Instant) -> bool {
        self.prune(now);
        self.spent.as_secs_f64() >= self.share * self.window.as_secs_f64()
    }

    fn charge(&mut self, at: Instant, cost: Duration) {
        self.runs.push_back((at, cost));
        self.spent += cost;
    }
}

/// What the caller side and the worker share.
#[derive(Debug)]
struct Shared {
    /// This interval's figures, and the figures since the candidate was
    /// attached.
    tallies: Mutex<(Tally, Tally)>,
    budget: Mutex<Budget>,
    /// Requests queued or running.
    pending: AtomicUsize,
}

impl Shared {
    fn record(&self, f: impl Fn(&mut Tally)) {
        let mut tallies = self.tallies.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut tallies.0);
        f(&mut tallies.1);
    }

    fn drop_one(&self) {
        self.record(|t| t.dropped += 1);
    }

    fn exhausted(&self, now: Instant) -> bool {
        self.budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .exhausted(now)
    }
}

/// A candidate version run in shadow beside a served one.
pub struct Shadow {
    spec: ShadowSpec,
    candidate_version: u64,
    runtime: &'static str,
    queue: SyncSender<Job>,
    shared: Arc<Shared>,
    random: Random,
}

impl std::fmt::Debug for Shadow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shadow")
            .field("candidate_version", &self.candidate_version)
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

impl Shadow {
    /// Starts the worker for `candidate`, sampling and comparing as `spec`
    /// says (already validated with the signed document).
    pub fn new(spec: ShadowSpec, candidate: Candidate) -> Result<Self, ShadowError> {
        Self::with_window(spec, candidate, BUDGET_WINDOW)
    }

    fn with_window(
        spec: ShadowSpec,
        candidate: Candidate,
        window: Duration,
    ) -> Result<Self, ShadowError> {
        let (queue, jobs) = mpsc::sync_channel(spec.max_queue.max(1) as usize);
        let shared = Arc::new(Shared {
            tallies: Mutex::default(),
            budget: Mutex::new(Budget {
                share: spec.cpu_budget,
                window,
                runs: VecDeque::new(),
                spent: Duration::ZERO,
            }),
            pending: AtomicUsize::new(0),
        });
        let version = candidate.version;
        let runtime = candidate.engine.runtime();
        let worker = Worker {
            spec: spec.clone(),
            candidate,
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name(format!("shadow-v{version}"))
            .spawn(move || worker.run(jobs))
            .map_err(|source| ShadowError::Spawn { version, source })?;
        Ok(Self {
            spec,
            candidate_version: version,
            runtime,
            queue,
            shared,
            random: Random::new(),
        })
    }

    /// The spec it runs by.
    pub fn spec(&self) -> &ShadowSpec {
        &self.spec
    }

    pub fn candidate_version(&self) -> u64 {
        self.candidate_version
    }

    /// The runtime the candidate runs on.
    pub fn runtime(&self) -> &'static str {
        self.runtime
    }

    /// Whether this request is one of the sampled share.
    pub fn sample(&self) -> bool {
        let rate = self.spec.sample_rate;
        rate >= 1.0 || self.random.unit() < rate
    }

    /// Queues a sampled request (its inputs and the served version's
    /// outputs) for the candidate, or drops it (and counts the drop) when
    /// the queue is full or the candidate is over its CPU budget. Never
    /// blocks.
    pub fn offer(&self, inputs: Vec<Tensor>, outputs: &[Tensor]) {
        if self.shared.exhausted(Instant::now()) {
            self.shared.drop_one();
            return;
        }
        let job = Job {
            inputs,
            served: outputs.to_vec(),
        };
        self.shared.pending.fetch_add(1, Ordering::AcqRel);
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.pending.fetch_sub(1, Ordering::AcqRel);
                self.shared.drop_one();
            }
        }
    }

    /// Drops a sampled request because the device is busy serving.
    pub fn drop_busy(&self) {
        self.shared.drop_one();
    }

    /// Sampled requests queued or running on the candidate now.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Acquire)
    }

    /// This interval's figures; the next interval starts empty.
    pub fn take(&self) -> ShadowTelemetry {
        let mut tallies = self
            .shared
            .tallies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut tallies.0).telemetry(self.candidate_version)
    }

    /// The figures since the candidate was attached (for the local
    /// statistics endpoint; telemetry does not reset them).
    pub fn totals(&self) -> ShadowTelemetry {
        let tallies = self
            .shared
            .tallies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tallies.1.telemetry(self.candidate_version)
    }
}

/// The worker thread's side: runs the candidate and compares.
struct Worker {
    spec: ShadowSpec,
    candidate: Candidate,
    shared: Arc<Shared>,
}

impl Worker {
    /// Runs until the [`Shadow`] is dropped (its queue closes).
    fn run(self, jobs: mpsc::Receiver<Job>) {
        lower_priority();
        while let Ok(job) = jobs.recv() {
            self.handle(job);
            self.shared.pending.fetch_sub(1, Ordering::AcqRel);
        }
        tracing::debug!(
            version = self.candidate.version,
            "shadow candidate detached; worker ends"
        );
    }

    fn handle(&self, job: Job) {
        let started = Instant::now();
        // A request that waited while the budget ran out is not run.
        if self.shared.exhausted(started) {
            self.shared.drop_one();
            return;
        }
        let cpu_before = thread_cpu_time();
        let result = engine::infer(self.candidate.engine.as_ref(), job.inputs);
        let wall = started.elapsed();
        let cost = match (cpu_before, thread_cpu_time()) {
            (Some(before), Some(after)) => after.saturating_sub(before),
            _ => wall,
        };
        self.shared
            .budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .charge(started, cost);
        let latency_us = wall.as_secs_f64() * 1e6;
        let outputs = match result {
            Ok(outputs) => outputs,
            Err(e) => {
                tracing::debug!(version = self.candidate.version, error = %e, "shadow candidate failed on a sampled request");
                self.shared.record(|t| {
                    t.errors += 1;
                    t.latency(latency_us);
                });
                return;
            }
        };
        let (mut agreed, mut max_abs, mut min_cosine) = (true, None, None);
        for served in &job.served {
            let Some(candidate) = outputs.iter().find(|o| o.name == served.name) else {
                // The served version's clients read this output.
                agreed = false;
                continue;
            };
            let c = compare(self.spec.comparison(&served.name), candidate, served);
            agreed &= c.agreed;
            max_abs = max_of(max_abs, c.max_abs, f64::max);
            min_cosine = max_of(min_cosine, c.cosine, f64::min);
        }
        self.shared.record(|t| {
            t.compared(agreed, max_abs, min_cosine);
            t.latency(latency_us);
        });
    }
}

/// Puts the calling thread at the lowest CPU priority (nice 19), so the
/// candidate runs on time the served models leave idle. Best effort: a
/// failure leaves it at normal priority, still held to its budget.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: gettid has no arguments and cannot fail; setpriority reads
    // only its integer arguments. On Linux the nice value is per thread,
    // and PRIO_PROCESS with a thread id sets that thread's.
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid);
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19)
    };
    if result != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the shadow worker's priority"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

/// The CPU time the calling thread has used.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec for the call's duration.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (result == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

/// The CPU time the calling thread has used (not measured here: the
/// budget falls back to wall time).
#[cfg(not(target_os = "linux"))]
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    None
}
