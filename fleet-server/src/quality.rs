//! What a model's versions do in the field, side by side: per version and
//! A/B variant, inferences, errors and latency over the devices' latest
//! telemetry; per shadow candidate, how often it agreed with the version
//! it ran beside. A plain function of the insights' per-device view, so
//! the API and the dashboard show the same figures.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::insights::DeviceInsight;

/// One version of a model (one side of an A/B test when `variant` is set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionFigures {
    pub version: u64,
    /// `a` (the assigned version) or `b` (the split's variant); absent
    /// outside an A/B test.
    pub variant: Option<String>,
    /// Devices serving it.
    pub devices: usize,
    /// Since activation, summed over the devices.
    pub inferences: u64,
    pub errors: u64,
    pub error_pct: Option<f64>,
    /// Share of the model's inferences (as above) this entry served.
    pub share: Option<f64>,
    /// The devices' latest-interval percentiles, weighted by each
    /// interval's inferences (microseconds).
    pub p50_us: Option<f64>,
    pub p95_us: Option<f64>,
}

/// A candidate run in shadow beside `version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShadowFigures {
    pub version: u64,
    pub candidate_version: u64,
    pub devices: usize,
    /// Requests run on both and compared, and of those, agreeing.
    pub compared: u64,
    pub agreed: u64,
    /// Requests the candidate failed on (they count against agreement).
    pub errors: u64,
    /// Sampled requests devices dropped (busy, queue full, CPU budget).
    pub dropped: u64,
    /// `agreed / (compared + errors)`.
    pub agreement: Option<f64>,
    /// The slowest device's latest candidate p99 (microseconds).
    pub p99_us: Option<f64>,
}

/// A model's figures across the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelQuality {
    pub model: String,
    pub versions: Vec<VersionFigures>,
    pub shadows: Vec<ShadowFigures>,
}

#[derive(Default)]
struct Sums {
    devices: usize,
    inferences: u64,
    errors: u64,
    weight: u64,
    p50: f64,
    p95: f64,
}

/// Sums `model`'s figures over every device's latest telemetry.
pub fn summarize(model: &str, devices: &HashMap<String, DeviceInsight>) -> ModelQuality {
    let mut versions: BTreeMap<(u64, Option<&'static str>), Sums> = BTreeMap::new();
    let mut shadows: BTreeMap<(u64, u64), ShadowFigures> = BTreeMap::new();
    for insight in devices.values() {
        for m in insight.models.iter().filter(|m| m.name == model) {
            let v = versions
                .entry((m.version, m.variant.map(|v| v.as_str())))
                .or_default();
            v.devices += 1;
            v.inferences += m.total_inferences;
            v.errors += m.total_errors;
            if let (Some(p50), Some(p95)) = (m.p50_us, m.p95_us) {
                if m.inferences > 0 {
                    v.weight += m.inferences;
                    v.p50 += p50 * m.inferences as f64;
                    v.p95 += p95 * m.inferences as f64;
                }
            }
            if let Some(s) = &m.shadow {
                let f = shadows
                    .entry((m.version, s.candidate_version))
                    .or_insert_with(|| ShadowFigures {
                        version: m.version,
                        candidate_version: s.candidate_version,
                        devices: 0,
                        compared: 0,
                        agreed: 0,
                        errors: 0,
                        dropped: 0,
                        agreement: None,
                        p99_us: None,
                    });
                f.devices += 1;
                f.compared += s.compared;
                f.agreed += s.agreed;
                f.errors += s.errors;
                f.dropped += s.dropped;
                f.p99_us = match (f.p99_us, s.p99_us) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
            }
        }
    }
    let all: u64 = versions.values().map(|s| s.inferences).sum();
    let versions = versions
        .into_iter()
        .map(|((version, variant), s)| {
            let total = s.inferences + s.errors;
            VersionFigures {
                version,
                variant: variant.map(str::to_string),
                devices: s.devices,
                inferences: s.inferences,
                errors: s.errors,
                error_pct: (total > 0).then(|| s.errors as f64 * 100.0 / total as f64),
                share: (all > 0).then(|| s.inferences as f64 / all as f64),
                p50_us: (s.weight > 0).then(|| s.p50 / s.weight as f64),
                p95_us: (s.weight > 0).then(|| s.p95 / s.weight as f64),
            }
        })
        .collect();
    let shadows = shadows
        .into_values()
        .map(|mut f| {
            let total = f.compared + f.errors;
            f.agreement = (total > 0).then(|| f.agreed as f64 / total as f64);
            f
        })
        .collect();
    ModelQuality {
        model: model.to_string(),
        versions,
        shadows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insights::{ModelHealth, ShadowTotals};
    use edgefleet_shared::quality::Variant;

    fn health(version: u64, variant: Option<Variant>, total: u64, p50: f64) -> ModelHealth {
        ModelHealth {
            name: "digits".into(),
            version,
            runtime: "tract-onnx".into(),
            inferences: 10,
            errors: 0,
            p95_us: Some(p50 * 2.0),
            p50_us: Some(p50),
            total_inferences: total,
            total_errors: total / 100,
            variant,
            shadow: None,
        }
    }

    #[test]
    fn variants_and_shadows_are_summed_over_devices() {
        let mut devices = HashMap::new();
        for (i, (a, b)) in [(700, 300), (690, 310)].into_iter().enumerate() {
            let mut insight = DeviceInsight::default();
            insight.models = vec![
                health(1, Some(Variant::A), a, 100.0),
                health(2, Some(Variant::B), b, 200.0 + i as f64 * 100.0),
            ];
            devices.insert(format!("d{i}"), insight);
        }
        let mut shadowing = health(1, None, 50, 100.0);
        shadowing.shadow = Some(ShadowTotals {
            candidate_version: 3,
            compared: 90,
            agreed: 60,
            errors: 10,
            dropped: 4,
            p99_us: Some(900.0),
        });
        let mut insight = DeviceInsight::default();
        insight.models = vec![shadowing];
        devices.insert("d9".into(), insight);
        let q = summarize("digits", &devices);
        let a = q
            .versions
            .iter()
            .find(|v| v.variant.as_deref() == Some("a"))
            .unwrap();
        let b = q
            .versions
            .iter()
            .find(|v| v.variant.as_deref() == Some("b"))
            .unwrap();
        assert_eq!((a.devices, a.inferences, b.inferences), (2, 1390, 610));
        assert!((b.share.unwrap() - 610.0 / 2050.0).abs() < 1e-9);
        assert_eq!(b.p50_us, Some(250.0));
        assert_eq!(q.shadows.len(), 1);
        let s = &q.shadows[0];
        assert_eq!((s.version, s.candidate_version, s.compared), (1, 3, 90));
        assert_eq!(s.agreement, Some(0.6));
        assert!(summarize("other", &devices).versions.is_empty());
    }
}
