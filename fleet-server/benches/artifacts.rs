//! Artifact benchmark: a 100 MB pseudo-random artifact (it does not
//! compress, like most model weights) through a whole server started
//! in-process, once with the directory storage and once with the database
//! storage (PostgreSQL, 1 MiB chunks):
//!
//! - the push (`PUT /api/v1/agent/releases/...`: hashing, storing, and the
//!   compression attempt that finds no 5 % saving);
//! - the whole download (`GET /artifacts/{sha256}`);
//! - the download as 8 MiB `Range` requests one after another, as a device
//!   resuming or fetching in pieces would.
//!
//! Both servers use the same PostgreSQL database for their fleet store, so
//! only the artifact storage differs. Figures are MB/s (10^6 bytes) and
//! the ratio dir / database.
//!
//! Run: `cargo bench -p fleet-server --bench artifacts`. PostgreSQL from
//! `EDGEFLEET_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`), in fresh schemas dropped
//! at the end.

#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap ends the run

use std::time::{Duration, Instant};

use fleet_server::config::{ArtifactStorage, ServerConfig};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const SIZE: usize = 100 * 1000 * 1000;
const RANGE: u64 = 8 * 1024 * 1024;

/// Deterministic bytes that do not compress.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

struct Figures {
    push: f64,
    whole: f64,
    ranges: f64,
}

async fn run(name: &str, database: &str, storage: ArtifactStorage, data: &[u8]) -> Figures {
    let dir = tempfile::tempdir().unwrap();
    fleet_server::keys::init_keys(&dir.path().join("keys"), 1, 1, 365).unwrap();
    let mut config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        database: Some(database.to_string()),
        max_upload_bytes: 2 * SIZE as u64,
        artifacts: storage,
        ..ServerConfig::default()
    };
    config.keys_dir = Some(dir.path().join("keys"));
    config.broker.embedded_listen = Some("127.0.0.1:0".parse().unwrap());
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let (running, _) = fleet_server::start(config, http, shutdown.clone())
        .await
        .unwrap();
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let url = format!("http://{}", running.http);
    let client = reqwest::Client::new();

    let started = Instant::now();
    let pushed = client
        .put(format!(
            "{url}/api/v1/agent/releases/1.0.0/x86_64-unknown-linux-musl"
        ))
        .bearer_auth(token.trim())
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    let push = mb_per_s(data.len(), started.elapsed());
    assert!(pushed.status().is_success(), "{}", pushed.status());
    let sha = hex::encode(Sha256::digest(data));
    let artifact = format!("{url}/artifacts/{sha}");

    let started = Instant::now();
    let whole = client
        .get(&artifact)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let whole_rate = mb_per_s(whole.len(), started.elapsed());
    assert!(whole[..] == data[..], "the whole download is the artifact");
    drop(whole);

    let started = Instant::now();
    let mut hasher = Sha256::new();
    let mut at = 0u64;
    while at < data.len() as u64 {
        let end = (at + RANGE).min(data.len() as u64) - 1;
        let part = client
            .get(&artifact)
            .header("Range", format!("bytes={at}-{end}"))
            .send()
            .await
            .unwrap();
        assert_eq!(part.status(), reqwest::StatusCode::PARTIAL_CONTENT);
        let part = part.bytes().await.unwrap();
        assert_eq!(part.len() as u64, end - at + 1);
        hasher.update(&part);
        at = end + 1;
    }
    let ranges = mb_per_s(data.len(), started.elapsed());
    assert_eq!(
        hex::encode(hasher.finalize()),
        sha,
        "the ranges make the artifact"
    );
    shutdown.cancel();
    println!("{name:<10} {push:>10.0} {whole_rate:>16.0} {ranges:>20.0}");
    Figures {
        push,
        whole: whole_rate,
        ranges,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    fleet_server::install_crypto_provider();
    let url = std::env::var("EDGEFLEET_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let (client, conn) = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => {
            println!("not measured: no PostgreSQL at {url} ({e})");
            return;
        }
    };
    tokio::spawn(conn);
    let data = noise(SIZE);
    println!(
        "artifact of {} MB, ranges of {} MiB; MB/s",
        SIZE / 1_000_000,
        RANGE >> 20
    );
    println!(
        "{:<10} {:>10} {:>16} {:>20}",
        "storage", "push", "whole download", "8 MiB range requests"
    );
    let sep = if url.contains('?') { '&' } else { '?' };
    let mut figures = Vec::new();
    for (name, storage) in [
        ("dir", ArtifactStorage::Dir),
        ("database", ArtifactStorage::Database),
    ] {
        let schema = format!("edgefleet_bench_artifacts_{}_{name}", std::process::id());
        client
            .batch_execute(&format!("CREATE SCHEMA {schema}"))
            .await
            .unwrap();
        let database = format!("{url}{sep}options=-csearch_path%3D{schema}");
        figures.push(run(name, &database, storage, &data).await);
        // Let the server's tasks wind down before the schema goes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        client
            .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .await
            .unwrap();
    }
    let (d, b) = (&figures[0], &figures[1]);
    println!(
        "{:<10} {:>9.1}x {:>15.1}x {:>19.1}x",
        "dir/db",
        d.push / b.push,
        d.whole / b.whole,
        d.ranges / b.ranges
    );
}
