//! The store suite's tests of what replicas share through the database,
//! on both backends like the rest: presence (a late, stale last will),
//! dashboard sessions (by id hash, with
//! idle and absolute expiry at injected times, a cap per token) and
//! telemetry and update events read back in arrival order.

use super::*;

const RULES: SessionRules = SessionRules {
    idle_secs: 100,
    lifetime_secs: 1000,
    per_token: 3,
};

fn session(id: &str, token: &str, at: u64) -> DashboardSession {
    DashboardSession {
        id_sha256: format!("{id:0>64}"),
        token_id: token.into(),
        csrf: format!("csrf-{id}"),
        created_at: at,
        last_used: at,
    }
}

async fn dashboard_sessions_expire_idle_and_absolutely_and_end(f: Fixture) {
    let s = &f.store;
    let a = session("a", "tok", 10_000);
    s.create_dashboard_session(&a, &RULES).await.unwrap();
    let got = s.dashboard_session(&a.id_sha256, 10_050, &RULES).await;
    assert_eq!(got.unwrap(), Some(a.clone()));
    assert_eq!(
        s.dashboard_session(&"f".repeat(64), 10_050, &RULES)
            .await
            .unwrap(),
        None
    );
    // Idle for longer than allowed: ended, and deleted on that read.
    assert_eq!(
        s.dashboard_session(&a.id_sha256, 10_101, &RULES)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.dashboard_session(&a.id_sha256, 10_050, &RULES)
            .await
            .unwrap(),
        None,
        "an ended session is deleted"
    );

    // Use keeps a session alive (touching never goes back in time), until
    // its lifetime is over however recently it was used.
    let b = session("b", "tok", 20_000);
    s.create_dashboard_session(&b, &RULES).await.unwrap();
    s.touch_dashboard_session(&b.id_sha256, 20_090)
        .await
        .unwrap();
    s.touch_dashboard_session(&b.id_sha256, 20_010)
        .await
        .unwrap();
    let got = s
        .dashboard_session(&b.id_sha256, 20_150, &RULES)
        .await
        .unwrap()
        .expect("used 60 s ago");
    assert_eq!(got.last_used, 20_090);
    assert_eq!(got.created_at, 20_000);
    let mut t = 20_090;
    while t < 20_990 {
        t += 90;
        s.touch_dashboard_session(&b.id_sha256, t).await.unwrap();
    }
    assert!(s
        .dashboard_session(&b.id_sha256, 21_000, &RULES)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        s.dashboard_session(&b.id_sha256, 21_001, &RULES)
            .await
            .unwrap(),
        None,
        "past its lifetime"
    );

    // Logout.
    let c = session("c", "tok", 30_000);
    s.create_dashboard_session(&c, &RULES).await.unwrap();
    s.delete_dashboard_session(&c.id_sha256).await.unwrap();
    assert_eq!(
        s.dashboard_session(&c.id_sha256, 30_000, &RULES)
            .await
            .unwrap(),
        None
    );

    // Logging in prunes ended sessions, whoever's they are.
    let d = session("d", "other", 40_000);
    s.create_dashboard_session(&d, &RULES).await.unwrap();
    s.create_dashboard_session(&session("e", "tok", 50_000), &RULES)
        .await
        .unwrap();
    assert_eq!(
        s.dashboard_session(&d.id_sha256, 40_001, &RULES)
            .await
            .unwrap(),
        None,
        "pruned when a later login found it ended"
    );
}

async fn dashboard_sessions_are_capped_per_token(f: Fixture) {
    let s = &f.store;
    let other = session("o", "other", 1_000);
    s.create_dashboard_session(&other, &RULES).await.unwrap();
    for (i, id) in ["1", "2", "3"].iter().enumerate() {
        let at = 1_000 + i as u64;
        s.create_dashboard_session(&session(id, "tok", at), &RULES)
            .await
            .unwrap();
    }
    // The oldest login was used most recently: the least recently used
    // one goes when a fourth comes.
    s.touch_dashboard_session(&session("1", "", 0).id_sha256, 1_010)
        .await
        .unwrap();
    s.create_dashboard_session(&session("4", "tok", 1_020), &RULES)
        .await
        .unwrap();
    let live = |id: &'static str| async move {
        s.dashboard_session(&session(id, "", 0).id_sha256, 1_030, &RULES)
            .await
            .unwrap()
            .is_some()
    };
    assert!(live("1").await);
    assert!(!live("2").await, "least recently used");
    assert!(live("3").await);
    assert!(live("4").await);
    assert!(live("o").await, "another token's sessions stay");
}

fn event(device: &str, seq: u64) -> UpdateEvent {
    UpdateEvent {
        schema: SCHEMA_VERSION,
        device_id: DeviceId::new(device).unwrap(),
        seq,
        at: 1,
        kind: EventKind::Activated,
        desired_version: Some(seq),
        model: Some("m".into()),
        model_version: Some(1),
        reason: None,
        agent_version: None,
    }
}

async fn telemetry_and_events_read_back_in_arrival_order(f: Fixture) {
    let s = &f.store;
    s.record_streamed(&[telemetry("b", 1), telemetry("a", 1)], 100)
        .await
        .unwrap();
    s.record_streamed(&[telemetry("a", 2), result("a", 1, "m")], 101)
        .await
        .unwrap();
    let all = s
        .telemetry_arrived(&ArrivalKey::default(), 10)
        .await
        .unwrap();
    let keys: Vec<_> = all
        .iter()
        .map(|(k, _)| (k.received_at, k.device_id.as_str(), k.seq))
        .collect();
    assert_eq!(keys, [(100, "a", 1), (100, "b", 1), (101, "a", 2)]);
    let body: TelemetryMessage = serde_json::from_str(&all[2].1).unwrap();
    assert_eq!((body.device_id.as_str(), body.seq), ("a", 2));
    // Paging: strictly after a key, at most `limit`.
    let page = s.telemetry_arrived(&all[0].0, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].0, all[1].0);
    assert!(s.telemetry_arrived(&all[2].0, 10).await.unwrap().is_empty());
    assert_eq!(
        s.telemetry_arrived(&ArrivalKey::before(101), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    s.record_messages(&[], &[event("b", 7), event("a", 3)], 200)
        .await
        .unwrap();
    // A redelivered copy keeps its first arrival.
    s.record_messages(&[], &[event("a", 3), event("a", 4)], 201)
        .await
        .unwrap();
    let events = s
        .events_arrived(&ArrivalKey::before(150), 10)
        .await
        .unwrap();
    let keys: Vec<_> = events
        .iter()
        .map(|(k, e)| (k.received_at, e.device_id.as_str(), e.seq, e.kind.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            (200, "a", 3, "activated"),
            (200, "b", 7, "activated"),
            (201, "a", 4, "activated")
        ]
    );
    assert_eq!(events[0].0.device_id, "a");
    assert_eq!(
        s.events_arrived(&events[0].0, 1).await.unwrap()[0].0,
        events[1].0
    );
}

/// Statuses of one device reach different replicas: the last will of an
/// older connection, stored after the newer connection's "online", leaves
/// the device online; the will of the latest connection takes it offline.
async fn a_stale_will_stored_late_leaves_the_device_online(f: Fixture) {
    let s = &f.store;
    let mut first = status("d", 1, true);
    first.session = Some(100);
    let mut second = status("d", 2, true);
    second.session = Some(200);
    let mut old_will = StatusMessage::will(DeviceId::new("d").unwrap(), 100);
    old_will.seq = 0;
    s.record_messages(&[first, second], &[], 10).await.unwrap();
    s.record_messages(&[old_will], &[], 11).await.unwrap();
    assert!(
        s.get_device("d").await.unwrap().unwrap().online,
        "a stale will"
    );
    let new_will = StatusMessage::will(DeviceId::new("d").unwrap(), 200);
    s.record_messages(&[new_will], &[], 12).await.unwrap();
    assert!(!s.get_device("d").await.unwrap().unwrap().online);
    // An offline status naming no connection always counts.
    let mut back = status("d", 3, true);
    back.session = Some(300);
    s.record_messages(&[back], &[], 13).await.unwrap();
    s.record_messages(&[status("d", 4, false)], &[], 14)
        .await
        .unwrap();
    assert!(!s.get_device("d").await.unwrap().unwrap().online);
}

suite!(
    a_stale_will_stored_late_leaves_the_device_online,
    dashboard_sessions_expire_idle_and_absolutely_and_end,
    dashboard_sessions_are_capped_per_token,
    telemetry_and_events_read_back_in_arrival_order,
);
