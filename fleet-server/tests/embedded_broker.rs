//! The embedded broker over real sockets, with a real MQTT client
//! (rumqttc) and raw bytes where a client library would not misbehave:
//! retained messages, QoS 1 delivery, persistent sessions across a
//! reconnect, last wills (sent after a dropped link, not after a clean
//! DISCONNECT or a takeover), and refusals of malformed input.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::time::Duration;

use edgefleet_shared::TopicPrefix;
use fleet_server::broker::{Broker, Door, Limits};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

async fn start() -> (Broker, u16, CancellationToken) {
    let broker = Broker::new(TopicPrefix::default(), None, Limits::default());
    let listener = Broker::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let stop = CancellationToken::new();
    tokio::spawn(
        broker
            .clone()
            .serve(listener, Door::Open, None, stop.clone()),
    );
    (broker, port, stop)
}

fn options(id: &str, port: u16, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(clean)
        .set_keep_alive(Duration::from_secs(5));
    o
}

/// A connected client whose received publishes arrive on the channel;
/// the second value is the CONNACK's session-present flag.
struct Client {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<Publish>,
    session_present: bool,
    task: tokio::task::JoinHandle<()>,
}

async fn connect(options: MqttOptions) -> Client {
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let session_present = wait_connack(&mut eventloop).await;
    let (tx, publishes) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let _ = tx.send(p);
            }
        }
    });
    Client {
        client,
        publishes,
        session_present,
        task,
    }
}

async fn wait_connack(eventloop: &mut EventLoop) -> bool {
    tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await.expect("connects") {
                Event::Incoming(Packet::ConnAck(ack)) => return ack.session_present,
                _ => continue,
            }
        }
    })
    .await
    .expect("CONNACK in time")
}

async fn subscribe(c: &Client, filter: &str) {
    c.client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
}

async fn next(c: &mut Client) -> Publish {
    tokio::time::timeout(WAIT, c.publishes.recv())
        .await
        .expect("a message in time")
        .expect("the client is running")
}

async fn nothing_within(c: &mut Client, wait: Duration) {
    if let Ok(Some(p)) = tokio::time::timeout(wait, c.publishes.recv()).await {
        panic!("unexpected message on {}: {:?}", p.topic, p.payload);
    }
}

#[tokio::test]
async fn retained_messages_qos1_and_wildcards_reach_subscribers() {
    let (_broker, port, _stop) = start().await;
    let publisher = connect(options("pub", port, true)).await;
    publisher
        .client
        .publish("site/a/status", QoS::AtLeastOnce, true, "up")
        .await
        .unwrap();
    publisher
        .client
        .publish("site/b/status", QoS::AtLeastOnce, true, "down")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut late = connect(options("late", port, true)).await;
    subscribe(&late, "site/+/status").await;
    let mut got = [next(&mut late).await, next(&mut late).await];
    got.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(got[0].payload, "up");
    assert_eq!(got[1].payload, "down");
    assert!(
        got.iter().all(|p| p.retain),
        "sent because of the subscription"
    );
    // Live messages follow, unflagged, once each despite two matching filters.
    subscribe(&late, "site/#").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    while late.publishes.try_recv().is_ok() {}
    publisher
        .client
        .publish("site/a/events", QoS::AtLeastOnce, false, "e1")
        .await
        .unwrap();
    let live = next(&mut late).await;
    assert_eq!(
        (live.topic.as_str(), &live.payload[..]),
        ("site/a/events", &b"e1"[..])
    );
    assert!(!live.retain);
    assert_eq!(live.qos, QoS::AtLeastOnce);
    nothing_within(&mut late, Duration::from_millis(300)).await;
    // An empty retained message clears it.
    publisher
        .client
        .publish("site/a/status", QoS::AtLeastOnce, true, "")
        .await
        .unwrap();
    let _ = next(&mut late).await;
    let mut third = connect(options("third", port, true)).await;
    subscribe(&third, "site/+/status").await;
    assert_eq!(next(&mut third).await.payload, "down");
    nothing_within(&mut third, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_persistent_session_gets_what_was_published_while_it_was_away() {
    let (_broker, port, _stop) = start().await;
    let server = connect(options("server", port, false)).await;
    assert!(!server.session_present);
    subscribe(&server, "d/+/events").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, server.task).await;

    let device = connect(options("dev", port, true)).await;
    for i in 0..50 {
        device
            .client
            .publish("d/dev/events", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    // A QoS 0 message is not kept for an absent client.
    device
        .client
        .publish("d/dev/events", QoS::AtMostOnce, false, "lost")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut back = connect(options("server", port, false)).await;
    assert!(back.session_present);
    for i in 0..50 {
        assert_eq!(next(&mut back).await.payload, format!("{i}"), "in order");
    }
    nothing_within(&mut back, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_will_follows_a_dropped_link_but_not_a_goodbye_or_a_takeover() {
    let (broker, port, _stop) = start().await;
    let mut watcher = connect(options("watcher", port, true)).await;
    subscribe(&watcher, "wills/#").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let with_will = |id: &str| {
        let mut o = options(id, port, true);
        o.set_last_will(LastWill::new(
            format!("wills/{id}"),
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        o
    };

    // A goodbye: no will.
    let polite = connect(with_will("polite")).await;
    polite.client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(WAIT, polite.task).await;
    nothing_within(&mut watcher, Duration::from_millis(500)).await;

    // A takeover: the old connection is closed, its will not sent.
    let first = connect(with_will("twin")).await;
    let second = connect(with_will("twin")).await;
    let _ = tokio::time::timeout(WAIT, first.task).await;
    nothing_within(&mut watcher, Duration::from_millis(500)).await;
    assert_eq!(broker.stats().1, 2, "the watcher and the second twin");

    // A dropped link: the will.
    second.task.abort();
    drop(second.client);
    let will = next(&mut watcher).await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("wills/twin", &b"gone"[..])
    );
}

/// Raw bytes: what a client library would never send.
#[tokio::test]
async fn malformed_and_unsupported_clients_are_refused_clearly() {
    let (_broker, port, _stop) = start().await;
    let exchange = |bytes: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
            .await
            .expect("the broker closes")
            .ok();
        answer
    };
    // MQTT 5 CONNECT (protocol level 5, no properties): "unacceptable
    // protocol version" (CONNACK return code 1).
    let v5 = vec![
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 0,
    ];
    assert_eq!(exchange(v5).await, [0x20, 0x02, 0x00, 0x01]);
    // MQTT 3.1 ("MQIsdp", level 3): the same.
    let v31 = vec![
        0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 60, 0, 0,
    ];
    assert_eq!(exchange(v31).await, [0x20, 0x02, 0x00, 0x01]);
    // A first packet that is not CONNECT, and garbage: closed, no answer.
    assert!(exchange(vec![0xC0, 0x00]).await.is_empty());
    assert!(exchange(vec![0xFF; 16]).await.is_empty());
    // A persistent session with no client id: "identifier rejected" (2).
    let anonymous = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60, 0, 0];
    assert_eq!(exchange(anonymous).await, [0x20, 0x02, 0x00, 0x02]);

    // A publish to a wildcard topic cuts the client off; the broker
    // keeps serving others.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let connect = [
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'r', b'w',
    ];
    raw.write_all(&connect).await.unwrap();
    let mut ack = [0u8; 4];
    raw.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
    raw.write_all(&[0x30, 5, 0, 3, b'a', b'/', b'#'])
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, raw.read_to_end(&mut rest))
        .await
        .expect("closed")
        .ok();
    assert!(rest.is_empty());
    let mut fine = connect_ok(port).await;
    subscribe(&fine, "x").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    fine.client
        .publish("x", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    assert_eq!(next(&mut fine).await.payload, "still here");
}

async fn connect_ok(port: u16) -> Client {
    connect(options("fine", port, true)).await
}
