//! Ingest benchmark: telemetry records per second into the fleet store,
//! SQLite and PostgreSQL, from many simulated devices, with
//! de-duplication on (every record is keyed by device and sequence
//! number; a redelivered batch stores nothing).
//!
//! The server stores what it receives in batches (bridge.rs: whatever
//! arrived while the previous batch was being written, up to 512
//! messages). This measures that store call with realistic telemetry
//! bodies (health, two models with percentiles, outbox state):
//!
//! - batches of 1 (the baseline: one transaction per record) and of 256;
//! - the same 256-record batches delivered a second time (all duplicates).
//!
//! Run: `cargo bench -p fleet-server --bench ingest`. PostgreSQL from
//! `EDGEFLEET_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), in a fresh schema; skipped
//! with a note when unreachable.

use std::time::Instant;

use edgefleet_shared::{DeviceId, TelemetryMessage, SCHEMA_VERSION};
use fleet_server::store::{Store, Streamed};

const DEVICES: u64 = 1_000;
const PER_DEVICE: u64 = 50;

fn sample(device: u64, seq: u64) -> Streamed {
    let body = serde_json::json!({
        "schema": SCHEMA_VERSION,
        "device_id": format!("pi-{device:05}"),
        "seq": seq,
        "at": 1_790_000_000 + seq * 60,
        "interval_secs": 60.0,
        "health": {
            "cpu_percent": 12.5, "load": [0.4, 0.3, 0.2],
            "memory_total_bytes": 4_000_000_000u64, "memory_available_bytes": 2_900_000_000u64,
            "disk_total_bytes": 30_000_000_000u64, "disk_available_bytes": 21_000_000_000u64,
            "temperatures": [{"label": "cpu_thermal", "celsius": 51.2}],
            "uptime_secs": 86_400, "agent_rss_bytes": 9_000_000,
            "agent_cpu_percent": 0.7, "agent_uptime_secs": 3_600
        },
        "models": [
            {"name": "kws", "version": 3, "runtime": "tract-onnx", "inferences": 600, "errors": 0,
             "total_inferences": 90_000, "total_errors": 2, "p50_us": 410.0, "p95_us": 620.0, "p99_us": 900.0},
            {"name": "det", "version": 7, "runtime": "onnxruntime", "inferences": 60, "errors": 1,
             "total_inferences": 9_000, "total_errors": 4, "p50_us": 8_100.0, "p95_us": 9_900.0, "p99_us": 12_000.0}
        ],
        "outbox": {"depth": 0, "depth_bytes": 0, "memory_depth": 0}
    });
    let mut t: TelemetryMessage = serde_json::from_value(body).expect("a valid telemetry sample");
    t.device_id = DeviceId::new(format!("pi-{device:05}")).unwrap();
    Streamed::Telemetry(t)
}

/// Records in arrival order: every device's samples interleaved, as many
/// devices reporting at once would deliver them.
fn records(first_seq: u64) -> Vec<Streamed> {
    (0..PER_DEVICE)
        .flat_map(|seq| (0..DEVICES).map(move |d| sample(d, first_seq + seq)))
        .collect()
}

/// Stores `records` in batches of `batch`; returns (records/s, new rows).
async fn ingest(store: &Store, records: &[Streamed], batch: usize) -> (f64, usize) {
    let started = Instant::now();
    let mut new = 0;
    for chunk in records.chunks(batch) {
        new += store.record_streamed(chunk, 1_790_000_000).await.unwrap();
    }
    (records.len() as f64 / started.elapsed().as_secs_f64(), new)
}

async fn run(name: &str, store: Store) {
    // Baseline: one record per transaction, on a slice (it is slow).
    let single: Vec<Streamed> = records(1_000_000).into_iter().take(5_000).collect();
    let (one, n1) = ingest(&store, &single, 1).await;
    assert_eq!(n1, single.len());
    let all = records(1);
    let (batched, n) = ingest(&store, &all, 256).await;
    assert_eq!(n, all.len(), "every record is new once");
    let (again, dup) = ingest(&store, &all, 256).await;
    assert_eq!(dup, 0, "a redelivered batch stores nothing");
    println!(
        "{name:<11} {:>14.0} {:>16.0} {:>8.1}x {:>22.0}",
        one,
        batched,
        batched / one,
        again
    );
}

#[tokio::main]
async fn main() {
    println!(
        "ingest: {} telemetry records ({DEVICES} devices x {PER_DEVICE}), de-duplicated by (device, seq); records/s",
        DEVICES * PER_DEVICE
    );
    println!(
        "{:<11} {:>14} {:>16} {:>9} {:>22}",
        "store", "1 per batch", "256 per batch", "ratio", "256, all duplicates"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fleet.db");
    run("SQLite", Store::open(path.to_str().unwrap()).await.unwrap()).await;

    let url = std::env::var("EDGEFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("edgefleet_bench_{}", std::process::id());
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Err(e) => println!("PostgreSQL  not measured: no database at {url} ({e})"),
        Ok((client, conn)) => {
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE SCHEMA {schema}"))
                .await
                .unwrap();
            let sep = if url.contains('?') { '&' } else { '?' };
            let store = Store::open(&format!("{url}{sep}options=-csearch_path%3D{schema}"))
                .await
                .unwrap();
            run("PostgreSQL", store).await;
            client
                .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .await
                .unwrap();
        }
    }
}
