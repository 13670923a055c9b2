//! An HTTP artifact server under the test's control, over a real socket:
//! honest (with `Range` support), or cutting connections part-way, sending
//! endless data, stalling, or serving other bytes. It counts the body bytes
//! it writes and the connections it served.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the server misbehaves.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Serves `body`, honouring `Range: bytes=N-`. The first `cuts`
    /// connections are closed after `cut_after` body bytes.
    Honest {
        body: Vec<u8>,
        cuts: usize,
        cut_after: usize,
    },
    /// Sends bytes without end (no length), as long as the client reads.
    Endless,
    /// Sends the headers for `size` bytes and `sent` of them, then nothing.
    Stall { size: usize, sent: usize },
}

pub struct ArtifactServer {
    pub addr: SocketAddr,
    /// Body bytes written to clients.
    pub bytes_sent: Arc<AtomicU64>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ArtifactServer {
    pub async fn start(behaviour: Behaviour) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (sent, conns) = (bytes_sent.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = conns.fetch_add(1, Ordering::SeqCst);
                let behaviour = behaviour.clone();
                let sent = sent.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, behaviour, n, sent).await;
                });
            }
        });
        Ok(Self {
            addr,
            bytes_sent,
            connections,
            task,
        })
    }

    /// The URL of an artifact on this server.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/artifacts/{name}", self.addr)
    }

    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::SeqCst)
    }
}

/// Reads the request head; returns the first byte asked for (`Range`).
async fn read_head(stream: &mut TcpStream) -> anyhow::Result<usize> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "client closed before the request ended");
        head.extend_from_slice(&buf[..n]);
        anyhow::ensure!(head.len() < 64 * 1024, "request head too long");
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let start = text
        .lines()
        .find_map(|l| l.strip_prefix("range: bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(start)
}

async fn write_counted(
    stream: &mut TcpStream,
    bytes: &[u8],
    sent: &AtomicU64,
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    sent.fetch_add(bytes.len() as u64, Ordering::SeqCst);
    Ok(())
}

async fn serve(
    mut stream: TcpStream,
    behaviour: Behaviour,
    connection: usize,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let start = read_head(&mut stream).await?;
    match behaviour {
        Behaviour::Honest {
            body,
            cuts,
            cut_after,
        } => {
            let start = start.min(body.len());
            let rest = &body[start..];
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    rest.len(),
                    body.len() - 1,
                    body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                    rest.len()
                )
            };
            stream.write_all(head.as_bytes()).await?;
            let take = if connection < cuts {
                cut_after.min(rest.len())
            } else {
                rest.len()
            };
            write_counted(&mut stream, &rest[..take], &sent).await?;
            stream.flush().await?;
            // A cut: the connection just ends (the client sees a short body).
        }
        Behaviour::Endless => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await?;
            let chunk = vec![0x5a; 16 * 1024];
            loop {
                write_counted(&mut stream, &chunk, &sent).await?;
            }
        }
        Behaviour::Stall { size, sent: part } => {
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n");
            stream.write_all(head.as_bytes()).await?;
            write_counted(&mut stream, &vec![0x5a; part.min(size)], &sent).await?;
            stream.flush().await?;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
    Ok(())
}
