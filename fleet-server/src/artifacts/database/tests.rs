//! The database storage against real PostgreSQL (a fresh schema per test,
//! see the store's tests): whole and ranged reads across chunk
//! boundaries, interrupted uploads, two replicas on one database, the
//! compressed copy and the collection of abandoned chunks.

use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::super::{ArtifactError, ArtifactStore, Backend, Kind};
use super::*;

/// A fresh schema with the store's migrations applied: its URL.
async fn database() -> String {
    let url = crate::store::tests::fresh_postgres_schema().await;
    crate::store::Store::open(&url).await.unwrap();
    url
}

/// A server's handle on the database storage, without the upkeep task
/// (whose collection and reloads the tests call when they mean to).
async fn replica(url: &str) -> ArtifactStore {
    ArtifactStore {
        backend: Backend::Database(DbStore::open(url).await.unwrap()),
    }
}

fn db_store(store: &ArtifactStore) -> &DbStore {
    match &store.backend {
        Backend::Database(db) => db,
        Backend::Dir(_) => panic!("not the database storage"),
    }
}

/// Deterministic bytes that do not compress.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `data` as a request body arriving in uneven pieces.
fn body(data: &[u8]) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
    let pieces: Vec<_> = data
        .chunks(100_003)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    futures_util::stream::iter(pieces)
}

async fn read(store: &ArtifactStore, sha: &str, kind: Kind, start: u64, count: u64) -> Vec<u8> {
    let artifact = store.open_artifact(sha, kind).await.unwrap().unwrap();
    let mut stream = artifact.read(start, count).await.unwrap();
    let mut out = Vec::new();
    while let Some(part) = stream.next().await {
        out.extend_from_slice(&part.unwrap());
    }
    out
}

async fn count(url: &str, sql: &str) -> i64 {
    let pool = crate::store::postgres::pool(url, 1).unwrap();
    pool.get()
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn stores_and_reads_whole_and_ranges() {
    let url = database().await;
    let store = replica(&url).await;
    let len = 3 * CHUNK_SIZE + 12_345;
    let data = noise(len, 1);
    let (sha, size) = store.put(body(&data), u64::MAX).await.unwrap();
    assert_eq!(sha, hex::encode(Sha256::digest(&data)));
    assert_eq!(size, len as u64);
    assert_eq!(store.size(&sha, Kind::Plain).await.unwrap(), Some(size));
    assert_eq!(store.size(&sha, Kind::Zst).await.unwrap(), None);
    assert_eq!(count(&url, "SELECT count(*) FROM artifact_chunks").await, 4);

    assert_eq!(read(&store, &sha, Kind::Plain, 0, size).await, data);
    let cs = CHUNK_SIZE as u64;
    for (start, n) in [
        (0, 1),              // the first byte
        (size - 1, 1),       // the last byte
        (cs - 10, 20),       // across one chunk boundary
        (cs / 2, 2 * cs),    // across two, starting and ending mid-chunk
        (cs, cs),            // exactly one chunk
        (3 * cs, 12_345),    // the short last chunk
        (size - 100, 1_000), // past the end: cut to it
    ] {
        let got = read(&store, &sha, Kind::Plain, start, n).await;
        let end = (start + n).min(size) as usize;
        assert_eq!(got, &data[start as usize..end], "range {start}+{n}");
    }
    assert!(read(&store, &sha, Kind::Plain, size, 10).await.is_empty());

    // The same content again: the stored copy stays, no spare chunks.
    let (again, _) = store.put(body(&data), u64::MAX).await.unwrap();
    assert_eq!(again, sha);
    assert_eq!(count(&url, "SELECT count(*) FROM artifact_chunks").await, 4);
    assert_eq!(count(&url, "SELECT count(*) FROM artifact_blobs").await, 1);

    // Limits and the empty upload.
    assert!(matches!(
        store.put(body(&data), 1000).await,
        Err(ArtifactError::TooLarge { limit: 1000 })
    ));
    assert!(matches!(
        store.put(body(b""), 1000).await,
        Err(ArtifactError::Empty)
    ));
    assert_eq!(count(&url, "SELECT count(*) FROM artifact_chunks").await, 4);
    assert!(store
        .open_artifact(&"0".repeat(64), Kind::Plain)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .open_artifact("../etc/passwd", Kind::Plain)
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn an_interrupted_upload_is_never_visible() {
    let url = database().await;
    let store = replica(&url).await;
    let data = noise(3 * CHUNK_SIZE, 2);
    // Two and a half chunks arrive, then the connection breaks.
    let pieces: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::copy_from_slice(&data[..CHUNK_SIZE])),
        Ok(Bytes::copy_from_slice(
            &data[CHUNK_SIZE..5 * CHUNK_SIZE / 2],
        )),
        Err(std::io::Error::other("connection reset")),
    ];
    let result = store
        .put(futures_util::stream::iter(pieces), u64::MAX)
        .await;
    assert!(
        matches!(result, Err(ArtifactError::Interrupted(ref m)) if m.contains("connection reset")),
        "{result:?}"
    );
    assert_eq!(count(&url, "SELECT count(*) FROM artifact_blobs").await, 0);
    assert_eq!(
        count(&url, "SELECT count(*) FROM artifact_chunks").await,
        0,
        "the chunks written are deleted"
    );
    let sha = hex::encode(Sha256::digest(&data));
    assert!(store.size(&sha, Kind::Plain).await.unwrap().is_none());
}

#[tokio::test]
async fn replicas_share_artifacts() {
    let url = database().await;
    let (a, b) = (replica(&url).await, replica(&url).await);
    let data = noise(CHUNK_SIZE + 1, 3);
    let (sha, size) = a.put(body(&data), u64::MAX).await.unwrap();
    assert_eq!(read(&b, &sha, Kind::Plain, 0, size).await, data);
    assert_eq!(
        read(&b, &sha, Kind::Plain, size - 2, 2).await,
        &data[data.len() - 2..]
    );

    // A compressed copy made by one replica is known to the other after a
    // refresh (desired states refresh before signing).
    let text: Vec<u8> = b"tensor weights, very repetitive. "
        .iter()
        .copied()
        .cycle()
        .take(2 * CHUNK_SIZE + 7)
        .collect();
    let (text_sha, text_size) = a.put(body(&text), u64::MAX).await.unwrap();
    let packed = a
        .compress(&text_sha)
        .await
        .unwrap()
        .expect("text compresses");
    assert!(packed * 10 < text_size);
    assert_eq!(a.zst_size(&text_sha), Some(packed));
    assert_eq!(b.zst_size(&text_sha), None, "not refreshed yet");
    b.refresh().await;
    assert_eq!(b.zst_size(&text_sha), Some(packed));
    let zst = read(&b, &text_sha, Kind::Zst, 0, packed).await;
    let mut plain = Vec::new();
    std::io::Read::read_to_end(
        &mut ruzstd::decoding::StreamingDecoder::new(&zst[..]).unwrap(),
        &mut plain,
    )
    .unwrap();
    assert_eq!(plain, text);
    // Noise does not compress: no copy.
    assert_eq!(a.compress(&sha).await.unwrap(), None);
    assert_eq!(b.size(&sha, Kind::Zst).await.unwrap(), None);

    // Removed through one, gone in the other, chunks and all.
    b.remove(&text_sha).await;
    assert!(a
        .open_artifact(&text_sha, Kind::Plain)
        .await
        .unwrap()
        .is_none());
    assert!(a
        .open_artifact(&text_sha, Kind::Zst)
        .await
        .unwrap()
        .is_none());
    assert_eq!(b.zst_size(&text_sha), None);
    db_store(&a).refresh_zst_sizes(true).await;
    assert_eq!(a.zst_size(&text_sha), None);
    a.remove(&sha).await;
    assert!(b.open_artifact(&sha, Kind::Plain).await.unwrap().is_none());
    assert_eq!(count(&url, "SELECT count(*) FROM artifact_blobs").await, 0);
    assert_eq!(count(&url, "SELECT count(*) FROM artifact_chunks").await, 0);
}

#[tokio::test]
async fn abandoned_chunks_are_collected() {
    let url = database().await;
    let store = replica(&url).await;
    let db = db_store(&store);
    let data = noise(CHUNK_SIZE + 5, 4);
    let (sha, size) = store.put(body(&data), u64::MAX).await.unwrap();
    // What a crash mid-upload leaves: chunks no blob names, one upload
    // long idle, one still being written.
    let pool = crate::store::postgres::pool(&url, 1).unwrap();
    let client = pool.get().await.unwrap();
    let old = now() - ABANDONED_AFTER_SECS as i64 - 60;
    for (upload, idx, at) in [
        ("crashed", 0i64, old),
        ("crashed", 1, old),
        ("writing", 0, old),
        ("writing", 1, now()),
    ] {
        client
            .execute(
                "INSERT INTO artifact_chunks (upload, idx, data, created_at) VALUES ($1, $2, $3, $4)",
                &[&upload, &idx, &&b"x"[..], &at],
            )
            .await
            .unwrap();
    }
    // Old chunks of a visible artifact stay.
    client
        .execute(
            "UPDATE artifact_chunks SET created_at = $1 WHERE upload NOT IN ('crashed', 'writing')",
            &[&old],
        )
        .await
        .unwrap();
    assert_eq!(db.collect_abandoned(ABANDONED_AFTER_SECS).await.unwrap(), 2);
    let left: Vec<String> = client
        .query(
            "SELECT DISTINCT upload FROM artifact_chunks WHERE upload IN ('crashed', 'writing')",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, vec!["writing".to_string()]);
    assert_eq!(read(&store, &sha, Kind::Plain, 0, size).await, data);

    // An upload whose chunks were collected does not become visible.
    let written = Written {
        upload: "crashed".into(),
        sha256: "ab".repeat(32),
        size: 2,
        chunks: 2,
    };
    assert!(matches!(
        db.make_visible(&written, &written.sha256, Kind::Plain)
            .await,
        Err(ArtifactError::Interrupted(_))
    ));
    assert_eq!(count(&url, "SELECT count(*) FROM artifact_blobs").await, 1);
}
