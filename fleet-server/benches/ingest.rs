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
//! Then the whole path of a signed device message, as the server runs it:
//! parse the envelope, check the device's registered key, verify the
//! ed25519 signature and decode, up to 256 publishes at a time on both
//! cores, and store in 256-record batches on another task; against the
//! same path with the signature check skipped (the baseline), for one
//! record per publish (the worst case) and 32 (the agent's batches). And
//! the cost of sealing and opening one message.
//!
//! Run: `cargo bench -p fleet-server --bench ingest`. PostgreSQL from
//! `EDGEFLEET_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), in a fresh schema; skipped
//! with a note when unreachable.

#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap ends the run

use std::time::Instant;

use edgefleet_shared::signed_message::seal;
use edgefleet_shared::{
    DeviceId, SecretKey, SignedMessage, TelemetryMessage, TopicKind, TopicPrefix,
};
use fleet_server::bridge::{decode_batch, Inbound};
use fleet_server::device_keys::DeviceKeys;
use fleet_server::store::{DeviceRecord, Store, Streamed};

const DEVICES: u64 = 1_000;
const PER_DEVICE: u64 = 50;

fn sample(device: u64, seq: u64) -> Streamed {
    let device = DeviceId::new(format!("pi-{device:05}")).expect("a valid device id");
    Streamed::Telemetry(TelemetryMessage::example(device, seq))
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

fn key_of(device: u64) -> SecretKey {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&device.to_le_bytes());
    SecretKey::from_seed(seed)
}

/// Every device's records as signed publishes of `per_publish` records.
fn publishes(first_seq: u64, per_publish: usize) -> Vec<(String, Vec<u8>)> {
    let prefix = TopicPrefix::default();
    let mut by_device: Vec<Vec<TelemetryMessage>> = vec![Vec::new(); DEVICES as usize];
    for r in records(first_seq) {
        if let Streamed::Telemetry(t) = r {
            let d: usize = t.device_id.as_str()[3..].parse().unwrap();
            by_device[d].push(t);
        }
    }
    let mut out = Vec::new();
    for (d, samples) in by_device.iter().enumerate() {
        let id = DeviceId::new(format!("pi-{d:05}")).unwrap();
        let topic = prefix.device(&id, TopicKind::Telemetry).to_string();
        let key = key_of(d as u64);
        for chunk in samples.chunks(per_publish) {
            let body = if chunk.len() == 1 {
                serde_json::to_vec(&chunk[0]).unwrap()
            } else {
                serde_json::to_vec(chunk).unwrap()
            };
            out.push((topic.clone(), seal(&topic, &body, &key)));
        }
    }
    out
}

/// Decodes every publish (verifying its signature, or only reading the
/// envelope when `verify` is off) and stores the records in 256-record
/// batches on another task, as the server does (its MQTT task decodes, its
/// ingest task stores); returns records/s.
async fn signed_ingest(
    store: &Store,
    keys: &DeviceKeys,
    publishes: &[(String, Vec<u8>)],
    verify: bool,
) -> f64 {
    let prefix = TopicPrefix::default();
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Streamed>>(8);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut total = 0;
            while let Some(batch) = rx.recv().await {
                total += batch.len();
                store.record_streamed(&batch, 1_790_000_000).await.unwrap();
            }
            total
        })
    };
    let mut batch: Vec<Streamed> = Vec::with_capacity(512);
    // As the server takes them: up to 256 publishes at a time.
    for chunk in publishes.chunks(256) {
        let records: Vec<Streamed> = if verify {
            let items: Vec<(&str, &[u8])> =
                chunk.iter().map(|(t, p)| (t.as_str(), &p[..])).collect();
            decode_batch(&prefix, keys, &items)
                .into_iter()
                .flat_map(|c| match c.unwrap().inbound {
                    Inbound::Streamed(r) => r,
                    other => panic!("not telemetry: {other:?}"),
                })
                .collect()
        } else {
            chunk
                .iter()
                .flat_map(|(_, payload)| {
                    let msg = SignedMessage::parse(payload).unwrap().msg();
                    let parsed: Vec<TelemetryMessage> = if msg.first() == Some(&b'[') {
                        serde_json::from_slice(msg).unwrap()
                    } else {
                        vec![serde_json::from_slice(msg).unwrap()]
                    };
                    parsed.into_iter().map(Streamed::Telemetry)
                })
                .collect()
        };
        batch.extend(records);
        if batch.len() >= 256 {
            tx.send(std::mem::take(&mut batch)).await.unwrap();
        }
    }
    tx.send(batch).await.unwrap();
    drop(tx);
    let total = writer.await.unwrap();
    total as f64 / started.elapsed().as_secs_f64()
}

async fn verified(dir: &std::path::Path) {
    let devices: Vec<DeviceRecord> = (0..DEVICES)
        .map(|d| DeviceRecord {
            enrolled_at: Some(1),
            public_key: Some(key_of(d).public().to_hex()),
            ..DeviceRecord::new(format!("pi-{d:05}"))
        })
        .collect();
    let keys = DeviceKeys::new(&devices, false);
    println!();
    println!(
        "signed telemetry into SQLite, {} records; records/s",
        DEVICES * PER_DEVICE
    );
    println!(
        "{:<26} {:>16} {:>16} {:>9}",
        "records per publish", "envelope only", "verified", "ratio"
    );
    for (i, per) in [1usize, 32].into_iter().enumerate() {
        let a = Store::open(dir.join(format!("a{i}.db")).to_str().unwrap())
            .await
            .unwrap();
        let b = Store::open(dir.join(format!("b{i}.db")).to_str().unwrap())
            .await
            .unwrap();
        let pubs = publishes(1, per);
        let plain = signed_ingest(&a, &keys, &pubs, false).await;
        let checked = signed_ingest(&b, &keys, &pubs, true).await;
        println!(
            "{:<26} {:>16.0} {:>16.0} {:>8.2}x",
            per,
            plain,
            checked,
            plain / checked
        );
    }
    // One message: seal (agent side) and open (server side).
    let pubs = publishes(1, 1);
    let (topic, payload) = &pubs[0];
    let body = SignedMessage::parse(payload).unwrap().msg().to_vec();
    let key = key_of(0);
    let n = 5_000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(seal(topic, &body, &key));
    }
    let sign_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let public = [key.public()];
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(SignedMessage::open(payload, topic, public.iter()).unwrap());
    }
    let open_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(serde_json::from_slice::<TelemetryMessage>(&body).unwrap());
    }
    let parse_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!(
        "one {}-byte telemetry message: seal {sign_us:.1} us, open (verify) {open_us:.1} us; parsing it costs {parse_us:.1} us (verify/parse {:.1}x)",
        body.len(),
        open_us / parse_us
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
    let verified_at_end = dir.path().join("signed");
    std::fs::create_dir_all(&verified_at_end).unwrap();

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
    verified(&verified_at_end).await;
}
