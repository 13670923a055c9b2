//! Component tests of the local API over real sockets: slow and stalled
//! clients, the TCP listener's Host and Origin checks, and the Unix
//! socket, each against a served echo model.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;

use super::{bind_unix, serve_tcp, serve_unix, ApiState};
use crate::engine::{self, EngineError, IoSpec, Selection};
use crate::registry::{ModelRegistry, ServedModel};
use crate::tensor::{DataType, Tensor};

/// y = x: the cheapest model, yet each request needs a permit.
struct Echo {
    inputs: Vec<IoSpec>,
    outputs: Vec<IoSpec>,
}

impl engine::Engine for Echo {
    fn runtime(&self) -> &'static str {
        "echo"
    }
    fn inputs(&self) -> &[IoSpec] {
        &self.inputs
    }
    fn outputs(&self) -> &[IoSpec] {
        &self.outputs
    }
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        let x = inputs.into_iter().next().expect("validated");
        Ok(vec![Tensor {
            name: "y".into(),
            ..x
        }])
    }
}

fn state(max_concurrent: usize) -> ApiState {
    let spec = |name: &str| IoSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        shape: vec![None],
    };
    let registry = ModelRegistry::default();
    registry.insert(ServedModel::new(
        "echo".into(),
        1,
        "0".repeat(64),
        edgefleet_shared::ModelFormat::Onnx,
        Selection {
            engine: Box::new(Echo {
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            }),
            trials: Vec::new(),
        },
    ));
    ApiState::new(
        registry,
        &crate::config::ApiConfig {
            max_concurrent_requests: max_concurrent,
            ..Default::default()
        },
    )
}

async fn start_tcp(state: ApiState) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_tcp(listener, state, shutdown.clone()));
    (addr, shutdown)
}

async fn start_unix(state: ApiState) -> (tempfile::TempDir, std::path::PathBuf, CancellationToken) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("api.sock");
    let listener = bind_unix(&path).await.unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_unix(listener, state, shutdown.clone()));
    (dir, path, shutdown)
}

const INFER_BODY: &str =
    r#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2]}]}"#;

/// A whole HTTP/1.1 request that asks the server to close after
/// answering, so the answer is everything up to EOF.
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    text.into_bytes()
}

/// Sends `request` and returns the answer's status and body.
async fn exchange<S>(mut stream: S, request: &[u8]) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
    (status, body.unwrap_or_default())
}

/// Headers and the first bytes of a body that never arrives whole.
const SLOW_UPLOAD: &[u8] = b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: localhost\r\n\
    Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"inputs\": [";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_do_not_hold_the_inference_permits() {
    let (_dir, path, shutdown) = start_unix(state(2)).await;
    let mut slow = Vec::new();
    for _ in 0..6 {
        let mut stream = UnixStream::connect(&path).await.unwrap();
        stream.write_all(SLOW_UPLOAD).await.unwrap();
        slow.push(stream);
    }
    // Time for the server to accept them and start on their bodies.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let stream = UnixStream::connect(&path).await.unwrap();
    let infer = request(
        "POST",
        "/v2/models/echo/infer",
        &[("Host", "localhost")],
        INFER_BODY,
    );
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), exchange(stream, &infer))
        .await
        .expect("inference answered while slow uploads are pending");
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["outputs"][0]["data"], json!([1.0, 2.0]));
    // The slow clients are still connected, unanswered.
    for stream in &slow {
        let mut buf = [0u8; 64];
        let read = stream.try_read(&mut buf);
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{read:?}"
        );
    }
    shutdown.cancel();
}

#[tokio::test]
async fn a_client_that_stops_mid_body_gets_408_and_is_disconnected() {
    let mut state = state(2);
    state.body_read_deadline = Duration::from_millis(300);
    let (_dir, path, shutdown) = start_unix(state).await;
    let mut stream = UnixStream::connect(&path).await.unwrap();
    stream.write_all(SLOW_UPLOAD).await.unwrap();
    let started = Instant::now();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .expect("the server cut the stalled client off")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let (status, body) = parse_response(&raw);
    assert_eq!(status, 408, "{body}");
    let error: Value = serde_json::from_str(&body).unwrap();
    let message = error["error"].as_str().unwrap();
    assert!(
        message.contains("request body not received within 300 ms"),
        "{message}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let mut state = state(2);
    state.header_read_timeout = Duration::from_millis(300);
    let (addr, shutdown) = start_tcp(state).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /v2/models/echo/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut raw = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .expect("the server closed the connection");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Closed without an answer (hyper cannot answer a half-read head).
    assert!(
        matches!(&closed, Ok(0))
            || matches!(&closed, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{closed:?} {raw:?}"
    );
    shutdown.cancel();
}

async fn tcp_get(addr: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let get = request("GET", "/v2/health/live", headers, "");
    tokio::time::timeout(Duration::from_secs(5), exchange(stream, &get))
        .await
        .expect("answered")
}

#[tokio::test]
async fn the_tcp_api_refuses_foreign_hosts_and_origins() {
    let (addr, shutdown) = start_tcp(state(2)).await;
    let port = addr.port();
    for host in [format!("evil.example:{port}"), "attacker.test".to_string()] {
        let (status, body) = tcp_get(addr, &[("Host", &host)]).await;
        assert_eq!(status, 403, "{body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(message.contains(&format!("Host {host:?}")), "{message}");
    }
    let own = addr.to_string();
    for origin in ["http://evil.example", "null"] {
        let (status, body) = tcp_get(addr, &[("Host", &own), ("Origin", origin)]).await;
        assert_eq!(status, 403, "{body}");
        let error: Value = serde_json::from_str(&body).unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(message.contains(&format!("Origin {origin:?}")), "{message}");
    }
    shutdown.cancel();
}

#[tokio::test]
async fn local_clients_are_served_on_tcp_and_the_unix_socket_is_unchecked() {
    let (addr, shutdown) = start_tcp(state(2)).await;
    let port = addr.port();
    // What curl sends: Host 127.0.0.1:PORT, no Origin.
    let curl_host = format!("127.0.0.1:{port}");
    let (status, body) = tcp_get(addr, &[("Host", &curl_host)]).await;
    assert_eq!(status, 200, "{body}");
    for host in ["localhost", &format!("localhost:{port}"), "[::1]"] {
        let (status, body) = tcp_get(addr, &[("Host", host)]).await;
        assert_eq!(status, 200, "{host}: {body}");
    }
    let (status, body) = tcp_get(
        addr,
        &[("Host", &curl_host), ("Origin", "http://localhost:3000")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stream = TcpStream::connect(addr).await.unwrap();
    let infer = request(
        "POST",
        "/v2/models/echo/infer",
        &[("Host", &curl_host)],
        INFER_BODY,
    );
    let (status, body) = exchange(stream, &infer).await;
    assert_eq!(status, 200, "{body}");
    shutdown.cancel();

    // The Unix socket is guarded by its file mode, not by names.
    let (_dir, path, shutdown) = start_unix(state(2)).await;
    let stream = UnixStream::connect(&path).await.unwrap();
    let get = request(
        "GET",
        "/v2/health/live",
        &[("Host", "evil.example"), ("Origin", "http://evil.example")],
        "",
    );
    let (status, body) = exchange(stream, &get).await;
    assert_eq!(status, 200, "{body}");
    shutdown.cancel();
}
