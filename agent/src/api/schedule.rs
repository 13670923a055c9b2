//! Scheduling one inference: taking one of the `api.max_concurrent_requests`
//! permits (only once the whole request is in hand, so a permit stands for
//! inference work, never for waiting on a client), choosing the thread the
//! model runs on (or handing it to the model's batch queue,
//! [`super::batch`]), bounding it by `api.request_timeout_ms`, and
//! recording the outcome in the model's statistics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;

use super::batch::{self, Route};
use super::{ApiError, ApiState};
use crate::engine::{self, EngineError};
use crate::registry::{Placement, ServedModel};
use crate::tensor::Tensor;

/// Largest request (in tensor elements) a directly-run model serves on
/// the worker itself; larger ones go through `block_in_place`.
pub const DIRECT_MAX_ELEMENTS: usize = 16 * 1024;

/// Where a request of `elements` tensor elements runs for a model placed
/// at `placement`: a fast model given a far larger input than it was
/// timed on could hold the worker for long, so only small requests run
/// directly.
pub fn placement_for(placement: Placement, elements: usize) -> Placement {
    match placement {
        Placement::Direct if elements > DIRECT_MAX_ELEMENTS => Placement::InPlace,
        other => other,
    }
}

/// Runs `model` on `inputs` under a permit, batched with other requests
/// when `[batching]` enables it for the model ([`super::batch`]); returns
/// its outputs and how long it took from taking the permit (for a batched
/// request: its wait in the queue and its batch's run). Counts a success
/// or a failure in the model's statistics, per request either way.
pub async fn run(
    state: &ApiState,
    model: &Arc<ServedModel>,
    inputs: Vec<Tensor>,
) -> Result<(Vec<Tensor>, Duration), ApiError> {
    let permit = state.permits.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many concurrent requests (limit {}, api.max_concurrent_requests); retry shortly",
                state.max_concurrent
            ),
        )
    })?;
    let started = Instant::now();
    let result = match batch::route(&state.batching, model, inputs, permit) {
        Route::Alone {
            inputs,
            permit,
            slot,
        } => run_alone(state, model, inputs, (permit, slot)).await?,
        Route::Queued(answer) => match tokio::time::timeout(state.request_timeout, answer).await {
            Err(_) => {
                model.stats.record_failure();
                return Err(timed_out(state));
            }
            Ok(answer) => answer.map_err(|_| {
                model.stats.record_failure();
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the batched inference this request joined was abandoned",
                )
            })?,
        },
        Route::Invalid(e) => Err(e),
    };
    let elapsed = started.elapsed();
    let outputs = result.map_err(|e| {
        model.stats.record_failure();
        let status = if e.is_client_error() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::new(status, e.to_string())
    })?;
    model.stats.record_success(elapsed);
    Ok((outputs, elapsed))
}

fn timed_out(state: &ApiState) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "inference took longer than {} ms (api.request_timeout_ms)",
            state.request_timeout.as_millis()
        ),
    )
}

/// Runs one request by itself on the thread its size calls for. `hold`
/// (the permit, and the batching run slot) is released when the runtime
/// finishes: a request that times out still holds its slot until then.
async fn run_alone(
    state: &ApiState,
    model: &Arc<ServedModel>,
    inputs: Vec<Tensor>,
    hold: impl Send + 'static,
) -> Result<Result<Vec<Tensor>, EngineError>, ApiError> {
    let elements: usize = inputs.iter().map(|t| t.data.len()).sum();
    Ok(match placement_for(model.placement(), elements) {
        Placement::Direct => {
            let result = engine::infer(model.engine.as_ref(), inputs);
            drop(hold);
            result
        }
        Placement::InPlace => {
            // Sub-millisecond models: no thread hand-off (block_in_place
            // lets another thread take over this worker's queue meanwhile).
            let result =
                tokio::task::block_in_place(|| engine::infer(model.engine.as_ref(), inputs));
            drop(hold);
            result
        }
        Placement::Pool => {
            let worker_model = Arc::clone(model);
            let work = tokio::task::spawn_blocking(move || {
                let result = engine::infer(worker_model.engine.as_ref(), inputs);
                drop(hold);
                result
            });
            match tokio::time::timeout(state.request_timeout, work).await {
                Err(_) => {
                    model.stats.record_failure();
                    return Err(timed_out(state));
                }
                Ok(joined) => joined.map_err(|e| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("inference task failed: {e}"),
                    )
                })?,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_requests_run_directly_on_the_worker() {
        assert_eq!(
            placement_for(Placement::Direct, DIRECT_MAX_ELEMENTS),
            Placement::Direct
        );
        assert_eq!(
            placement_for(Placement::Direct, DIRECT_MAX_ELEMENTS + 1),
            Placement::InPlace
        );
        for other in [Placement::InPlace, Placement::Pool] {
            assert_eq!(placement_for(other, usize::MAX), other);
        }
    }
}
