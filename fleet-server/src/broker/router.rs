//! What the embedded broker knows, with no I/O: sessions, subscriptions,
//! retained messages, and each session's queue of messages to send and
//! those sent but not yet acknowledged. Connections ([`super::connection`])
//! drive it under one lock; every operation is a few hash look-ups.
//!
//! Routing is by index, not by scan: subscriptions without wildcards (a
//! device's own desired state and receipts: two per device) sit in a hash
//! map keyed by topic, so a publish finds its subscribers in one look-up
//! however many devices there are. Wildcard filters (the fleet server's
//! `+` subscriptions: a handful) are checked one by one.
//!
//! MQTT 3.1.1 semantics kept here: a persistent session (`clean_session =
//! false`) keeps its subscriptions, queued QoS 1 messages and unacknowledged
//! ones while its client is away, and re-sends the latter first, marked
//! duplicate; a clean session is forgotten at disconnect. Messages go out
//! at the lower of the publish's and the subscription's QoS, never above 1.
//! A session's queue is bounded (messages and bytes); what does not fit is
//! dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One message as published, shared by every session it goes to.
#[derive(Debug)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// The QoS it goes out with (at most 1).
    pub qos: QoS,
    /// Set for retained messages sent because of a new subscription.
    pub retain: bool,
}

impl Delivery {
    fn bytes(&self) -> usize {
        self.message.payload.len() + self.message.topic.len()
    }
}

/// One delivery ready to be written: its packet id (QoS 1) and whether it
/// was sent before.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub delivery: Delivery,
    pub pkid: u16,
    pub dup: bool,
}

/// The connection a session is attached to.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub id: u64,
    /// Woken when the session has something to send.
    pub wake: Arc<Notify>,
    /// Cancelled to close the connection (taken over, or revoked).
    pub kick: CancellationToken,
}

/// How much a session may hold for its client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
    /// QoS 1 messages sent and not yet acknowledged, per connection.
    pub max_inflight: usize,
}

impl Limits {
    /// A device's own session: it is sent its desired state, receipts and
    /// a few retained messages, never a flood; a device that stays away
    /// with a persistent session must not hold much for long.
    pub fn device() -> Self {
        Self {
            max_queued_messages: 1000,
            max_queued_bytes: 8 * 1024 * 1024,
            max_inflight: 100,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_queued_messages: 100_000,
            max_queued_bytes: 128 * 1024 * 1024,
            max_inflight: 1000,
        }
    }
}

#[derive(Debug, Default)]
struct Session {
    clean: bool,
    limits: Limits,
    filters: HashMap<String, QoS>,
    queue: VecDeque<Delivery>,
    queued_bytes: usize,
    inflight: HashMap<u16, Delivery>,
    /// Packet ids in the order they were sent (acknowledged ones are
    /// skipped lazily).
    inflight_order: VecDeque<u16>,
    /// In-flight messages to send again (after a reconnect).
    resend: bool,
    next_pkid: u16,
    conn: Option<Attachment>,
}

impl Session {
    fn push(&mut self, delivery: Delivery) -> bool {
        let limits = &self.limits;
        if self.conn.is_none() && (self.clean || delivery.qos == QoS::AtMostOnce) {
            // Nobody to send it to, and nothing kept for later.
            return true;
        }
        if self.queue.len() >= limits.max_queued_messages
            || self.queued_bytes + delivery.bytes() > limits.max_queued_bytes
        {
            return false;
        }
        self.queued_bytes += delivery.bytes();
        self.queue.push_back(delivery);
        true
    }

    fn wake(&self) {
        if let Some(conn) = &self.conn {
            conn.wake.notify_one();
        }
    }

    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_pkid) {
                return self.next_pkid;
            }
        }
    }
}

/// What connecting did.
#[derive(Debug)]
pub struct Connected {
    /// The session existed and was kept (CONNACK's session-present flag).
    pub session_present: bool,
    /// The connection this one took over (already told to close).
    pub replaced: Option<u64>,
}

/// Counters of what the broker did, for `/metrics`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub received: u64,
    pub delivered: u64,
    /// Messages a full session queue could not take.
    pub dropped: u64,
}

/// Sessions, subscriptions and retained messages.
#[derive(Debug, Default)]
pub struct Router {
    sessions: HashMap<Arc<str>, Session>,
    /// Filters without wildcards, by topic: who subscribed, at what QoS.
    exact: HashMap<String, HashMap<Arc<str>, QoS>>,
    /// Filters with wildcards.
    wild: HashMap<String, HashMap<Arc<str>, QoS>>,
    retained: HashMap<Arc<str>, Arc<Message>>,
    stats: Stats,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Sessions with a connection attached.
    pub fn connected(&self) -> usize {
        self.sessions.values().filter(|s| s.conn.is_some()).count()
    }

    /// Attaches a connection to `client`'s session, creating it, or
    /// starting it afresh for a clean session. An earlier connection of
    /// the same client is told to close (MQTT's takeover). `limits` bound
    /// what the session holds.
    pub fn connect(
        &mut self,
        client: &str,
        clean: bool,
        conn: Attachment,
        limits: Limits,
    ) -> Connected {
        let mut replaced = None;
        let mut session_present = false;
        if let Some(old) = self.sessions.get_mut(client) {
            if let Some(previous) = old.conn.take() {
                previous.kick.cancel();
                replaced = Some(previous.id);
            }
            session_present = !clean && !old.clean;
            if !session_present {
                self.forget(client);
            }
        }
        let session = self.sessions.entry(Arc::from(client)).or_default();
        session.clean = clean;
        session.limits = limits;
        session.resend = !session.inflight.is_empty();
        session.conn = Some(conn);
        if !session.queue.is_empty() || session.resend {
            session.wake();
        }
        Connected {
            session_present,
            replaced,
        }
    }

    /// Detaches connection `conn` from `client`'s session, forgetting a
    /// clean session. Returns whether `conn` was still the session's
    /// connection (false after a takeover: its last will is not sent).
    pub fn disconnect(&mut self, client: &str, conn: u64) -> bool {
        let Some(session) = self.sessions.get_mut(client) else {
            return false;
        };
        if session.conn.as_ref().map(|c| c.id) != Some(conn) {
            return false;
        }
        session.conn = None;
        if session.clean {
            self.forget(client);
        }
        true
    }

    /// Closes `client`'s connection and forgets its session entirely
    /// (a revoked device). Returns whether it was connected.
    pub fn evict(&mut self, client: &str) -> bool {
        let connected = match self.sessions.get_mut(client) {
            Some(session) => match session.conn.take() {
                Some(conn) => {
                    conn.kick.cancel();
                    true
                }
                None => false,
            },
            None => false,
        };
        self.forget(client);
        connected
    }

    fn forget(&mut self, client: &str) {
        let Some(session) = self.sessions.remove(client) else {
            return;
        };
        for filter in session.filters.keys() {
            self.remove_subscriber(filter, client);
        }
    }

    fn remove_subscriber(&mut self, filter: &str, client: &str) {
        let index = if has_wildcards(filter) {
            &mut self.wild
        } else {
            &mut self.exact
        };
        if let Some(subs) = index.get_mut(filter) {
            subs.remove(client);
            if subs.is_empty() {
                index.remove(filter);
            }
        }
    }

    /// Subscribes `client` to `filter` (already validated); queues the
    /// retained messages it matches. Returns the QoS granted.
    pub fn subscribe(&mut self, client: &str, filter: &str, qos: QoS) -> QoS {
        let granted = served_qos(qos);
        let Some(key) = self
            .sessions
            .get_key_value(client)
            .map(|(k, _)| Arc::clone(k))
        else {
            return granted;
        };
        let wildcard = has_wildcards(filter);
        let index = if wildcard {
            &mut self.wild
        } else {
            &mut self.exact
        };
        index
            .entry(filter.to_string())
            .or_default()
            .insert(key, granted);
        let retained: Vec<Arc<Message>> = if wildcard {
            self.retained
                .iter()
                .filter(|(topic, _)| matches(filter, topic))
                .map(|(_, m)| Arc::clone(m))
                .collect()
        } else {
            self.retained.get(filter).cloned().into_iter().collect()
        };
        let Some(session) = self.sessions.get_mut(client) else {
            return granted;
        };
        session.filters.insert(filter.to_string(), granted);
        for message in retained {
            let delivery = Delivery {
                qos: min_qos(message.qos, granted),
                retain: true,
                message,
            };
            if !session.push(delivery) {
                self.stats.dropped += 1;
            }
        }
        session.wake();
        granted
    }

    pub fn unsubscribe(&mut self, client: &str, filter: &str) {
        if let Some(session) = self.sessions.get_mut(client) {
            if session.filters.remove(filter).is_some() {
                self.remove_subscriber(filter, client);
            }
        }
    }

    /// Routes `message` (topic already validated) to every matching
    /// subscription and keeps or clears it as the retained message of its
    /// topic. Returns how many sessions it was queued for.
    pub fn publish(&mut self, message: Message) -> usize {
        self.stats.received += 1;
        let message = Arc::new(message);
        if message.retain {
            if message.payload.is_empty() {
                self.retained.remove(&message.topic);
            } else {
                self.retained
                    .insert(Arc::clone(&message.topic), Arc::clone(&message));
            }
        }
        let mut targets: Vec<(Arc<str>, QoS)> = Vec::new();
        if let Some(subs) = self.exact.get(&*message.topic) {
            targets.extend(subs.iter().map(|(c, q)| (Arc::clone(c), *q)));
        }
        let mut overlapping = false;
        for (filter, subs) in &self.wild {
            if matches(filter, &message.topic) {
                overlapping |= !targets.is_empty();
                targets.extend(subs.iter().map(|(c, q)| (Arc::clone(c), *q)));
            }
        }
        if overlapping {
            // One copy per client, at the highest QoS it asked for.
            targets.sort_by(|a, b| a.0.cmp(&b.0).then(qos_rank(b.1).cmp(&qos_rank(a.1))));
            targets.dedup_by(|a, b| a.0 == b.0);
        }
        let mut queued = 0;
        for (client, granted) in targets {
            let Some(session) = self.sessions.get_mut(&client) else {
                continue;
            };
            let delivery = Delivery {
                qos: min_qos(message.qos, granted),
                retain: false,
                message: Arc::clone(&message),
            };
            if session.push(delivery) {
                session.wake();
                queued += 1;
            } else {
                self.stats.dropped += 1;
            }
        }
        queued
    }

    /// Moves what connection `conn` of `client` may send now into `out`:
    /// first unacknowledged messages to re-send, then queued ones while
    /// the in-flight window has room (QoS 0 ones do not count against it).
    pub fn take(&mut self, client: &str, conn: u64, out: &mut Vec<Outgoing>) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        let max_inflight = session.limits.max_inflight;
        if session.conn.as_ref().map(|c| c.id) != Some(conn) {
            return;
        }
        if session.resend {
            session.resend = false;
            let order: Vec<u16> = session.inflight_order.iter().copied().collect();
            for pkid in order {
                if let Some(delivery) = session.inflight.get(&pkid) {
                    out.push(Outgoing {
                        delivery: delivery.clone(),
                        pkid,
                        dup: true,
                    });
                }
            }
        }
        while let Some(next) = session.queue.front() {
            if next.qos != QoS::AtMostOnce && session.inflight.len() >= max_inflight {
                break;
            }
            let Some(delivery) = session.queue.pop_front() else {
                break;
            };
            session.queued_bytes -= delivery.bytes();
            let pkid = if delivery.qos == QoS::AtMostOnce {
                0
            } else {
                let pkid = session.pkid();
                session.inflight.insert(pkid, delivery.clone());
                session.inflight_order.push_back(pkid);
                pkid
            };
            self.stats.delivered += 1;
            out.push(Outgoing {
                delivery,
                pkid,
                dup: false,
            });
        }
    }

    /// `client` acknowledged `pkid`. Returns whether that freed room in
    /// its window for queued messages.
    pub fn acked(&mut self, client: &str, pkid: u16) -> bool {
        let Some(session) = self.sessions.get_mut(client) else {
            return false;
        };
        if session.inflight.remove(&pkid).is_none() {
            return false;
        }
        while let Some(front) = session.inflight_order.front() {
            if session.inflight.contains_key(front) {
                break;
            }
            session.inflight_order.pop_front();
        }
        !session.queue.is_empty()
    }

    /// Messages queued or in flight for `client`.
    #[cfg(test)]
    pub fn pending(&self, client: &str) -> usize {
        self.sessions
            .get(client)
            .map_or(0, |s| s.queue.len() + s.inflight.len())
    }
}

fn qos_rank(qos: QoS) -> u8 {
    qos as u8
}

/// The QoS the broker serves `qos` at: as asked, but never above 1 (a
/// QoS 2 publish or subscription is taken at QoS 1).
pub fn served_qos(qos: QoS) -> QoS {
    min_qos(qos, QoS::AtLeastOnce)
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if qos_rank(a) <= qos_rank(b) {
        a
    } else {
        b
    }
}

fn has_wildcards(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// Why a topic name cannot be published to, if it cannot.
pub fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("an empty topic".into());
    }
    if has_wildcards(topic) || topic.contains('\0') {
        return Err(format!("topic {topic:?} has a wildcard or a NUL"));
    }
    Ok(())
}

/// Why a subscription filter is malformed, if it is.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() || filter.contains('\0') {
        return Err("an empty filter, or one with a NUL".into());
    }
    if filter.starts_with("$share/") {
        return Err("shared subscriptions are not served".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let bad = (level.contains('#') && (*level != "#" || i + 1 != levels.len()))
            || (level.contains('+') && *level != "+");
        if bad {
            return Err(format!("malformed filter {filter:?}"));
        }
    }
    Ok(())
}

/// Whether `topic` matches `filter` (both valid). Wildcards never match
/// a first level starting with `$`.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            exact => {
                if topic_levels.next() != Some(exact) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn attach(id: u64) -> Attachment {
        Attachment {
            id,
            wake: Arc::new(Notify::new()),
            kick: CancellationToken::new(),
        }
    }

    fn message(topic: &str, payload: &str, qos: QoS, retain: bool) -> Message {
        Message {
            topic: Arc::from(topic),
            payload: Bytes::from(payload.to_string()),
            qos,
            retain,
        }
    }

    fn taken(router: &mut Router, client: &str, conn: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
        router.take(client, conn, &mut out);
        out
    }

    fn payloads(out: &[Outgoing]) -> Vec<String> {
        out.iter()
            .map(|o| String::from_utf8_lossy(&o.delivery.message.payload).into_owned())
            .collect()
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        for (filter, topic, expected) in [
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+/c", "a/b/c", true),
            ("a/+/c", "a//c", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("+", "a", true),
            ("+", "a/b", false),
            (
                "edgefleet/v1/devices/+/status",
                "edgefleet/v1/devices/d1/status",
                true,
            ),
            (
                "edgefleet/v1/devices/+/status",
                "edgefleet/v1/devices/d1/events",
                false,
            ),
        ] {
            assert_eq!(matches(filter, topic), expected, "{filter} ~ {topic}");
        }
        for bad in ["a/#/b", "a#", "a/b+", "", "$share/g/a"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
        for good in ["a/#", "+/+", "#", "a/+/c"] {
            assert!(check_filter(good).is_ok(), "{good}");
        }
        for bad in ["", "a/+", "a/#"] {
            assert!(check_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exact_and_wildcard_subscribers_each_get_one_copy() {
        let mut r = Router::default();
        r.connect("dev", true, attach(1), limits());
        r.connect("server", false, attach(2), limits());
        r.connect("other", true, attach(3), limits());
        r.subscribe("dev", "p/devices/dev/desired", QoS::AtLeastOnce);
        r.subscribe("server", "p/devices/+/desired", QoS::AtLeastOnce);
        r.subscribe("server", "p/#", QoS::AtMostOnce);
        r.subscribe("other", "p/devices/other/desired", QoS::AtLeastOnce);
        assert_eq!(
            r.publish(message(
                "p/devices/dev/desired",
                "x",
                QoS::AtLeastOnce,
                false
            )),
            2
        );
        let dev = taken(&mut r, "dev", 1);
        assert_eq!(payloads(&dev), ["x"]);
        assert_eq!(dev[0].delivery.qos, QoS::AtLeastOnce);
        let server = taken(&mut r, "server", 2);
        assert_eq!(server.len(), 1, "one copy for overlapping filters");
        assert_eq!(server[0].delivery.qos, QoS::AtLeastOnce, "the higher QoS");
        assert!(taken(&mut r, "other", 3).is_empty());
        // A stale connection id takes nothing.
        r.publish(message(
            "p/devices/dev/desired",
            "y",
            QoS::AtLeastOnce,
            false,
        ));
        assert!(taken(&mut r, "dev", 9).is_empty());
        assert_eq!(payloads(&taken(&mut r, "dev", 1)), ["y"]);
    }

    #[test]
    fn retained_messages_go_to_new_subscribers_and_an_empty_one_clears() {
        let mut r = Router::default();
        r.publish(message("t/a", "one", QoS::AtLeastOnce, true));
        r.publish(message("t/a", "two", QoS::AtLeastOnce, true));
        r.publish(message("t/b", "b", QoS::AtMostOnce, true));
        r.connect("c", true, attach(1), limits());
        r.subscribe("c", "t/a", QoS::AtLeastOnce);
        let out = taken(&mut r, "c", 1);
        assert_eq!(payloads(&out), ["two"]);
        assert!(out[0].delivery.retain);
        r.subscribe("c", "t/+", QoS::AtMostOnce);
        let mut out = payloads(&taken(&mut r, "c", 1));
        out.sort();
        assert_eq!(out, ["b", "two"]);
        // A live publish is not flagged retained; an empty one clears.
        r.publish(message("t/a", "", QoS::AtLeastOnce, true));
        let live = taken(&mut r, "c", 1);
        assert!(!live[0].delivery.retain);
        r.connect("d", true, attach(2), limits());
        r.subscribe("d", "t/#", QoS::AtLeastOnce);
        assert_eq!(payloads(&taken(&mut r, "d", 2)), ["b"]);
    }

    #[test]
    fn the_window_holds_back_qos1_until_acknowledged() {
        let mut r = Router::new();
        let window = Limits {
            max_inflight: 2,
            ..Limits::default()
        };
        r.connect("c", true, attach(1), window);
        r.subscribe("c", "t", QoS::AtLeastOnce);
        for i in 0..5 {
            r.publish(message("t", &i.to_string(), QoS::AtLeastOnce, false));
        }
        let first = taken(&mut r, "c", 1);
        assert_eq!(payloads(&first), ["0", "1"]);
        assert_ne!(first[0].pkid, first[1].pkid);
        assert!(taken(&mut r, "c", 1).is_empty(), "window full");
        assert!(!r.acked("c", 999), "unknown packet id");
        assert!(r.acked("c", first[0].pkid));
        assert_eq!(payloads(&taken(&mut r, "c", 1)), ["2"]);
        assert_eq!(r.pending("c"), 4);
    }

    #[test]
    fn a_persistent_session_keeps_messages_and_resends_unacknowledged_ones() {
        let mut r = Router::default();
        r.connect("server", false, attach(1), limits());
        r.subscribe("server", "d/+/events", QoS::AtLeastOnce);
        r.publish(message("d/a/events", "1", QoS::AtLeastOnce, false));
        let sent = taken(&mut r, "server", 1);
        assert!(r.disconnect("server", 1));
        r.publish(message("d/a/events", "2", QoS::AtLeastOnce, false));
        r.publish(message("d/a/events", "qos0", QoS::AtMostOnce, false));
        let back = r.connect("server", false, attach(2), limits());
        assert!(back.session_present);
        let out = taken(&mut r, "server", 2);
        assert_eq!(payloads(&out), ["1", "2"], "QoS 0 is not kept offline");
        assert!(out[0].dup && out[0].pkid == sent[0].pkid);
        assert!(!out[1].dup);
        // A clean start forgets it all, subscriptions too.
        let fresh = r.connect("server", true, attach(3), limits());
        assert!(!fresh.session_present);
        assert_eq!(
            r.publish(message("d/a/events", "3", QoS::AtLeastOnce, false)),
            0
        );
        assert!(taken(&mut r, "server", 3).is_empty());
    }

    #[test]
    fn a_takeover_closes_the_old_connection_and_keeps_its_will_unsent() {
        let mut r = Router::default();
        let old = attach(1);
        r.connect("dev", true, old.clone(), limits());
        r.subscribe("dev", "own", QoS::AtLeastOnce);
        let new = r.connect("dev", true, attach(2), limits());
        assert_eq!(new.replaced, Some(1));
        assert!(old.kick.is_cancelled());
        assert!(
            !r.disconnect("dev", 1),
            "the old connection no longer owns it"
        );
        assert_eq!(
            r.publish(message("own", "x", QoS::AtLeastOnce, false)),
            0,
            "clean: re-subscribe"
        );
        assert!(r.disconnect("dev", 2));
        assert_eq!(r.connected(), 0);
    }

    #[test]
    fn evicting_closes_the_connection_and_drops_the_session() {
        let mut r = Router::default();
        let conn = attach(1);
        r.connect("dev", false, conn.clone(), limits());
        r.subscribe("dev", "own", QoS::AtLeastOnce);
        r.publish(message("own", "x", QoS::AtLeastOnce, false));
        assert!(r.evict("dev"));
        assert!(conn.kick.is_cancelled());
        assert_eq!(r.pending("dev"), 0);
        assert_eq!(r.publish(message("own", "y", QoS::AtLeastOnce, false)), 0);
        assert!(!r.evict("dev"));
        assert!(!r.connect("dev", false, attach(2), limits()).session_present);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut r = Router::new();
        let small = Limits {
            max_queued_messages: 2,
            max_inflight: 1,
            ..Limits::default()
        };
        r.connect("c", false, attach(1), small);
        r.subscribe("c", "t", QoS::AtLeastOnce);
        for i in 0..4 {
            r.publish(message("t", &i.to_string(), QoS::AtLeastOnce, false));
        }
        assert_eq!(r.stats().dropped, 2);
        assert_eq!(r.stats().received, 4);
        assert_eq!(payloads(&taken(&mut r, "c", 1)), ["0"]);
        assert_eq!(r.stats().delivered, 1);
    }
}
