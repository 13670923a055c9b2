//! A TCP load balancer in front of several servers, as HAProxy or nginx
//! in stream mode would stand in front of fleet-server replicas: each new
//! connection goes to the next upstream in turn, skipping one that
//! refuses it. A connection open to a server that dies breaks with it
//! (the client sees the failure and connects again).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};

/// A running balancer.
pub struct Balancer {
    pub addr: SocketAddr,
    upstreams: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    /// A balancer on a loopback port the OS assigns, with no upstream yet
    /// (servers need its URL before they start).
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstreams: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let next = Arc::new(AtomicUsize::new(0));
        let task = {
            let upstreams = upstreams.clone();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let upstreams = upstreams.lock().expect("not poisoned").clone();
                    let next = next.clone();
                    tokio::spawn(async move {
                        for _ in 0..upstreams.len() {
                            let i = next.fetch_add(1, Ordering::Relaxed) % upstreams.len();
                            if let Ok(mut server) = TcpStream::connect(upstreams[i]).await {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut client, &mut server).await;
                                return;
                            }
                        }
                    });
                }
            })
        };
        Ok(Self {
            addr,
            upstreams,
            task,
        })
    }

    /// Adds a server to the rotation.
    pub fn add(&self, upstream: SocketAddr) {
        self.upstreams.lock().expect("not poisoned").push(upstream);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
