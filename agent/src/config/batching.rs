//! `[batching]` in the agent's config: whether and how concurrent requests
//! to one model are merged into one run.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// How one model's requests are batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Most rows (first-dimension entries) in one run.
    pub max_batch: usize,
    /// Longest the oldest waiting request waits for companions while the
    /// model is busy.
    pub max_delay: Duration,
    /// Runs of the model at once (batches and lone requests together).
    pub concurrent_runs: usize,
}

/// Largest `max_batch` accepted: a batch holds a copy of every request's
/// inputs and outputs at once.
pub const MAX_BATCH_LIMIT: usize = 1024;
/// Longest `max_delay_us` accepted (1 s): a longer wait for companions
/// would be a client-visible stall, not batching.
pub const MAX_DELAY_LIMIT_US: u64 = 1_000_000;

/// Dynamic batching, for every model unless `models` says otherwise.
///
/// Off by default: merging requests is only correct when a model treats
/// the rows of its first dimension independently (a true batch), and a
/// model file cannot say so: a dynamic first dimension may as well be a
/// sequence the model mixes (recurrent layers, attention, statistics over
/// the rows), where a merged run would silently change the answers. The
/// operator who knows the model turns it on, for all models or per model.
/// Once on, a request that finds the model idle still runs at once, so
/// batching costs a lone client nothing.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Batch every model that has a batch dimension.
    #[serde(default)]
    pub enabled: bool,
    /// Most rows (entries of the first dimension) in one run; a request
    /// may carry several rows, and one larger than this runs alone.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Longest, in microseconds, the oldest waiting request waits for
    /// companions while the model is busy with another run.
    #[serde(default = "default_max_delay_us")]
    pub max_delay_us: u64,
    /// Settings of single models, by name; unset keys take the values
    /// above.
    #[serde(default)]
    pub models: BTreeMap<String, ModelBatchingConfig>,
}

/// `[batching.models.NAME]`: one model's batching settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelBatchingConfig {
    pub enabled: Option<bool>,
    pub max_batch: Option<usize>,
    pub max_delay_us: Option<u64>,
}

fn default_max_batch() -> usize {
    8
}

fn default_max_delay_us() -> u64 {
    2000
}

impl Default for BatchingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_batch: default_max_batch(),
            max_delay_us: default_max_delay_us(),
            models: BTreeMap::new(),
        }
    }
}

impl BatchingConfig {
    /// Checks every value; the message names the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        let check = |key: &str, max_batch: usize, max_delay_us: u64| {
            if !(1..=MAX_BATCH_LIMIT).contains(&max_batch) {
                return Err(format!(
                    "{key}.max_batch must be between 1 and {MAX_BATCH_LIMIT}, not {max_batch}"
                ));
            }
            if max_delay_us > MAX_DELAY_LIMIT_US {
                return Err(format!(
                    "{key}.max_delay_us must be at most {MAX_DELAY_LIMIT_US} (1 s), not {max_delay_us}"
                ));
            }
            Ok(())
        };
        check("batching", self.max_batch, self.max_delay_us)?;
        for (name, model) in &self.models {
            check(
                &format!("batching.models.{name}"),
                model.max_batch.unwrap_or(self.max_batch),
                model.max_delay_us.unwrap_or(self.max_delay_us),
            )?;
        }
        Ok(())
    }

    /// The batching policy of the model served as `name`, `None` when its
    /// requests are not batched. `concurrent_runs` is how many runs of the
    /// model may go at once.
    pub fn policy_for(&self, name: &str, concurrent_runs: usize) -> Option<Policy> {
        let model = self.models.get(name);
        let setting = |f: fn(&ModelBatchingConfig) -> Option<u64>, default: u64| {
            model.and_then(f).unwrap_or(default)
        };
        let enabled = model.and_then(|m| m.enabled).unwrap_or(self.enabled);
        enabled.then(|| Policy {
            max_batch: setting(|m| m.max_batch.map(|b| b as u64), self.max_batch as u64) as usize,
            max_delay: Duration::from_micros(setting(|m| m.max_delay_us, self.max_delay_us)),
            concurrent_runs: concurrent_runs.max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> BatchingConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn model_settings_override_the_defaults() {
        let config = parse(
            "max_batch = 4\nmax_delay_us = 500\n[models.cls]\nenabled = true\nmax_batch = 16\n[models.det]\nmax_delay_us = 100",
        );
        config.validate().unwrap();
        assert_eq!(config.policy_for("det", 2), None);
        assert_eq!(
            config.policy_for("cls", 2),
            Some(Policy {
                max_batch: 16,
                max_delay: Duration::from_micros(500),
                concurrent_runs: 2
            })
        );
        let on = parse("enabled = true\n[models.off]\nenabled = false");
        assert_eq!(on.policy_for("off", 1), None);
        let policy = on.policy_for("any", 0).unwrap();
        assert_eq!(
            (policy.max_batch, policy.max_delay, policy.concurrent_runs),
            (8, Duration::from_micros(2000), 1)
        );
        assert_eq!(BatchingConfig::default().policy_for("any", 1), None);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = parse("max_batch = 0").validate().unwrap_err();
        assert!(err.starts_with("batching.max_batch"), "{err}");
        let err = parse("[models.cls]\nmax_delay_us = 5000000")
            .validate()
            .unwrap_err();
        assert!(err.starts_with("batching.models.cls.max_delay_us"), "{err}");
        let err = toml::from_str::<BatchingConfig>("[models.cls]\nmax_rows = 3").unwrap_err();
        assert!(err.to_string().contains("max_rows"), "{err}");
    }
}
