//! The local inference API: Open Inference Protocol v2 (KServe / Triton)
//! JSON over HTTP/1.1, on a Unix socket and optionally a loopback TCP port,
//! both served by the same router.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/v2` | server metadata |
//! | GET | `/v2/health/live` | 200 while the process runs |
//! | GET | `/v2/health/ready` | 200 when at least one model is served |
//! | GET | `/v2/models/{m}[/versions/{v}]` | model metadata |
//! | GET | `/v2/models/{m}[/versions/{v}]/ready` | model readiness |
//! | POST | `/v2/models/{m}[/versions/{v}]/infer` | inference |
//! | GET | `/v2/models/{m}[/versions/{v}]/stats` | counts and latency percentiles |
//!
//! Every error is `{"error": "..."}` with a message naming the problem.
//!
//! A request flows through the submodules in order: [`server`] accepts the
//! connection, checks the client and routes; [`oip`] decodes the body into
//! tensors (pure, no I/O); [`schedule`] takes an inference permit and runs
//! the model on the right thread; [`upload`] queues the result for the
//! fleet when the model asks for it; [`oip`] encodes the answer.

pub mod batch;
pub mod oip;
pub mod schedule;
pub mod server;
pub mod upload;

#[cfg(test)]
mod quality_tests;
#[cfg(test)]
mod socket_tests;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::sync::Semaphore;

use crate::registry::ModelRegistry;

pub use oip::HEADER_LENGTH;
pub use server::{
    adopt_unix, bind_unix, bind_unix_std, check_local_client, handle, serve_tcp, serve_unix,
};
pub use upload::Uploads;

/// How long a client may take to send a request's headers. Local clients
/// send them in one write; a connection still short of a complete header
/// after this long is stuck or hostile, and each one holds a socket and a
/// task. hyper counts an idle keep-alive connection's wait for its next
/// request against the same limit, so idle connections close after this
/// long too (clients reconnect).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send a request's whole body. The body is
/// read before an inference permit is taken, so a slow sender does not
/// block other requests, but it still holds a connection, a task and up
/// to `api.max_request_bytes` of memory; 30 s moves the default 16 MiB
/// limit even over a slow local link, and cuts off a client that stopped.
pub const BODY_READ_DEADLINE: Duration = Duration::from_secs(30);

/// How long connections accepted before a shutdown (or an agent switch)
/// keep being served before they are closed: a request already on its way
/// is answered, not dropped.
pub const DRAIN_WINDOW: Duration = Duration::from_millis(500);

/// Shared state of the API.
#[derive(Clone)]
pub struct ApiState {
    /// The models served.
    pub registry: ModelRegistry,
    /// Largest request body accepted (`api.max_request_bytes`).
    pub max_request_bytes: usize,
    /// One permit per inference running at once.
    pub permits: Arc<Semaphore>,
    /// The number of permits (`api.max_concurrent_requests`), for messages.
    pub max_concurrent: usize,
    /// Longest an inference handed to a blocking thread may take.
    pub request_timeout: Duration,
    /// Longest a client may take to send a request's headers
    /// ([`HEADER_READ_TIMEOUT`]).
    pub header_read_timeout: Duration,
    /// Longest a client may take to send a request's whole body
    /// ([`BODY_READ_DEADLINE`]).
    pub body_read_deadline: Duration,
    /// Where results of models with `upload_results` go (fleet mode).
    pub uploads: Option<Uploads>,
    /// Which models' requests are batched, and how (`[batching]`).
    pub batching: batch::Batching,
    /// Every connection being served: the agent waits for them to finish
    /// before it exits ([`ApiState::drain`]).
    pub connections: tokio_util::task::TaskTracker,
}

impl ApiState {
    /// The state for `registry` with the limits of the `[api]` config.
    pub fn new(registry: ModelRegistry, limits: &crate::config::ApiConfig) -> Self {
        Self {
            registry,
            max_request_bytes: limits.max_request_bytes,
            permits: Arc::new(Semaphore::new(limits.max_concurrent_requests)),
            max_concurrent: limits.max_concurrent_requests,
            request_timeout: Duration::from_millis(limits.request_timeout_ms),
            header_read_timeout: HEADER_READ_TIMEOUT,
            body_read_deadline: BODY_READ_DEADLINE,
            uploads: None,
            batching: batch::Batching::default(),
            connections: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Waits up to `grace` for the connections being served to finish
    /// (after the listeners stopped); returns whether they all did.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.connections.close();
        tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_ok()
    }
}

/// An API error: status plus a message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status answered.
    pub status: StatusCode,
    /// What was wrong, sent as `{"error": message}`.
    pub message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 404: no such route, model or version.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<oip::RequestError> for ApiError {
    /// Every malformed request is the client's to fix.
    fn from(e: oip::RequestError) -> Self {
        Self::bad_request(e.to_string())
    }
}
