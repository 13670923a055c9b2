//! Health telemetry: every interval the [`Sampler`] reads the system
//! (`sysinfo`: CPU, memory, the data dir's disk, temperatures, load,
//! uptime, the agent's own RSS and CPU), each served model's inference
//! counts and latency percentiles over the interval, and the outbox's
//! depth, and appends one [`TelemetryMessage`] to the outbox.
//!
//! Only what is needed is refreshed (no process list, no network
//! interfaces), so a sample costs well under a millisecond of CPU.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgefleet_shared::quality::Variant;
use edgefleet_shared::{
    DeviceId, Health, ModelTelemetry, OutboxHealth, TelemetryMessage, Temperature, SCHEMA_VERSION,
};
use sysinfo::{
    Components, CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, Pid, ProcessRefreshKind,
    ProcessesToUpdate, System,
};
use tokio_util::sync::CancellationToken;

use crate::outbox::{OutboxHandle, Stream};
use crate::registry::{ModelRegistry, ServedModel};
use crate::stats::Counts;

/// Reads health and statistics; one per agent.
pub struct Sampler {
    system: System,
    disks: Disks,
    components: Components,
    pid: Option<Pid>,
    data_dir: PathBuf,
    started: Instant,
    last: Instant,
    /// Counts at the previous sample, per (model, version).
    previous: HashMap<(String, u64), Counts>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// The mount whose path is the longest prefix of `dir`.
fn disk_of<'a>(disks: &'a Disks, dir: &Path) -> Option<&'a sysinfo::Disk> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
}

impl Sampler {
    pub fn new(data_dir: &Path) -> Self {
        let mut system = System::new();
        // CPU use is a difference between two readings: take the first now.
        system.refresh_cpu_specifics(CpuRefreshKind::nothing().with_cpu_usage());
        let pid = sysinfo::get_current_pid().ok();
        if let Some(pid) = pid {
            system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                false,
                ProcessRefreshKind::nothing().with_memory().with_cpu(),
            );
        }
        let now = Instant::now();
        Self {
            system,
            disks: Disks::new_with_refreshed_list_specifics(
                DiskRefreshKind::nothing().with_storage(),
            ),
            components: Components::new_with_refreshed_list(),
            pid,
            data_dir: data_dir.to_path_buf(),
            started: now,
            last: now,
            previous: HashMap::new(),
        }
    }

    /// Reads the system now.
    pub fn health(&mut self) -> Health {
        self.system
            .refresh_cpu_specifics(CpuRefreshKind::nothing().with_cpu_usage());
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let mut health = Health {
            cpu_percent: Some(self.system.global_cpu_usage()).filter(|c| c.is_finite()),
            memory_total_bytes: self.system.total_memory(),
            memory_available_bytes: self.system.available_memory(),
            uptime_secs: System::uptime(),
            agent_uptime_secs: self.started.elapsed().as_secs(),
            ..Health::default()
        };
        let load = System::load_average();
        if load.one > 0.0 || load.five > 0.0 || load.fifteen > 0.0 {
            health.load = Some([load.one, load.five, load.fifteen]);
        }
        if let Some(pid) = self.pid {
            self.system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                false,
                ProcessRefreshKind::nothing().with_memory().with_cpu(),
            );
            if let Some(p) = self.system.process(pid) {
                health.agent_rss_bytes = p.memory();
                health.agent_cpu_percent = Some(p.cpu_usage()).filter(|c| c.is_finite());
            }
        }
        // Mounts change rarely, but a USB disk or an SD card remount does
        // happen: re-list them each sample (one read of /proc/mounts).
        self.disks
            .refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
        if let Some(disk) = disk_of(&self.disks, &self.data_dir) {
            health.disk_total_bytes = Some(disk.total_space());
            health.disk_available_bytes = Some(disk.available_space());
        }
        self.components.refresh(false);
        health.temperatures = self
            .components
            .list()
            .iter()
            .filter_map(|c| {
                c.temperature()
                    .filter(|t| t.is_finite())
                    .map(|celsius| Temperature {
                        label: c.label().to_string(),
                        celsius,
                    })
            })
            .collect();
        health
    }

    /// Per-model statistics since the previous call.
    pub fn models(&mut self, registry: &ModelRegistry) -> Vec<ModelTelemetry> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (model, variant) in with_variants(registry.all()) {
            let key = (model.name.clone(), model.version);
            let now = model.stats.counts();
            let interval = match self.previous.get(&key) {
                Some(before) => now.since(before),
                None => now.clone(),
            };
            out.push(ModelTelemetry {
                name: model.name.clone(),
                version: model.version,
                runtime: model.engine.runtime().to_string(),
                inferences: interval.successes,
                errors: interval.failures,
                total_inferences: now.successes,
                total_errors: now.failures,
                p50_us: interval.percentile_us(0.50),
                p95_us: interval.percentile_us(0.95),
                p99_us: interval.percentile_us(0.99),
                runtime_trials: model.trials.iter().map(|t| t.to_json()).collect(),
                variant,
                shadow: model.quality.shadow().map(|s| s.take()),
                // Reported whenever the slot asks for drift, even for an
                // interval without requests: zero counts say "no traffic",
                // which an absent entry could not tell from "not binned".
                drift: model.quality.drift().map(|d| d.take()),
            });
            seen.insert(key, now);
        }
        self.previous = seen;
        out
    }

    /// One complete sample.
    pub fn sample(
        &mut self,
        device: &DeviceId,
        registry: &ModelRegistry,
        outbox: OutboxHealth,
    ) -> TelemetryMessage {
        let now = Instant::now();
        let interval = now.duration_since(self.last);
        self.last = now;
        TelemetryMessage {
            schema: SCHEMA_VERSION,
            device_id: device.clone(),
            seq: 0,
            at: edgefleet_shared::unix_now(),
            interval_secs: (interval.as_secs_f64() * 1000.0).round() / 1000.0,
            health: self.health(),
            models: self.models(registry),
            outbox,
            link: Default::default(),
        }
    }
}

/// Every served model, each followed by its A/B split's variant: both
/// are labelled, each with its own counts.
fn with_variants(models: Vec<Arc<ServedModel>>) -> Vec<(Arc<ServedModel>, Option<Variant>)> {
    let mut out = Vec::with_capacity(models.len());
    for model in models {
        match model.quality.split() {
            Some(split) => {
                let b = split.variant().clone();
                out.push((model, Some(Variant::A)));
                out.push((b, Some(Variant::B)));
            }
            None => out.push((model, None)),
        }
    }
    out
}

/// Samples every `interval` and appends the result to the outbox.
pub async fn run(
    device: DeviceId,
    data_dir: PathBuf,
    interval: Duration,
    registry: ModelRegistry,
    outbox: OutboxHandle,
    link: crate::uplink::LinkCounters,
    shutdown: CancellationToken,
) {
    let mut sampler = Sampler::new(&data_dir);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (device, registry, handle) = (device.clone(), registry.clone(), outbox.clone());
        let link = link.snapshot();
        let result = tokio::task::spawn_blocking(move || {
            let mut msg = sampler.sample(&device, &registry, handle.health());
            msg.link = link;
            handle.push(Stream::Telemetry, |seq| {
                msg.seq = seq;
                serde_json::to_vec(&msg).expect(
                    "a TelemetryMessage is plain data with string keys and always serialises",
                )
            });
            sampler
        })
        .await;
        match result {
            Ok(s) => sampler = s,
            Err(e) => {
                tracing::error!(error = %e, "telemetry sampling failed; stopping it");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_reads_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = Sampler::new(dir.path());
        std::thread::sleep(Duration::from_millis(50));
        let h = sampler.health();
        assert!(h.memory_total_bytes > h.memory_available_bytes);
        assert!(h.memory_available_bytes > 0);
        assert!(h.agent_rss_bytes > 1 << 20, "{}", h.agent_rss_bytes);
        assert!(h.uptime_secs > 0);
        let (total, free) = (h.disk_total_bytes.unwrap(), h.disk_available_bytes.unwrap());
        assert!(total >= free && total > 0, "{total} {free}");
        assert!(h.cpu_percent.unwrap() >= 0.0);
    }

    #[test]
    fn model_statistics_cover_each_interval() {
        use crate::engine::tract::TractEngine;
        let dir = tempfile::tempdir().unwrap();
        let registry = ModelRegistry::default();
        let model_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/digits/digits_fp32.onnx");
        let bytes = std::fs::read(model_path).unwrap();
        let engine = TractEngine::load_onnx(&bytes, &[]).unwrap();
        let served = crate::registry::ServedModel::new(
            "digits".into(),
            3,
            "00".repeat(32),
            edgefleet_shared::ModelFormat::Onnx,
            crate::engine::Selection {
                engine: Box::new(engine),
                trials: Vec::new(),
            },
        );
        registry.insert(served);
        let model = registry.get("digits").unwrap();
        let mut sampler = Sampler::new(dir.path());
        for _ in 0..4 {
            model.stats.record_success(Duration::from_micros(100));
        }
        model.stats.record_failure();
        let first = sampler.models(&registry);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].inferences, first[0].errors), (4, 1));
        assert_eq!(first[0].version, 3);
        assert!(first[0].p50_us.unwrap() >= 100.0);
        model.stats.record_success(Duration::from_micros(100));
        let second = sampler.models(&registry);
        assert_eq!((second[0].inferences, second[0].errors), (1, 0));
        assert_eq!(second[0].total_inferences, 5);
        assert!(sampler.models(&registry)[0].p50_us.is_none());
    }
}
