//! One client connection to the embedded broker: the CONNECT and who may
//! make it (by listener, see [`Door`]), then two halves. The reader parses
//! what the client sends (rumqttc's MQTT 3.1.1 codec), checks a device's
//! publishes and subscriptions against the [`Acl`](super::acl::Acl), and
//! hands them to the [`Router`](super::router::Router); it answers
//! acknowledgements through a bounded channel. The writer sends those
//! answers and whatever the router has queued for the session. Reading and
//! writing apart means a client busy sending never blocks what it is sent,
//! and one that stops reading only stalls itself.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use edgefleet_shared::DeviceId;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PingResp, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{check, Error as CodecError, Protocol, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::router::{check_filter, check_topic, served_qos, Attachment, Limits, Message};
use super::Broker;

/// Largest packet a client may send (a telemetry batch is at most 256 KiB).
const MAX_PACKET: usize = 4 * 1024 * 1024;
/// Time a new connection has to send its CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Acknowledgements waiting for the writer before the reader waits too.
const CONTROL_QUEUE: usize = 256;

/// What the reader asks the writer to send: small, because every
/// connection's channel holds a block of them.
#[derive(Debug)]
enum Answer {
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    SubAck(u16, Vec<SubscribeReasonCode>),
    UnsubAck(u16),
    PingResp,
}

impl Answer {
    fn write(self, buf: &mut BytesMut) -> Result<usize, CodecError> {
        match self {
            Answer::PubAck(pkid) => PubAck::new(pkid).write(buf),
            Answer::PubRec(pkid) => PubRec::new(pkid).write(buf),
            Answer::PubComp(pkid) => PubComp::new(pkid).write(buf),
            Answer::SubAck(pkid, codes) => SubAck::new(pkid, codes).write(buf),
            Answer::UnsubAck(pkid) => UnsubAck::new(pkid).write(buf),
            Answer::PingResp => PingResp.write(buf),
        }
    }
}

/// Who a listener admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// Anyone, to any topic: a broker without device authentication.
    Open,
    /// Enrolled, unrevoked devices, each to its own topics.
    Devices,
    /// The fleet server's own client only (a loopback listener).
    Server,
}

/// How a connection ended, when not by DISCONNECT.
#[derive(Debug)]
pub enum Ended {
    /// Refused at CONNECT, or cut off for breaking the rules: worth a
    /// warning.
    Refused(String),
    /// Gone without a goodbye (a link cut, a keep-alive missed, taken
    /// over, the server stopping): routine.
    Dropped(String),
}

enum ReadError {
    Malformed(String),
    WrongProtocol,
    Io(String),
}

impl From<ReadError> for Ended {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Malformed(m) => Ended::Refused(m),
            ReadError::WrongProtocol => Ended::Refused("only MQTT 3.1.1 is served".into()),
            ReadError::Io(m) => Ended::Dropped(m),
        }
    }
}

/// Reads one whole packet (`None`: the peer closed between packets).
async fn read_packet<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<Packet>, ReadError> {
    loop {
        match check(buf.iter(), MAX_PACKET) {
            Ok(_) => {
                return match Packet::read(buf, MAX_PACKET) {
                    Ok(p) => Ok(Some(p)),
                    Err(CodecError::InvalidProtocolLevel(_) | CodecError::InvalidProtocol) => {
                        Err(ReadError::WrongProtocol)
                    }
                    Err(e) => Err(ReadError::Malformed(format!(
                        "malformed MQTT packet: {e:?}"
                    ))),
                }
            }
            Err(CodecError::InsufficientBytes(missing)) => {
                // An idle connection holds only a small buffer (thousands
                // of them wait here), even after a large packet (a batch of
                // records): a drained buffer still shares its allocation
                // with the packets split from it, so it is replaced, not
                // reused. A large packet gets what it needs.
                if buf.is_empty() {
                    *buf = BytesMut::new();
                }
                buf.reserve(if buf.is_empty() {
                    512
                } else {
                    missing.max(4096)
                });
            }
            Err(e) => {
                return Err(ReadError::Malformed(format!(
                    "malformed MQTT packet: {e:?}"
                )))
            }
        }
        match reader.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(ReadError::Io("connection closed inside a packet".into())),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(format!("read failed: {e}"))),
        }
    }
}

/// Answers a CONNECT with `code` and closes.
async fn refuse<W: AsyncWrite + Unpin>(tx: &mut W, code: ConnectReturnCode) {
    let mut buf = BytesMut::new();
    if ConnAck::new(code, false).write(&mut buf).is_ok() {
        let _ = tx.write_all(&buf).await;
    }
    let _ = tx.shutdown().await;
}

/// Serves one client until it disconnects, breaks a rule, is kicked, or
/// `shutdown`. `Ok` means it said DISCONNECT.
pub async fn serve<S>(
    broker: &Broker,
    door: Door,
    stream: S,
    shutdown: CancellationToken,
) -> Result<(), Ended>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rx, mut tx) = tokio::io::split(stream);
    let mut buf = BytesMut::new();
    let first = match tokio::time::timeout(CONNECT_TIMEOUT, read_packet(&mut rx, &mut buf)).await {
        Err(_) => return Err(Ended::Refused("no CONNECT within 10 s".into())),
        Ok(Err(ReadError::WrongProtocol)) => {
            refuse(&mut tx, ConnectReturnCode::RefusedProtocolVersion).await;
            return Err(ReadError::WrongProtocol.into());
        }
        Ok(r) => r?,
    };
    let connect = match first {
        Some(Packet::Connect(connect)) => connect,
        Some(_) => return Err(Ended::Refused("the first packet must be CONNECT".into())),
        // A port probe: connected and closed without a word.
        None => return Ok(()),
    };
    if connect.protocol != Protocol::V4 {
        refuse(&mut tx, ConnectReturnCode::RefusedProtocolVersion).await;
        return Err(ReadError::WrongProtocol.into());
    }
    let device = match admit(broker, door, &connect).await {
        Ok(device) => device,
        Err((code, reason)) => {
            refuse(&mut tx, code).await;
            return Err(Ended::Refused(reason));
        }
    };
    let id = broker.next_connection_id();
    let client: Arc<str> = if connect.client_id.is_empty() {
        if !connect.clean_session {
            refuse(&mut tx, ConnectReturnCode::BadClientId).await;
            return Err(Ended::Refused(
                "an empty client id needs a clean session".into(),
            ));
        }
        Arc::from(format!("edgefleet-anonymous-{id}"))
    } else {
        Arc::from(connect.client_id.as_str())
    };
    let will = connect.last_will.as_ref().map(|w| Message {
        topic: Arc::from(w.topic.as_str()),
        payload: bytes::Bytes::copy_from_slice(&w.message),
        qos: served_qos(w.qos),
        retain: w.retain,
    });
    if let Some(will) = &will {
        check_topic(&will.topic).map_err(|e| Ended::Refused(format!("last will: {e}")))?;
    }

    let wake = Arc::new(Notify::new());
    let kick = shutdown.child_token();
    let connected = broker.router().connect(
        &client,
        connect.clean_session,
        Attachment {
            id,
            wake: Arc::clone(&wake),
            kick: kick.clone(),
        },
        if device.is_some() {
            Limits::device()
        } else {
            broker.limits()
        },
    );
    if connected.replaced.is_some() {
        tracing::debug!(client = %client, "MQTT client reconnected: its earlier connection is closed");
    }
    let mut ack = BytesMut::new();
    let _ = ConnAck::new(ConnectReturnCode::Success, connected.session_present).write(&mut ack);
    if let Err(e) = tx.write_all(&ack).await {
        kick.cancel();
        broker.router().disconnect(&client, id);
        return Err(Ended::Dropped(format!("write failed: {e}")));
    }

    let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
    let writer = tokio::spawn(write_loop(
        broker.clone(),
        Arc::clone(&client),
        id,
        tx,
        control_rx,
        Arc::clone(&wake),
        kick.clone(),
    ));
    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let reader = Reader {
        broker,
        client: &client,
        device: device.as_ref(),
        control,
        wake,
        keep_alive,
    };
    let result = tokio::select! {
        _ = kick.cancelled() => Err(Ended::Dropped("closed by the broker (taken over, revoked, or the server is stopping)".into())),
        r = reader.run(&mut rx, &mut buf) => r,
    };
    kick.cancel();
    let _ = writer.await;
    let current = broker.router().disconnect(&client, id);
    if result.is_err() && current {
        if let Some(will) = will {
            broker.router().publish(will);
        }
    }
    result
}

/// Checks a CONNECT against what `door` admits; returns the device it is,
/// for a device door.
async fn admit(
    broker: &Broker,
    door: Door,
    connect: &rumqttc::mqttbytes::v4::Connect,
) -> Result<Option<DeviceId>, (ConnectReturnCode, String)> {
    if door == Door::Open {
        return Ok(None);
    }
    let Some(auth) = broker.auth() else {
        return Err((
            ConnectReturnCode::ServiceUnavailable,
            "device authentication is not configured".into(),
        ));
    };
    let Some(login) = &connect.login else {
        return Err((
            ConnectReturnCode::NotAuthorized,
            format!("client {:?} sent no credentials", connect.client_id),
        ));
    };
    if door == Door::Server {
        return if auth.is_server(&login.username, &login.password) {
            Ok(None)
        } else {
            Err((
                ConnectReturnCode::NotAuthorized,
                "only the fleet server connects on this listener".into(),
            ))
        };
    }
    if login.username == auth.server_user {
        return Err((
            ConnectReturnCode::NotAuthorized,
            "the server's user connects on loopback only".into(),
        ));
    }
    if !auth
        .allows(&connect.client_id, &login.username, &login.password)
        .await
    {
        return Err((
            ConnectReturnCode::NotAuthorized,
            format!("device {:?} not allowed", login.username),
        ));
    }
    let device = DeviceId::new(login.username.clone())
        .map_err(|e| (ConnectReturnCode::BadClientId, e.to_string()))?;
    if let Some(will) = &connect.last_will {
        broker
            .acl()
            .may_will(&device, &will.topic)
            .map_err(|reason| {
                (
                    ConnectReturnCode::NotAuthorized,
                    format!("device {device}: {reason}"),
                )
            })?;
    }
    Ok(Some(device))
}

struct Reader<'a> {
    broker: &'a Broker,
    client: &'a Arc<str>,
    device: Option<&'a DeviceId>,
    control: mpsc::Sender<Answer>,
    wake: Arc<Notify>,
    keep_alive: Option<Duration>,
}

impl Reader<'_> {
    async fn answer(&self, packet: Answer) -> Result<(), Ended> {
        self.control
            .send(packet)
            .await
            .map_err(|_| Ended::Dropped("the connection's writer stopped".into()))
    }

    fn cut(&self, reason: String) -> Ended {
        match self.device {
            Some(device) => Ended::Refused(format!("device {device} disconnected: {reason}")),
            None => Ended::Refused(format!("client {} disconnected: {reason}", self.client)),
        }
    }

    async fn run<R: AsyncRead + Unpin>(&self, rx: &mut R, buf: &mut BytesMut) -> Result<(), Ended> {
        // Inbound QoS 2 packet ids between PUBLISH and PUBREL.
        let mut exactly_once: HashSet<u16> = HashSet::new();
        loop {
            let packet = match self.keep_alive {
                Some(limit) => tokio::time::timeout(limit, read_packet(rx, buf))
                    .await
                    .map_err(|_| Ended::Dropped("keep-alive expired".into()))??,
                None => read_packet(rx, buf).await?,
            };
            let Some(packet) = packet else {
                return Err(Ended::Dropped("closed without DISCONNECT".into()));
            };
            match packet {
                Packet::Publish(p) => {
                    check_topic(&p.topic).map_err(|e| self.cut(e))?;
                    if let Some(device) = self.device {
                        self.broker
                            .acl()
                            .may_publish(device, &p.topic, p.retain)
                            .map_err(|e| self.cut(e))?;
                    }
                    let (qos, pkid) = (p.qos, p.pkid);
                    let route = |p: Publish| {
                        self.broker.router().publish(Message {
                            topic: Arc::from(p.topic.as_str()),
                            // A retained message may stay for months: it
                            // gets its own allocation, not a slice pinning
                            // the read buffer it arrived in.
                            payload: if p.retain {
                                bytes::Bytes::copy_from_slice(&p.payload)
                            } else {
                                p.payload
                            },
                            qos: served_qos(p.qos),
                            retain: p.retain,
                        });
                    };
                    match qos {
                        QoS::AtMostOnce => route(p),
                        QoS::AtLeastOnce => {
                            route(p);
                            self.answer(Answer::PubAck(pkid)).await?;
                        }
                        QoS::ExactlyOnce => {
                            if exactly_once.insert(pkid) {
                                route(p);
                            }
                            self.answer(Answer::PubRec(pkid)).await?;
                        }
                    }
                }
                Packet::PubRel(r) => {
                    exactly_once.remove(&r.pkid);
                    self.answer(Answer::PubComp(r.pkid)).await?;
                }
                Packet::PubAck(a) => {
                    if self.broker.router().acked(self.client, a.pkid) {
                        self.wake.notify_one();
                    }
                }
                Packet::Subscribe(s) => {
                    let mut codes = Vec::with_capacity(s.filters.len());
                    for f in &s.filters {
                        let allowed = check_filter(&f.path).and_then(|()| match self.device {
                            Some(device) => self.broker.acl().may_subscribe(device, &f.path),
                            None => Ok(()),
                        });
                        match allowed {
                            Ok(()) => codes.push(SubscribeReasonCode::Success(served_qos(f.qos))),
                            // A device asking for what is not its own is
                            // cut off; other clients are told no.
                            Err(e) if self.device.is_some() => return Err(self.cut(e)),
                            Err(_) => codes.push(SubscribeReasonCode::Failure),
                        }
                    }
                    // The acknowledgement goes ahead of the retained
                    // messages the subscription brings (the writer sends
                    // answers first).
                    self.answer(Answer::SubAck(s.pkid, codes.clone())).await?;
                    let mut router = self.broker.router();
                    for (f, code) in s.filters.iter().zip(codes) {
                        if let SubscribeReasonCode::Success(qos) = code {
                            router.subscribe(self.client, &f.path, qos);
                        }
                    }
                }
                Packet::Unsubscribe(u) => {
                    {
                        let mut router = self.broker.router();
                        for topic in &u.topics {
                            router.unsubscribe(self.client, topic);
                        }
                    }
                    self.answer(Answer::UnsubAck(u.pkid)).await?;
                }
                Packet::PingReq => self.answer(Answer::PingResp).await?,
                Packet::Disconnect => return Ok(()),
                // The broker never sends QoS 2, so these answer nothing.
                Packet::PubRec(_) | Packet::PubComp(_) => {}
                Packet::Connect(_) => return Err(self.cut("a second CONNECT".into())),
                Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
                    return Err(self.cut("a packet only a broker sends".into()))
                }
            }
        }
    }
}

/// Sends answers and the session's messages until the connection ends.
/// Each round takes the session's messages first and then the answers
/// waiting, and writes the answers first: an answer queued before a
/// message (a SUBACK before the retained messages it brings) goes first.
async fn write_loop<W: AsyncWrite + Unpin>(
    broker: Broker,
    client: Arc<str>,
    id: u64,
    mut tx: W,
    mut control: mpsc::Receiver<Answer>,
    wake: Arc<Notify>,
    kick: CancellationToken,
) {
    // Allocated while there is something to write, released when the
    // connection is idle.
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = kick.cancelled() => break,
            answer = control.recv() => match answer {
                Some(answer) => Some(answer),
                None => break,
            },
            _ = wake.notified() => None,
        };
        broker.router().take(&client, id, &mut out);
        let mut encoded = Ok(0);
        for answer in first
            .into_iter()
            .chain(std::iter::from_fn(|| control.try_recv().ok()))
        {
            encoded = encoded.and(answer.write(&mut buf));
        }
        for o in out.drain(..) {
            let publish = Publish {
                dup: o.dup,
                qos: o.delivery.qos,
                retain: o.delivery.retain,
                topic: o.delivery.message.topic.to_string(),
                pkid: o.pkid,
                payload: o.delivery.message.payload.clone(),
            };
            encoded = encoded.and(publish.write(&mut buf));
        }
        if let Err(e) = encoded {
            tracing::error!(client = %client, error = ?e, "cannot encode an MQTT packet");
            break;
        }
        let written = async {
            tx.write_all(&buf).await?;
            tx.flush().await
        };
        let written = tokio::select! {
            _ = kick.cancelled() => break,
            w = written => w,
        };
        if written.is_err() {
            break;
        }
        buf = BytesMut::new();
        if out.capacity() > 64 {
            out = Vec::new();
        }
    }
    kick.cancel();
    let _ = tx.shutdown().await;
}
