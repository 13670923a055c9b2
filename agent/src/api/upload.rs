//! Uploading inference results: a model served with `upload_results`
//! has each answer queued on the outbox's results stream, which the
//! uplink delivers to the fleet when it can.

use std::time::Duration;

use serde_json::Value;

use super::oip::tensor_json;
use crate::outbox::{OutboxHandle, Stream};
use crate::registry::ServedModel;
use crate::tensor::Tensor;

/// The outbox and device id for uploaded inference results.
#[derive(Clone, Debug)]
pub struct Uploads {
    /// The device the results are from.
    pub device: edgefleet_shared::DeviceId,
    /// Where they are queued.
    pub outbox: OutboxHandle,
}

impl Uploads {
    /// Queues one inference result of `model` (its outputs, how long it
    /// took, the client's request id) for upload.
    pub fn queue(
        &self,
        model: &ServedModel,
        request_id: Option<String>,
        latency: Duration,
        outputs: &[Tensor],
    ) {
        let mut result = result_message(self, model, request_id, latency, outputs);
        self.outbox.push(Stream::Results, |seq| {
            result.seq = seq;
            serde_json::to_vec(&result)
                .expect("an InferenceResult is plain data with string keys and always serialises")
        });
    }
}

/// The message for one result; its sequence number is set when queued.
fn result_message(
    uploads: &Uploads,
    model: &ServedModel,
    request_id: Option<String>,
    latency: Duration,
    outputs: &[Tensor],
) -> edgefleet_shared::InferenceResult {
    edgefleet_shared::InferenceResult {
        schema: edgefleet_shared::SCHEMA_VERSION,
        device_id: uploads.device.clone(),
        seq: 0,
        at: edgefleet_shared::unix_now(),
        model: model.name.clone(),
        model_version: model.version,
        runtime: model.engine.runtime().to_string(),
        request_id,
        latency_us: u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        outputs: Value::Array(outputs.iter().map(tensor_json).collect()),
    }
}
