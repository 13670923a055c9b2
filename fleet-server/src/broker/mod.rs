//! The embedded MQTT broker, for fleets that fit on one machine: MQTT
//! 3.1.1 over TCP or TLS, QoS 0 and 1 (a QoS 2 publish is accepted and
//! delivered at QoS 1), retained messages, last wills, persistent
//! sessions, and, with device authentication, per-device topic rules.
//!
//! It is written for this fleet rather than taken from a general broker
//! because of what was measured: rumqttd matched each new topic against
//! every subscription and each new subscription against every topic seen,
//! on one router thread, so the first rollout to 10,000 devices (two
//! exact subscriptions and four topics each) spent minutes in string
//! comparisons and stalled, and it has no per-topic ACL. Here a device's
//! subscriptions are found by one hash look-up ([`router`]), each
//! connection runs on the server's own runtime ([`connection`]), and the
//! rules ([`acl`]) are checked where packets are parsed.
//!
//! Listeners, by what they admit ([`Door`]): without device
//! authentication one open listener; with it, the public listener admits
//! enrolled devices only, and a second one on loopback admits only the
//! fleet server's own client.

pub mod acl;
pub mod connection;
pub mod router;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use acl::Acl;
pub use connection::Door;
use connection::Ended;
pub use router::{Limits, Router, Stats};

/// Who may connect when device authentication is on: the server itself
/// (its own user name and a password made at start) and enrolled,
/// unrevoked devices, whose user name and client id must both be their
/// device id.
#[derive(Clone)]
pub struct DeviceAuth {
    pub store: crate::store::Store,
    pub server_user: String,
    pub server_password: String,
}

impl DeviceAuth {
    /// Whether this is the fleet server's own login.
    pub fn is_server(&self, user: &str, password: &str) -> bool {
        user == self.server_user
            && crate::auth::matches(password, &crate::auth::hash_secret(&self.server_password))
    }

    pub async fn allows(&self, client_id: &str, user: &str, password: &str) -> bool {
        if user == self.server_user {
            return crate::auth::matches(
                password,
                &crate::auth::hash_secret(&self.server_password),
            );
        }
        if client_id != user {
            tracing::warn!(
                client_id,
                user,
                "MQTT connection refused: client id and user name differ"
            );
            return false;
        }
        match self.store.device_credential(user).await {
            Ok(Some(hash)) if crate::auth::verify_mosquitto(password, &hash) => true,
            Ok(Some(_)) => {
                tracing::warn!(device = user, "MQTT connection refused: wrong password");
                false
            }
            Ok(None) => {
                tracing::warn!(
                    device = user,
                    "MQTT connection refused: not enrolled, or revoked"
                );
                false
            }
            Err(e) => {
                tracing::error!(device = user, error = %e, "MQTT connection refused: cannot read credentials");
                false
            }
        }
    }
}

/// The embedded broker's listen address is taken or not allowed.
#[derive(Debug, thiserror::Error)]
#[error("embedded MQTT broker cannot listen on {listen}: {source} (choose another --mqtt-listen, or use --broker for an external one)")]
pub struct BindError {
    pub listen: SocketAddr,
    pub source: std::io::Error,
}

/// The embedded broker: cheap to clone, one per server.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    router: Mutex<Router>,
    acl: Acl,
    auth: Option<DeviceAuth>,
    /// For the server's session and an open broker's clients; devices'
    /// own sessions get [`Limits::device`].
    limits: Limits,
    next_connection: AtomicU64,
}

impl Broker {
    /// A broker for topics under `prefix`; with `auth`, devices must be
    /// enrolled and keep to their own topics.
    pub fn new(
        prefix: edgefleet_shared::TopicPrefix,
        auth: Option<DeviceAuth>,
        limits: Limits,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                router: Mutex::new(Router::new()),
                limits,
                acl: Acl::new(prefix),
                auth,
                next_connection: AtomicU64::new(1),
            }),
        }
    }

    pub(crate) fn router(&self) -> MutexGuard<'_, Router> {
        // A panic while holding the lock leaves plain data behind; keep
        // serving rather than fail every connection after it.
        self.inner.router.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn acl(&self) -> &Acl {
        &self.inner.acl
    }

    pub(crate) fn limits(&self) -> Limits {
        self.inner.limits
    }

    pub(crate) fn auth(&self) -> Option<&DeviceAuth> {
        self.inner.auth.as_ref()
    }

    fn next_connection_id(&self) -> u64 {
        self.inner.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Cuts `device` off now and forgets its session (it was revoked).
    /// Returns how many connections were closed.
    pub fn evict(&self, device: &str) -> usize {
        usize::from(self.router().evict(device))
    }

    /// What the broker has done, and the clients connected now.
    pub fn stats(&self) -> (Stats, usize) {
        let router = self.router();
        (router.stats(), router.connected())
    }

    /// Binds `listen` (a clear error if it is taken).
    pub async fn bind(listen: SocketAddr) -> Result<TcpListener, BindError> {
        TcpListener::bind(listen)
            .await
            .map_err(|source| BindError { listen, source })
    }

    /// Accepts clients on `listener`, as `door` says, until `shutdown`;
    /// with `tls`, over TLS.
    pub async fn serve(
        self,
        listener: TcpListener,
        door: Door,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: CancellationToken,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, usually: wait, not spin.
                    tracing::warn!(error = %e, "embedded broker cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let broker = self.clone();
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let result = match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(
                            connection::CONNECT_TIMEOUT,
                            acceptor.accept(stream),
                        )
                        .await
                        {
                            Ok(Ok(tls)) => connection::serve(&broker, door, tls, shutdown).await,
                            Ok(Err(e)) => Err(Ended::Refused(format!("TLS handshake failed: {e}"))),
                            Err(_) => Err(Ended::Refused("TLS handshake timed out".into())),
                        }
                    }
                    None => connection::serve(&broker, door, stream, shutdown).await,
                };
                match result {
                    Ok(()) => {}
                    Err(Ended::Refused(reason)) => {
                        tracing::warn!(%peer, %reason, "MQTT connection refused or cut off");
                    }
                    Err(Ended::Dropped(reason)) => {
                        tracing::debug!(%peer, %reason, "MQTT connection ended");
                    }
                }
            });
        }
    }
}
