//! The embedded broker's front door when devices authenticate: it holds
//! every device connection, checks who connects and what each device
//! publishes and subscribes to, and forwards the rest, byte for byte, to
//! rumqttd listening on loopback behind it.
//!
//! rumqttd has no per-topic ACL, so isolation lives here, as a thin layer
//! that reads only what MQTT 3.1.1 clients send (CONNECT, PUBLISH,
//! SUBSCRIBE; parsed with rumqttc's own packet codec) and never touches
//! what the broker sends back. Being in the path also lets the server cut
//! a revoked device off at once, and terminate TLS for `mqtts://`.
//!
//! The rules ([`Acl`]): a device may publish only its own `status`
//! (retained), `events`, `telemetry` and `results`, and subscribe only to
//! its own `desired` and `receipts`, the server's status and the root
//! chain, without wildcards. A device that tries anything else is
//! disconnected: a well-behaved agent never does. Signatures remain the
//! guarantee (the broker is untrusted transport); this is defence in
//! depth, and it keeps a device from reading another device's desired
//! state and telemetry.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use edgefleet_shared::{DeviceId, TopicKind, TopicPrefix};
use rumqttc::mqttbytes::v4::Packet;
use rumqttc::mqttbytes::{check, Error as CodecError, Protocol};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::broker::DeviceAuth;

/// Largest packet a device may send (a telemetry batch is at most 256 KiB).
const MAX_PACKET: usize = 4 * 1024 * 1024;
/// Time a new connection has to send its CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a device may do, by topic.
#[derive(Debug, Clone)]
pub struct Acl {
    prefix: TopicPrefix,
}

impl Acl {
    pub fn new(prefix: TopicPrefix) -> Self {
        Self { prefix }
    }

    /// Whether `device` may publish on `topic` (with the retain flag).
    pub fn may_publish(&self, device: &DeviceId, topic: &str, retain: bool) -> Result<(), String> {
        let parsed = self
            .prefix
            .parse(topic)
            .map_err(|_| format!("devices publish only under their own topics, not {topic:?}"))?;
        if parsed.device != *device {
            return Err(format!("{topic:?} belongs to device {}", parsed.device));
        }
        match parsed.kind {
            TopicKind::Status => Ok(()),
            TopicKind::Events | TopicKind::Telemetry | TopicKind::Results if !retain => Ok(()),
            TopicKind::Events | TopicKind::Telemetry | TopicKind::Results => {
                Err(format!("{topic:?} is not retained"))
            }
            TopicKind::Desired | TopicKind::Receipts => {
                Err(format!("only the fleet server publishes on {topic:?}"))
            }
        }
    }

    /// Whether `device` may subscribe to `filter`.
    pub fn may_subscribe(&self, device: &DeviceId, filter: &str) -> Result<(), String> {
        let own = |kind| self.prefix.device(device, kind).to_string();
        if filter == own(TopicKind::Desired)
            || filter == own(TopicKind::Receipts)
            || filter == self.prefix.server_status()
            || filter == self.prefix.roots()
        {
            Ok(())
        } else {
            Err(format!(
                "devices subscribe only to their own desired state and receipts, the server status and the root chain, not {filter:?}"
            ))
        }
    }

    /// Whether a device's last will may be `topic`.
    pub fn may_will(&self, device: &DeviceId, topic: &str) -> Result<(), String> {
        let status = self.prefix.device(device, TopicKind::Status).to_string();
        if topic == status {
            Ok(())
        } else {
            Err(format!(
                "a device's last will goes on its own status topic, not {topic:?}"
            ))
        }
    }
}

/// The live device connections, so a revoked device is cut off at once.
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<Mutex<HashMap<String, Vec<CancellationToken>>>>);

impl Connections {
    fn add(&self, device: &str, token: CancellationToken) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(device.to_string()).or_default();
        list.retain(|t| !t.is_cancelled());
        list.push(token);
    }

    /// Forgets `device`'s connections that have ended (their tokens are
    /// cancelled).
    fn forget_ended(&self, device: &str) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = map.get_mut(device) {
            list.retain(|t| !t.is_cancelled());
            if list.is_empty() {
                map.remove(device);
            }
        }
    }

    /// Closes every connection of `device`; returns how many.
    pub fn disconnect(&self, device: &str) -> usize {
        let list = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(device)
            .unwrap_or_default();
        for t in &list {
            t.cancel();
        }
        list.len()
    }
}

/// Everything a gate connection needs.
#[derive(Clone)]
pub struct Gate {
    pub acl: Acl,
    pub auth: DeviceAuth,
    pub upstream: SocketAddr,
    pub connections: Connections,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Accepts device connections on `listener` until `shutdown`.
pub async fn serve(gate: Gate, listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "MQTT gate cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let gate = gate.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let result = match &gate.tls {
                Some(acceptor) => {
                    match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => connection(&gate, tls, shutdown).await,
                        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
                None => connection(&gate, stream, shutdown).await,
            };
            if let Err(reason) = result {
                tracing::warn!(%peer, %reason, "MQTT connection refused or closed by the gate");
            }
        });
    }
}

/// Reads one whole packet: its raw bytes and what it says.
async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<(bytes::Bytes, Packet)>, String> {
    loop {
        match check(buf.iter(), MAX_PACKET) {
            Ok(header) => {
                let frame = buf.split_to(header.frame_length()).freeze();
                let packet = Packet::read(&mut BytesMut::from(&frame[..]), MAX_PACKET)
                    .map_err(|e| format!("malformed MQTT packet: {e:?}"))?;
                return Ok(Some((frame, packet)));
            }
            Err(CodecError::InsufficientBytes(_)) => {}
            Err(e) => return Err(format!("malformed MQTT packet: {e:?}")),
        }
        buf.reserve(8 * 1024);
        match reader.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err("connection closed inside a packet".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

/// One device connection: authenticate its CONNECT, then forward what it
/// sends through the ACL and what the broker sends untouched.
async fn connection<S>(gate: &Gate, client: S, shutdown: CancellationToken) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let mut buf = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut client_rx, &mut buf))
        .await
        .map_err(|_| "no CONNECT within 10 s".to_string())??;
    let (connect_bytes, connect) = match first {
        Some((bytes, Packet::Connect(connect))) => (bytes, connect),
        Some(_) => return Err("the first packet must be CONNECT".into()),
        // A port probe: connected and closed without a word.
        None => return Ok(()),
    };
    if connect.protocol != Protocol::V4 {
        return Err("only MQTT 3.1.1 is served".into());
    }
    let Some(login) = &connect.login else {
        refuse(&mut client_tx).await;
        return Err(format!(
            "client {:?} sent no credentials",
            connect.client_id
        ));
    };
    if login.username == gate.auth.server_user {
        // The server itself connects to the broker behind the gate.
        refuse(&mut client_tx).await;
        return Err("the server's user connects on loopback only".into());
    }
    if !gate
        .auth
        .allows(&connect.client_id, &login.username, &login.password)
        .await
    {
        refuse(&mut client_tx).await;
        return Err(format!("device {:?} not allowed", login.username));
    }
    let device = DeviceId::new(login.username.clone()).map_err(|e| e.to_string())?;
    if let Some(will) = &connect.last_will {
        if let Err(reason) = gate.acl.may_will(&device, &will.topic) {
            refuse(&mut client_tx).await;
            return Err(format!("device {device}: {reason}"));
        }
    }
    let upstream = TcpStream::connect(gate.upstream)
        .await
        .map_err(|e| format!("embedded broker unreachable: {e}"))?;
    let _ = upstream.set_nodelay(true);
    let (mut broker_rx, mut broker_tx) = upstream.into_split();
    broker_tx
        .write_all(&connect_bytes)
        .await
        .map_err(|e| format!("embedded broker: {e}"))?;

    let token = shutdown.child_token();
    gate.connections.add(device.as_str(), token.clone());
    let down = async {
        let _ = tokio::io::copy(&mut broker_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    let up = async {
        loop {
            let (bytes, packet) = match read_packet(&mut client_rx, &mut buf).await? {
                Some(p) => p,
                None => return Ok(()),
            };
            let denied = match &packet {
                Packet::Publish(p) => gate.acl.may_publish(&device, &p.topic, p.retain).err(),
                Packet::Subscribe(s) => s
                    .filters
                    .iter()
                    .find_map(|f| gate.acl.may_subscribe(&device, &f.path).err()),
                Packet::Connect(_) => Some("a second CONNECT".into()),
                _ => None,
            };
            if let Some(reason) = denied {
                return Err(format!("device {device} disconnected: {reason}"));
            }
            broker_tx
                .write_all(&bytes)
                .await
                .map_err(|e| format!("embedded broker: {e}"))?;
        }
    };
    let result = tokio::select! {
        _ = token.cancelled() => Err(format!("device {device} disconnected (revoked, or the server is stopping)")),
        _ = down => Ok(()),
        r = up => r,
    };
    token.cancel();
    gate.connections.forget_ended(device.as_str());
    result
}

/// Answers a refused CONNECT with "not authorized" (CONNACK code 5).
async fn refuse<W: AsyncWrite + Unpin>(client: &mut W) {
    let _ = client.write_all(&[0x20, 0x02, 0x00, 0x05]).await;
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl() -> (Acl, DeviceId) {
        (
            Acl::new(TopicPrefix::default()),
            DeviceId::new("dev-a").unwrap(),
        )
    }

    #[test]
    fn a_device_publishes_only_its_own_uplink_topics() {
        let (acl, a) = acl();
        for kind in ["status", "events", "telemetry", "results"] {
            let topic = format!("edgefleet/v1/devices/dev-a/{kind}");
            assert!(acl.may_publish(&a, &topic, false).is_ok(), "{topic}");
        }
        assert!(acl
            .may_publish(&a, "edgefleet/v1/devices/dev-a/status", true)
            .is_ok());
        for (topic, retain) in [
            ("edgefleet/v1/devices/dev-b/events", false),
            ("edgefleet/v1/devices/dev-b/status", true),
            ("edgefleet/v1/devices/dev-a/desired", true),
            ("edgefleet/v1/devices/dev-a/receipts", false),
            ("edgefleet/v1/devices/dev-b/receipts", false),
            ("edgefleet/v1/devices/dev-a/telemetry", true),
            ("edgefleet/v1/server/status", true),
            ("edgefleet/v1/roots", true),
            ("elsewhere", false),
        ] {
            assert!(acl.may_publish(&a, topic, retain).is_err(), "{topic}");
        }
    }

    #[test]
    fn a_device_subscribes_only_to_what_it_needs_and_no_wildcards() {
        let (acl, a) = acl();
        for filter in [
            "edgefleet/v1/devices/dev-a/desired",
            "edgefleet/v1/devices/dev-a/receipts",
            "edgefleet/v1/server/status",
            "edgefleet/v1/roots",
        ] {
            assert!(acl.may_subscribe(&a, filter).is_ok(), "{filter}");
        }
        for filter in [
            "edgefleet/v1/devices/dev-b/desired",
            "edgefleet/v1/devices/+/receipts",
            "edgefleet/v1/devices/dev-b/telemetry",
            "edgefleet/v1/devices/dev-a/#",
            "#",
            "$share/g/edgefleet/v1/devices/+/status",
        ] {
            assert!(acl.may_subscribe(&a, filter).is_err(), "{filter}");
        }
    }

    #[test]
    fn a_last_will_goes_on_the_devices_own_status() {
        let (acl, a) = acl();
        assert!(acl
            .may_will(&a, "edgefleet/v1/devices/dev-a/status")
            .is_ok());
        assert!(acl
            .may_will(&a, "edgefleet/v1/devices/dev-b/status")
            .is_err());
        assert!(acl.may_will(&a, "edgefleet/v1/server/status").is_err());
    }

    #[test]
    fn disconnecting_a_device_cancels_each_of_its_connections() {
        let c = Connections::default();
        let (t1, t2, other) = (
            CancellationToken::new(),
            CancellationToken::new(),
            CancellationToken::new(),
        );
        c.add("a", t1.clone());
        c.add("a", t2.clone());
        c.add("b", other.clone());
        assert_eq!(c.disconnect("a"), 2);
        assert!(t1.is_cancelled() && t2.is_cancelled() && !other.is_cancelled());
        assert_eq!(c.disconnect("a"), 0);
        assert_eq!(c.disconnect("b"), 1);
        assert!(other.is_cancelled());
    }
}
