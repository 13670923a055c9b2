//! Dynamic batching: concurrent requests to one model merged into one run
//! of the model, and its outputs split back per request (as Triton's
//! dynamic batcher does).
//!
//! A request joins batching in [`super::schedule::run`], after it took its
//! permit and only when `[batching]` enables its model and the model has a
//! batch dimension (every input's first dimension dynamic). Its inputs are
//! validated first, so a bad request fails alone and at once. It then
//! either runs at once by itself (the model had a free run slot and nobody
//! waited) or waits in the model's queue; a dispatcher task, started by
//! the first waiting request and ending when the queue is empty, hands
//! each batch [`queue::Queue`] releases to the thread the model's
//! placement calls for. A batch that fails is rerun one request at a time,
//! so each request gets the answer (or the error) it would have had alone.
//!
//! Permits: each request keeps its own `api.max_concurrent_requests`
//! permit while it waits and while its batch runs, until the runtime
//! finishes; a batch of 8 requests holds 8 permits. The limit therefore
//! still counts requests, and a `max_batch` above it cannot fill.

pub mod queue;
pub mod tensors;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit};

pub use crate::config::batching::{
    BatchingConfig, ModelBatchingConfig, MAX_BATCH_LIMIT, MAX_DELAY_LIMIT_US,
};
pub use queue::Policy;

use crate::engine::{self, EngineError};
use crate::registry::{Placement, ServedModel};
use crate::tensor::Tensor;

/// The batching settings of the API, shared by every request.
#[derive(Debug, Clone)]
pub struct Batching {
    config: Arc<BatchingConfig>,
    /// Runs of one model at once for runtimes that run concurrently.
    cores: usize,
    /// Each served model version's queue and statistics, found by the
    /// model's address and gone once the version is no longer served.
    models: Arc<Mutex<Vec<PerModel>>>,
}

/// A served model version and its batching state.
type PerModel = (Weak<ServedModel>, Arc<ModelBatching>);

impl Default for Batching {
    fn default() -> Self {
        Self::new(BatchingConfig::default())
    }
}

impl Batching {
    /// Batching as `config` sets it.
    pub fn new(config: BatchingConfig) -> Self {
        Self {
            config: Arc::new(config),
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            models: Default::default(),
        }
    }

    fn models(&self) -> MutexGuard<'_, Vec<PerModel>> {
        self.models.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `model`'s batching state, made on its first batched request.
    fn of(&self, model: &Arc<ServedModel>) -> Arc<ModelBatching> {
        let mut models = self.models();
        models.retain(|(m, _)| m.strong_count() > 0);
        if let Some((_, b)) = models
            .iter()
            .find(|(m, _)| m.as_ptr() == Arc::as_ptr(model))
        {
            return Arc::clone(b);
        }
        let b = Arc::new(ModelBatching::default());
        models.push((Arc::downgrade(model), Arc::clone(&b)));
        b
    }

    /// `model`'s batch statistics, as `/stats` shows them.
    pub fn stats_json(&self, model: &ServedModel) -> Value {
        let found = self
            .models()
            .iter()
            .find(|(m, _)| std::ptr::eq(m.as_ptr(), model))
            .map(|(_, b)| Arc::clone(b));
        found.unwrap_or_default().stats_json()
    }

    /// The policy for `model`, `None` when its requests are not batched.
    /// ONNX Runtime sessions run one request at a time (their runs are
    /// serialised): a second batch would only wait on the first, so the
    /// queue lets one grow instead. Other runtimes run concurrently, up to
    /// one run per core.
    pub fn policy_for(&self, model: &ServedModel) -> Option<Policy> {
        let runs = if model.engine.runtime().starts_with("onnxruntime") {
            1
        } else {
            self.cores
        };
        self.config.policy_for(&model.name, runs)
    }
}

/// What the answer of a waiting request arrives as.
pub type Answer = Result<Vec<Tensor>, EngineError>;

/// A request waiting in a model's queue.
pub struct Waiting {
    inputs: Vec<Tensor>,
    rows: usize,
    reply: oneshot::Sender<Answer>,
    /// Released when the request's run ends (not when its client gives up).
    _permit: OwnedSemaphorePermit,
}

struct State {
    queue: queue::Queue<tensors::Key, Waiting>,
    /// A dispatcher task runs; it does whenever the queue is not empty.
    dispatcher: bool,
}

/// One model's batching state: its queue and its batch statistics. Kept
/// by [`Batching`] while the model version is served.
pub struct ModelBatching {
    state: Mutex<State>,
    /// Wakes the dispatcher: an arrival or a finished run.
    wake: Notify,
    /// The model's outputs turned out not to keep the batch dimension:
    /// its requests are no longer batched.
    unbatchable: AtomicBool,
    stats: BatchStats,
}

impl Default for ModelBatching {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                queue: queue::Queue::default(),
                dispatcher: false,
            }),
            wake: Notify::new(),
            unbatchable: AtomicBool::new(false),
            stats: BatchStats::default(),
        }
    }
}

impl std::fmt::Debug for ModelBatching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelBatching")
            .field("unbatchable", &self.unbatchable.load(Ordering::Relaxed))
            .finish()
    }
}

impl ModelBatching {
    /// The queue, even after a panic elsewhere poisoned its lock: every
    /// change to it is a single push, removal or count.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The `batches` figures of the model's statistics.
    pub fn stats_json(&self) -> Value {
        self.stats.to_json(self.unbatchable.load(Ordering::Relaxed))
    }

    fn finished(&self) {
        self.lock().queue.finished();
        self.wake.notify_one();
    }
}

/// Batch counters of one model.
#[derive(Debug, Default)]
struct BatchStats {
    /// Runs started from the queue (one or more requests).
    runs: AtomicU64,
    /// Runs that merged two or more requests and succeeded.
    merged_runs: AtomicU64,
    /// Requests answered by those merged runs.
    merged_requests: AtomicU64,
    /// Merged runs that failed, whose requests then ran one by one.
    fallbacks: AtomicU64,
    /// Merged runs by rows: 2, 3-4, 5-8, ... , 513-1024.
    by_rows: [AtomicU64; ROW_BUCKETS],
}

const ROW_BUCKETS: usize = 10;

impl BatchStats {
    fn merged(&self, requests: usize, rows: usize) {
        self.merged_runs.fetch_add(1, Ordering::Relaxed);
        self.merged_requests
            .fetch_add(requests as u64, Ordering::Relaxed);
        let bucket = (rows.max(2) - 1).ilog2() as usize;
        self.by_rows[bucket.min(ROW_BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    fn to_json(&self, unbatchable: bool) -> Value {
        let by_rows: BTreeMap<String, u64> = self
            .by_rows
            .iter()
            .enumerate()
            .filter_map(|(i, count)| {
                let count = count.load(Ordering::Relaxed);
                let (low, high) = ((1usize << i) + 1, 1usize << (i + 1));
                let label = if low == high {
                    high.to_string()
                } else {
                    format!("{low}-{high}")
                };
                (count > 0).then_some((label, count))
            })
            .collect();
        json!({
            "runs": self.runs.load(Ordering::Relaxed),
            "merged_runs": self.merged_runs.load(Ordering::Relaxed),
            "merged_requests": self.merged_requests.load(Ordering::Relaxed),
            "fallbacks": self.fallbacks.load(Ordering::Relaxed),
            "merged_runs_by_rows": by_rows,
            "unbatchable": unbatchable,
        })
    }
}

/// A run slot of a model's queue, given back when dropped (when the
/// runtime finished, even if the client stopped waiting).
pub struct RunSlot(Arc<ServedModel>, Arc<ModelBatching>);

impl Drop for RunSlot {
    fn drop(&mut self) {
        self.1.finished();
    }
}

/// Where a request goes.
pub enum Route {
    /// Runs now by itself, as without batching; `slot` (when batching is
    /// on) must be held until the runtime finishes.
    Alone {
        inputs: Vec<Tensor>,
        permit: OwnedSemaphorePermit,
        slot: Option<RunSlot>,
    },
    /// Waits in the model's queue; its answer comes on this channel.
    Queued(oneshot::Receiver<Answer>),
    /// Refused: the inputs do not fit the model.
    Invalid(EngineError),
}

/// Routes a request holding `permit` to `model`.
pub fn route(
    batching: &Batching,
    model: &Arc<ServedModel>,
    inputs: Vec<Tensor>,
    permit: OwnedSemaphorePermit,
) -> Route {
    let alone = |inputs, permit, slot| Route::Alone {
        inputs,
        permit,
        slot,
    };
    // Models not batched (the default) never touch the batching state.
    let Some(policy) = batching
        .policy_for(model)
        .filter(|_| tensors::model_batches(model.engine.inputs()))
    else {
        return alone(inputs, permit, None);
    };
    let state = batching.of(model);
    if state.unbatchable.load(Ordering::Relaxed) {
        return alone(inputs, permit, None);
    }
    let inputs = match engine::validate_inputs(model.engine.inputs(), inputs) {
        Ok(inputs) => inputs,
        Err(e) => return Route::Invalid(e),
    };
    let Some((key, rows)) = tensors::key_and_rows(&inputs) else {
        return alone(inputs, permit, None);
    };
    let batched = state;
    let mut state = batched.lock();
    if state.queue.start_alone(&policy) {
        drop(state);
        return alone(
            inputs,
            permit,
            Some(RunSlot(Arc::clone(model), Arc::clone(&batched))),
        );
    }
    let (reply, answer) = oneshot::channel();
    let waiting = Waiting {
        inputs,
        rows,
        reply,
        _permit: permit,
    };
    state.queue.push(key, rows, waiting, Instant::now());
    if state.dispatcher {
        drop(state);
        batched.wake.notify_one();
    } else {
        state.dispatcher = true;
        drop(state);
        tokio::spawn(dispatch(Arc::clone(model), batched, policy));
    }
    Route::Queued(answer)
}

/// Starts the batches `model`'s queue releases, until the queue is empty.
async fn dispatch(model: Arc<ServedModel>, batched: Arc<ModelBatching>, policy: Policy) {
    loop {
        let (batches, deadline, done) = {
            let mut state = batched.lock();
            let now = Instant::now();
            let mut batches = Vec::new();
            while let Some(batch) = state.queue.next_batch(&policy, now) {
                batches.push(batch);
            }
            // The next arrival starts a new dispatcher.
            let done = state.queue.is_empty();
            if done {
                state.dispatcher = false;
            }
            (batches, state.queue.deadline(&policy), done)
        };
        for batch in batches {
            start(&model, &batched, batch);
        }
        if done {
            return;
        }
        let woken = batched.wake.notified();
        match deadline {
            Some(deadline) => {
                let _ = tokio::time::timeout_at(deadline.into(), woken).await;
            }
            None => woken.await,
        }
    }
}

/// Runs one batch where the model's placement says, like a lone request
/// of the batch's size (see [`super::schedule::placement_for`]).
fn start(model: &Arc<ServedModel>, batched: &Arc<ModelBatching>, batch: Vec<Waiting>) {
    batched.stats.runs.fetch_add(1, Ordering::Relaxed);
    let elements: usize = batch
        .iter()
        .flat_map(|w| &w.inputs)
        .map(|t| t.data.len())
        .sum();
    let slot = RunSlot(Arc::clone(model), Arc::clone(batched));
    match super::schedule::placement_for(model.placement(), elements) {
        Placement::Direct => {
            tokio::spawn(async move { execute(slot, batch) });
        }
        Placement::InPlace => {
            tokio::spawn(async move { tokio::task::block_in_place(|| execute(slot, batch)) });
        }
        Placement::Pool => {
            tokio::task::spawn_blocking(move || execute(slot, batch));
        }
    }
}

/// Runs `batch` on the model and answers each request.
fn execute(slot: RunSlot, batch: Vec<Waiting>) {
    let (model, batched) = (&slot.0, &slot.1);
    let engine = model.engine.as_ref();
    if batch.len() == 1 {
        for waiting in batch {
            let _ = waiting.reply.send(engine::infer(engine, waiting.inputs));
        }
        return;
    }
    let rows: Vec<usize> = batch.iter().map(|w| w.rows).collect();
    let merged = {
        let inputs: Vec<&[Tensor]> = batch.iter().map(|w| w.inputs.as_slice()).collect();
        tensors::merge(&inputs)
    };
    // tract plans per input shape: a few padded sizes, not every size.
    let total: usize = rows.iter().sum();
    let padded = if engine.runtime().starts_with("tract") {
        total.next_power_of_two()
    } else {
        total
    };
    let outcome = match merged {
        None => Err("the requests' inputs do not merge".to_string()),
        Some(merged) => engine::infer(engine, tensors::pad(merged, total, padded))
            .map_err(|e| e.to_string())
            .and_then(|outputs| {
                let mut cut = rows.clone();
                if padded > total {
                    cut.push(padded - total);
                }
                tensors::split(outputs, &cut).map_err(|e| {
                    batched.unbatchable.store(true, Ordering::Relaxed);
                    e.to_string()
                })
            }),
    };
    match outcome {
        Ok(answers) => {
            batched.stats.merged(batch.len(), rows.iter().sum());
            for (waiting, outputs) in batch.into_iter().zip(answers) {
                let _ = waiting.reply.send(Ok(outputs));
            }
        }
        Err(reason) => {
            batched.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(model = %model.name, version = model.version, requests = batch.len(), %reason, "a batched run failed; its requests run one by one");
            for waiting in batch {
                let _ = waiting.reply.send(engine::infer(engine, waiting.inputs));
            }
        }
    }
}
