//! The update task with the real [`Downloader`] against a scripted HTTP
//! server on a real socket: an HTTP error retried after its backoff, a
//! body with the wrong hash, a body cut short.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// An HTTP server on a real socket answering the n-th request with the
/// n-th of `responses` (status, declared length, body), the last one for
/// every request after. Returns its URL and the number of requests seen.
async fn scripted_server(responses: Vec<(u16, usize, Vec<u8>)>) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/model.onnx", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let (status, length, body) = responses[n.min(responses.len() - 1)].clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let header = format!(
                    "HTTP/1.1 {status} Scripted\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(header.as_bytes()).await;
                let _ = stream.write_all(&body).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (url, requests)
}

#[tokio::test]
async fn an_http_error_is_retried_after_a_backoff_and_the_download_goes_through() {
    let model = fp32();
    let (url, requests) =
        scripted_server(vec![(503, 0, vec![]), (200, model.len(), model.clone())]).await;
    let mut h = Harness::new(Downloader::new(Duration::from_secs(5), 2));
    h.updater
        .handle(&h.desired(1, vec![slot("digits", 1, &model, &url)]))
        .await;
    assert_eq!(requests.load(Ordering::SeqCst), 2);
    assert_eq!(h.serving("digits"), Some(1));
    assert_eq!(h.kinds().last(), Some(&(EventKind::Confirmed, Some(1))));
    // The staging file became the installed model and is gone.
    let staging = h.updater.store.staging_path(&sha256_hex(&model));
    assert!(!staging.exists());
    assert!(h.dir.path().join("models").exists());
}

#[tokio::test]
async fn a_wrong_hash_or_a_truncated_body_fails_the_download_and_changes_nothing() {
    let model = fp32();
    // Same length, one byte different: the hash check catches it.
    let mut corrupt = model.clone();
    corrupt[100] ^= 0xff;
    let (corrupt_url, _) = scripted_server(vec![(200, corrupt.len(), corrupt)]).await;
    // The server promises the whole file and hangs up half way.
    let half = model[..model.len() / 2].to_vec();
    let (truncated_url, truncated_requests) = scripted_server(vec![(200, model.len(), half)]).await;
    let mut h = Harness::new(Downloader::new(Duration::from_secs(5), 1));

    h.updater
        .handle(&h.desired(1, vec![slot("digits", 1, &model, &corrupt_url)]))
        .await;
    let events = h.events();
    let failed = events.last().unwrap();
    assert_eq!(failed.kind, EventKind::DownloadFailed, "{events:#?}");
    assert!(reason_of(failed).contains("sha256"), "{failed:#?}");
    // A body that hashed wrong is deleted, not kept to resume from.
    assert!(!h.updater.store.staging_path(&sha256_hex(&model)).exists());

    h.updater
        .handle(&h.desired(2, vec![slot("digits", 1, &model, &truncated_url)]))
        .await;
    let events = h.events();
    let failed = events.last().unwrap();
    assert_eq!(failed.kind, EventKind::DownloadFailed, "{events:#?}");
    assert_eq!(truncated_requests.load(Ordering::SeqCst), 1);
    assert_eq!(h.serving("digits"), None);
    assert_eq!(h.updater.store.active_pointer("digits").unwrap(), None);
}
