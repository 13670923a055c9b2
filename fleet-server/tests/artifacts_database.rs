//! Artifact downloads over real HTTP with the artifacts in the PostgreSQL
//! database (`artifacts = "database"`): two servers started in-process on
//! one fresh schema, as two replicas of a fleet are; a file pushed to one
//! is served by the other, whole, by `Range` (206, 416), with its ETag
//! (`If-None-Match`, `If-Range`), to `HEAD`, and gone from both once
//! deleted.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod common;

use fleet_server::config::{ArtifactStorage, ServerConfig};
use reqwest::{header, Method, StatusCode};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

struct Server {
    url: String,
    /// The admin token, from the first server on the database.
    token: String,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(database: &str) -> Server {
    fleet_server::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    fleet_server::keys::init_keys(&dir.path().join("keys"), 1, 1, 365).unwrap();
    let mut config = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        database: Some(database.to_string()),
        max_upload_bytes: 8 * 1024 * 1024,
        artifacts: ArtifactStorage::Database,
        ..ServerConfig::default()
    };
    config.keys_dir = Some(dir.path().join("keys"));
    config.broker.embedded_listen = Some("127.0.0.1:0".parse().unwrap());
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let (running, _) = fleet_server::start(config, http, shutdown.clone())
        .await
        .unwrap();
    // Only the first server on a database writes the admin token.
    let token = std::fs::read_to_string(dir.path().join("admin.token"))
        .map(|t| t.trim().to_string())
        .unwrap_or_default();
    Server {
        url: format!("http://{}", running.http),
        token,
        shutdown,
        _dir: dir,
    }
}

#[tokio::test]
async fn replicas_serve_artifacts_from_the_database() {
    let database = common::fresh_postgres_schema("artifacts").await;
    let a = start(&database).await;
    let b = start(&database).await;
    let http = reqwest::Client::new();
    // Three chunks and a bit, compressible (so there is a .zst copy).
    let data: Vec<u8> = (0..3 * 1024 * 1024 + 1000u32)
        .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
        .collect();
    let sha = hex::encode(Sha256::digest(&data));
    let pushed = http
        .put(format!(
            "{}/api/v1/agent/releases/1.0.0/x86_64-unknown-linux-musl",
            a.url
        ))
        .bearer_auth(&a.token)
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success(), "{}", pushed.status());

    let artifact = format!("{}/artifacts/{sha}", b.url);
    let whole = http.get(&artifact).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    let etag = format!("\"{sha}\"");
    assert_eq!(whole.headers()[header::ETAG], etag.as_str());
    assert_eq!(whole.headers()[header::ACCEPT_RANGES], "bytes");
    assert_eq!(
        whole.headers()[header::CONTENT_LENGTH],
        data.len().to_string().as_str()
    );
    assert_eq!(whole.bytes().await.unwrap(), data);

    let len = data.len();
    for (range, start, end) in [
        ("bytes=0-0".to_string(), 0, 0),
        (format!("bytes={}-", len - 1), len - 1, len - 1),
        ("bytes=1048570-2097160".to_string(), 1_048_570, 2_097_160),
        ("bytes=-10".to_string(), len - 10, len - 1),
        (format!("bytes={}-{}", len - 5, len + 100), len - 5, len - 1),
    ] {
        let part = http
            .get(&artifact)
            .header(header::RANGE, &range)
            .send()
            .await
            .unwrap();
        assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            part.headers()[header::CONTENT_RANGE],
            format!("bytes {start}-{end}/{len}").as_str()
        );
        assert_eq!(part.bytes().await.unwrap(), &data[start..=end], "{range}");
    }
    let past = http
        .get(&artifact)
        .header(header::RANGE, format!("bytes={len}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        past.headers()[header::CONTENT_RANGE],
        format!("bytes */{len}").as_str()
    );

    // The ETag: a cached copy is current; a range against another
    // version's ETag gets the whole file.
    let cached = http
        .get(&artifact)
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(cached.headers()[header::ETAG], etag.as_str());
    let other = http
        .get(&artifact)
        .header(header::RANGE, "bytes=0-9")
        .header(header::IF_RANGE, "\"something else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    assert_eq!(other.bytes().await.unwrap().len(), len);

    let head = http.head(&artifact).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()[header::CONTENT_LENGTH],
        len.to_string().as_str()
    );

    // The compressed copy, made on A, served by B.
    let zst = http.get(format!("{artifact}.zst")).send().await.unwrap();
    assert_eq!(zst.status(), StatusCode::OK);
    let zst = zst.bytes().await.unwrap();
    assert!(zst.len() < len / 2);
    let mut plain = Vec::new();
    std::io::Read::read_to_end(
        &mut ruzstd::decoding::StreamingDecoder::new(&zst[..]).unwrap(),
        &mut plain,
    )
    .unwrap();
    assert_eq!(plain, data);

    // Deleted through B (the token is the fleet's, not a server's): gone
    // from A too.
    let deleted = http
        .request(
            Method::DELETE,
            format!("{}/api/v1/agent/releases/1.0.0", b.url),
        )
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.status());
    for url in [
        format!("{}/artifacts/{sha}", a.url),
        format!("{}/artifacts/{sha}.zst", a.url),
    ] {
        let gone = http.get(&url).send().await.unwrap();
        assert_eq!(gone.status(), StatusCode::NOT_FOUND, "{url}");
    }
}
