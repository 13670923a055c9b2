//! The dashboard's view: per-device health and the fleet series from
//! telemetry, what needs attention, and replicas following what the
//! others stored.

use super::*;
use edgefleet_shared::{DeviceId, Health, ModelTelemetry, OutboxHealth, Temperature};

fn device(online: bool, desired: u64, reported: Option<u64>) -> DeviceRecord {
    DeviceRecord {
        id: "d1".into(),
        first_seen: 0,
        last_seen: 1_000,
        online,
        agent_version: "0.1.0".into(),
        reported_desired_version: reported,
        models: vec![],
        desired_version: desired,
        hardware: None,
        tags: Default::default(),
        enrolled_at: None,
        revoked_at: None,
        public_key: None,
        agent: None,
    }
}

fn event(kind: &str, desired: u64, seq: u64) -> LastEvent {
    LastEvent {
        seq,
        at: 900,
        kind: kind.into(),
        desired_version: Some(desired),
        reason: None,
    }
}

fn sample(seq: u64, at: u64, depth: u64, inferences: u64, errors: u64) -> Streamed {
    Streamed::Telemetry(TelemetryMessage {
        schema: 1,
        device_id: DeviceId::new("d1").unwrap(),
        seq,
        at,
        interval_secs: 10.0,
        health: Health {
            cpu_percent: Some(12.5),
            memory_total_bytes: 1000,
            memory_available_bytes: 250,
            disk_total_bytes: Some(1000),
            disk_available_bytes: Some(20),
            temperatures: vec![
                Temperature {
                    label: "cpu".into(),
                    celsius: 85.0,
                },
                Temperature {
                    label: "gpu".into(),
                    celsius: 60.0,
                },
            ],
            ..Default::default()
        },
        models: vec![ModelTelemetry {
            name: "digits".into(),
            version: 2,
            runtime: "tract-onnx".into(),
            inferences,
            errors,
            total_inferences: 0,
            total_errors: 0,
            p50_us: Some(1000.0),
            p95_us: Some(4000.0),
            p99_us: None,
            runtime_trials: vec![],
            variant: None,
            shadow: None,
            drift: None,
        }],
        outbox: OutboxHealth {
            depth,
            ..Default::default()
        },
        link: Default::default(),
    })
}

#[test]
fn compliance_follows_reports_and_the_last_event() {
    assert_eq!(
        compliance(&device(false, 3, Some(3)), None),
        Compliance::Offline
    );
    assert_eq!(
        compliance(&device(true, 3, Some(3)), None),
        Compliance::OnTarget
    );
    assert_eq!(
        compliance(&device(true, 3, Some(2)), None),
        Compliance::Updating
    );
    assert_eq!(
        compliance(&device(true, 0, None), None),
        Compliance::OnTarget
    );
    let failed = event("activation_failed", 3, 7);
    assert_eq!(
        compliance(&device(true, 3, Some(3)), Some(&failed)),
        Compliance::Failed
    );
    let rolled = event("rolled_back", 3, 8);
    assert_eq!(
        compliance(&device(true, 3, Some(3)), Some(&rolled)),
        Compliance::RolledBack
    );
    // A failure of an older desired state no longer counts.
    let old = event("download_failed", 2, 5);
    assert_eq!(
        compliance(&device(true, 3, Some(2)), Some(&old)),
        Compliance::Updating
    );
}

#[test]
fn health_attention_and_duplicates() {
    let insights = Insights::default();
    insights.observe(&[sample(1, 1_000, 50, 100, 0)], 1_010);
    insights.observe(&[sample(2, 1_010, 150, 100, 0)], 1_020);
    let d = insights.device("d1").unwrap();
    assert_eq!(d.temperature_c, Some(85.0));
    assert_eq!(d.memory_used_pct, Some(75.0));
    assert_eq!(d.disk_free_pct, Some(2.0));
    assert!(!d.backlog_growing(), "two samples are not a trend");
    insights.observe(&[sample(3, 1_020, 300, 90, 10)], 1_030);
    // A re-sent sample changes nothing.
    insights.observe(&[sample(3, 1_020, 0, 5, 5)], 1_031);
    let d = insights.device("d1").unwrap();
    assert!(d.backlog_growing());
    let reasons = attention(&device(true, 0, None), Some(&d), 1_030);
    assert_eq!(
        reasons,
        [
            "hot: 85 °C",
            "disk nearly full: 2.0% free",
            "outbox backlog growing: 300 waiting",
            "digits@2: 10% errors"
        ]
    );
    let mut gone = device(false, 0, None);
    gone.last_seen = 0;
    assert_eq!(attention(&gone, None, 7_200), ["not seen for 2 h"]);
}

#[test]
fn fleet_series_sums_per_minute_weighted() {
    let insights = Insights::default();
    let now = 10 * 60;
    insights.observe(&[sample(1, 2 * 60 + 5, 0, 300, 0)], now);
    let mut other = sample(1, 2 * 60 + 30, 0, 100, 10);
    if let Streamed::Telemetry(t) = &mut other {
        t.device_id = DeviceId::new("d2").unwrap();
        t.models[0].p95_us = Some(8000.0);
    }
    insights.observe(&[other], now);
    insights.observe(&[sample(2, 5 * 60, 0, 10, 0)], now);
    let series = insights.series(now, 600);
    assert_eq!(series.len(), 2);
    assert_eq!(series[0].t, 120);
    assert_eq!(series[0].inferences, 400);
    assert_eq!(series[0].errors, 10);
    // (4 ms × 300 + 8 ms × 100) / 400
    assert_eq!(series[0].p95_ms, Some(5.0));
    assert_eq!(series[0].p95_max_ms, Some(8.0));
    assert_eq!(insights.series(now, 300).len(), 1);
    // Minutes older than a day are dropped.
    insights.observe(&[], now + SERIES_SECS);
    assert!(insights.series(now + SERIES_SECS, SERIES_SECS).len() <= 1);
}

/// Fleet-wide inferences in the series.
fn inferences(insights: &Insights, now: u64) -> u64 {
    insights
        .series(now, SERIES_SECS)
        .iter()
        .map(|m| m.inferences)
        .sum()
}

fn on(device: &str, mut sample: Streamed) -> Streamed {
    if let Streamed::Telemetry(t) = &mut sample {
        t.device_id = DeviceId::new(device).unwrap();
    }
    sample
}

/// Two replicas' views over one PostgreSQL database (each with its
/// own connections): what one ingests, the other takes in by
/// refreshing, once.
#[tokio::test]
async fn replicas_take_in_what_the_others_stored_once() {
    let url = crate::store::tests::fresh_postgres_schema().await;
    let (a_store, b_store) = (
        Store::open(&url).await.unwrap(),
        Store::open(&url).await.unwrap(),
    );
    let (a, b) = (Insights::default(), Insights::default());
    let now = edgefleet_shared::unix_now();
    let mut b_refresh = Refresh::since(now);

    // Replica A ingests a sample and an update event.
    let first = sample(1, now - 30, 10, 100, 0);
    a_store
        .record_streamed(std::slice::from_ref(&first), now)
        .await
        .unwrap();
    a.observe(&[first], now);
    let activated = UpdateEvent {
        schema: 1,
        device_id: DeviceId::new("d1").unwrap(),
        seq: 4,
        at: now - 20,
        kind: edgefleet_shared::EventKind::Activated,
        desired_version: Some(2),
        model: Some("digits".into()),
        model_version: Some(2),
        reason: None,
        agent_version: None,
    };
    a_store
        .record_messages(&[], &[activated], now)
        .await
        .unwrap();
    assert!(b.device("d1").is_none());

    assert_eq!(
        b.refresh(&b_store, &mut b_refresh, now + 2).await.unwrap(),
        2
    );
    let d = b.device("d1").expect("taken in from the store");
    assert_eq!((d.seq, d.temperature_c), (1, Some(85.0)));
    assert_eq!(d.last_event.unwrap().kind, "activated");
    assert_eq!(inferences(&b, now + 2), 100);

    // The next refresh reads the overlap again without counting it twice.
    assert!(b.refresh(&b_store, &mut b_refresh, now + 4).await.unwrap() >= 1);
    assert_eq!(inferences(&b, now + 4), 100);

    // B ingests its own share; A stores the next sample; a row that
    // committed late (its arrival time before B's last refresh) still
    // comes. B's own sample read back is not counted again.
    let own = sample(2, now - 10, 10, 7, 0);
    b_store
        .record_streamed(std::slice::from_ref(&own), now + 5)
        .await
        .unwrap();
    b.observe(&[own], now + 5);
    a_store
        .record_streamed(&[sample(3, now - 5, 10, 50, 0)], now + 6)
        .await
        .unwrap();
    b.refresh(&b_store, &mut b_refresh, now + 8).await.unwrap();
    a_store
        .record_streamed(&[on("d2", sample(1, now - 5, 10, 1_000, 0))], now + 5)
        .await
        .unwrap();
    b.refresh(&b_store, &mut b_refresh, now + 10).await.unwrap();
    assert_eq!(b.device("d1").unwrap().seq, 3);
    assert_eq!(
        b.device("d2").unwrap().seq,
        1,
        "committed late, still taken in"
    );
    assert_eq!(inferences(&b, now + 10), 100 + 7 + 50 + 1_000);

    // Quiet: once the overlap has been read again, refreshes read
    // nothing.
    b.refresh(&b_store, &mut b_refresh, now + 30).await.unwrap();
    assert_eq!(
        b.refresh(&b_store, &mut b_refresh, now + 32).await.unwrap(),
        0
    );
    assert_eq!(inferences(&b, now + 32), 100 + 7 + 50 + 1_000);

    // A sees B's share the same way.
    let mut a_refresh = Refresh::since(now);
    a.refresh(&a_store, &mut a_refresh, now + 30).await.unwrap();
    assert_eq!(a.device("d1").unwrap().seq, 3);
    assert_eq!(inferences(&a, now + 30), 100 + 7 + 50 + 1_000);
}

#[test]
fn the_newest_event_wins() {
    let insights = Insights::default();
    insights.set_last_event("d1", event("activated", 2, 5));
    insights.set_last_event("d1", event("accepted", 2, 4));
    assert_eq!(
        insights.device("d1").unwrap().last_event.unwrap().kind,
        "activated"
    );
}
