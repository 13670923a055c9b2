//! The OpenAPI shapes of the rollout planner's types that appear in API
//! bodies (gates, wave sizes, phase, device states, selection). The
//! planner keeps no OpenAPI dependency, so these describe its serde form
//! for the document only; the tests below hold them to it field by field.

#![allow(dead_code)] // Never built: each type only describes a JSON shape.

use std::collections::BTreeMap;

use utoipa::ToSchema;

/// Wave sizes, cumulative: `{"count": 1}` devices or `{"percent": 25}` of
/// the selection.
#[derive(ToSchema)]
#[schema(as = WaveSize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    Count(u32),
    Percent(f64),
}

/// What to do when the failure threshold is crossed.
#[derive(ToSchema)]
#[schema(as = FailureAction)]
#[serde(rename_all = "lowercase")]
pub enum FailureAction {
    Pause,
    Abort,
}

/// A rollout's gates: what lets a wave end and what stops the rollout.
#[derive(ToSchema)]
#[schema(as = Gates)]
pub struct Gates {
    /// Devices of a wave that must confirm before the next starts.
    min_confirmed: u32,
    /// Percent of a wave's settled devices that must be healthy.
    success_pct: f64,
    /// Percent of the rollout's settled devices failed (or rolled back)
    /// at which `failure_action` is taken.
    failure_pct: f64,
    failure_action: FailureAction,
    soak_secs: u64,
    manual_approval: bool,
    max_in_flight: u32,
    device_timeout_secs: u64,
    retries: u32,
    offline_grace_secs: u64,
    /// Inference error rate (percent) above which a device on the new
    /// version counts as failed.
    max_error_pct: Option<f64>,
    /// p95 latency (milliseconds) above which a device on the new version
    /// counts as failed.
    max_p95_ms: Option<f64>,
    /// Drift score (largest feature PSI against the version's reference)
    /// above which a device on the new version counts as failed.
    max_drift_psi: Option<f64>,
    /// Inferences an interval needs before its telemetry is judged.
    min_inferences: u64,
    /// Shadow gate: a wave's devices first run the new version in shadow;
    /// the wave moves once this share (0 to 1) of compared requests agree.
    min_shadow_agreement: Option<f64>,
    /// Compared requests, summed over a wave's devices, before the shadow
    /// gate judges.
    min_shadow_requests: u64,
    /// Share of requests a device also runs on the candidate.
    shadow_sample_rate: f64,
    /// Per output: `{"output": "emb", "kind": "cosine", "min": 0.99}`;
    /// kinds `top1`, `max_abs` (`limit`), `max_rel` (`limit`), `cosine`
    /// (`min`). Outputs not listed compare top-1.
    shadow_compare: Vec<BTreeMap<String, serde_json::Value>>,
}

/// A rollout's phase, named by `phase`.
#[derive(ToSchema)]
#[schema(as = Phase)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Created,
    Running {
        wave: usize,
        wave_started: u64,
    },
    /// Waiting for an operator to approve wave `next`.
    AwaitingApproval {
        next: usize,
    },
    Paused {
        wave: usize,
        reason: String,
    },
    Aborted {
        reason: String,
    },
    Completed,
}

/// Where one device stands in a rollout, named by `state`.
#[derive(ToSchema)]
#[schema(as = DeviceState)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DeviceState {
    Waiting,
    Updating { since: u64, attempt: u32 },
    Backoff { until: u64, attempt: u32 },
    Confirmed { at: u64 },
    Failed { reason: String },
    Reverted,
    Offline { since: u64 },
    Excluded,
}

/// Which devices a rollout is for: all, those with every tag (and the
/// hardware class, if given), or a list.
#[derive(ToSchema)]
#[schema(as = Selection)]
pub struct Selection {
    all: bool,
    tags: BTreeMap<String, String>,
    hardware: Option<String>,
    devices: Vec<String>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;
    use utoipa::PartialSchema;

    use crate::rollout::{DeviceState, FailureAction, Gates, Phase, Selection, WaveSize};

    /// The JSON form of a schema.
    fn schema<T: PartialSchema>() -> Value {
        serde_json::to_value(T::schema()).expect("schemas serialise")
    }

    /// The property names of an object schema.
    fn properties(schema: &Value) -> BTreeSet<String> {
        schema["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The field names of a value's JSON form.
    fn fields(value: impl serde::Serialize) -> BTreeSet<String> {
        match serde_json::to_value(value).expect("serialises") {
            Value::Object(m) => m.keys().cloned().collect(),
            other => panic!("not an object: {other}"),
        }
    }

    /// The variants of a tagged enum's schema, by tag value, with their
    /// property names.
    fn variants(schema: &Value, tag: &str) -> BTreeMap<String, BTreeSet<String>> {
        schema["oneOf"]
            .as_array()
            .expect("a tagged enum is oneOf")
            .iter()
            .map(|v| {
                let name = v["properties"][tag]["enum"][0]
                    .as_str()
                    .expect("each variant names its tag")
                    .to_string();
                (name, properties(v))
            })
            .collect()
    }

    use std::collections::BTreeMap;

    #[test]
    fn gates_and_selection_document_every_field() {
        assert_eq!(
            properties(&schema::<super::Gates>()),
            fields(Gates::default())
        );
        assert_eq!(
            properties(&schema::<super::Selection>()),
            fields(Selection::default())
        );
        let actions = schema::<super::FailureAction>();
        for action in [FailureAction::Pause, FailureAction::Abort] {
            let name = serde_json::to_value(action).unwrap();
            assert!(
                actions["enum"].as_array().unwrap().contains(&name),
                "{name}"
            );
        }
    }

    #[test]
    fn phases_and_device_states_document_every_variant() {
        let phases = variants(&schema::<super::Phase>(), "phase");
        for phase in [
            Phase::Created,
            Phase::Running {
                wave: 0,
                wave_started: 1,
            },
            Phase::AwaitingApproval { next: 1 },
            Phase::Paused {
                wave: 0,
                reason: "r".into(),
            },
            Phase::Aborted { reason: "r".into() },
            Phase::Completed,
        ] {
            let json = serde_json::to_value(&phase).unwrap();
            let name = json["phase"].as_str().unwrap();
            assert_eq!(phases.get(name), Some(&fields(&phase)), "{name}");
        }
        assert_eq!(phases.len(), 6);
        let states = variants(&schema::<super::DeviceState>(), "state");
        for state in [
            DeviceState::Waiting,
            DeviceState::Updating {
                since: 1,
                attempt: 1,
            },
            DeviceState::Backoff {
                until: 1,
                attempt: 1,
            },
            DeviceState::Confirmed { at: 1 },
            DeviceState::Failed { reason: "r".into() },
            DeviceState::Reverted,
            DeviceState::Offline { since: 1 },
            DeviceState::Excluded,
        ] {
            let json = serde_json::to_value(&state).unwrap();
            let name = json["state"].as_str().unwrap();
            assert_eq!(states.get(name), Some(&fields(&state)), "{name}");
        }
        assert_eq!(states.len(), 8);
    }

    #[test]
    fn wave_sizes_document_both_forms() {
        let schema = schema::<super::WaveSize>();
        let forms: BTreeSet<String> = schema["oneOf"]
            .as_array()
            .expect("oneOf")
            .iter()
            .flat_map(properties)
            .collect();
        let mut sizes = BTreeSet::new();
        for size in [WaveSize::Count(1), WaveSize::Percent(5.0)] {
            sizes.extend(fields(size));
        }
        assert_eq!(forms, sizes);
    }
}
