//! Unit tests of the rollout planner: waves, gates, timeouts, operator actions.

use super::*;

fn devices(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("dev-{i:05}")).collect()
}

fn updated(commands: &[Command]) -> Vec<String> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Update(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

fn four_waves() -> Vec<WaveSize> {
    vec![
        WaveSize::Count(1),
        WaveSize::Percent(5.0),
        WaveSize::Percent(25.0),
        WaveSize::Percent(100.0),
    ]
}

#[test]
fn order_is_stable_per_rollout_and_differs_between_rollouts() {
    let a = Rollout::new("r1", devices(50), four_waves(), Gates::default());
    let again = Rollout::new(
        "r1",
        devices(50).into_iter().rev().collect(),
        four_waves(),
        Gates::default(),
    );
    let b = Rollout::new("r2", devices(50), four_waves(), Gates::default());
    assert_eq!(a.order, again.order);
    assert_ne!(a.order, b.order);
}

#[test]
fn waves_are_cumulative_and_cover_every_device() {
    assert_eq!(wave_ends(&four_waves(), 100), vec![1, 5, 25, 100]);
    assert_eq!(wave_ends(&four_waves(), 3), vec![1, 3]);
    assert_eq!(wave_ends(&[WaveSize::Count(10)], 4), vec![4]);
    assert_eq!(wave_ends(&[WaveSize::Percent(50.0)], 5), vec![3, 5]);
    assert_eq!(wave_ends(&[], 7), vec![7]);
    let ramp = exponential_waves(2, 3.0);
    assert_eq!(wave_ends(&ramp, 100), vec![2, 6, 18, 54, 100]);
    let r = Rollout::new("r", devices(40), four_waves(), Gates::default());
    let plan = r.plan();
    assert_eq!(
        plan.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 1, 8, 30]
    );
    assert_eq!(plan.concat().len(), 40);
    let sizes: Vec<usize> = r.wave_summary().iter().map(|w| w["size"]).collect();
    assert_eq!(sizes, vec![1, 1, 8, 30]);
    assert_eq!(r.wave_summary()[3]["waiting"], 30);
    assert_eq!(r.device_wave(&plan[2][0]), Some(2));
}

#[test]
fn healthy_waves_advance_to_completion() {
    let mut r = Rollout::new("r", devices(20), four_waves(), Gates::default());
    let mut asked = updated(&r.start(0).unwrap());
    assert_eq!(asked.len(), 1, "the canary first");
    let mut t = 1;
    while let Some(d) = asked.pop() {
        asked.extend(updated(&r.report(&d, Report::Healthy, t)));
        t += 1;
    }
    assert_eq!(r.phase, Phase::Completed);
    assert_eq!(r.summary()["confirmed"], 20);
    assert!(r.start(t).is_err());
}

#[test]
fn the_failure_threshold_pauses_or_aborts_inside_its_wave() {
    for action in [FailureAction::Pause, FailureAction::Abort] {
        let gates = Gates {
            failure_pct: 20.0,
            failure_action: action,
            ..Gates::default()
        };
        let mut r = Rollout::new("r", devices(100), four_waves(), gates);
        let canary = updated(&r.start(0).unwrap());
        let wave1 = updated(&r.report(&canary[0], Report::Healthy, 1));
        assert_eq!(wave1.len(), 4);
        let commands = r.report(&wave1[0], Report::Unhealthy("test vector failed".into()), 2);
        match action {
            FailureAction::Pause => {
                assert!(
                    matches!(&r.phase, Phase::Paused { wave: 1, reason } if reason.contains("1 of 2"))
                );
                assert!(commands.is_empty());
                assert!(r.approve(3).is_err());
                // Later reports do not move a paused rollout on.
                for d in &wave1[1..] {
                    assert!(updated(&r.report(d, Report::Healthy, 3)).is_empty());
                }
            }
            FailureAction::Abort => {
                assert!(matches!(r.phase, Phase::Aborted { .. }));
                let reverted: Vec<_> = commands
                    .iter()
                    .filter(|c| matches!(c, Command::Revert(_)))
                    .collect();
                assert_eq!(reverted.len(), 5, "canary and all of wave 1 go back");
            }
        }
        // Nobody beyond wave 1 was ever asked.
        let plan = r.plan();
        for d in plan[2..].concat() {
            assert!(matches!(r.devices[&d], DeviceState::Waiting), "{d}");
        }
    }
}

#[test]
fn manual_approval_pause_resume_and_abort() {
    let gates = Gates {
        manual_approval: true,
        ..Gates::default()
    };
    let mut r = Rollout::new("r", devices(10), four_waves(), gates);
    let canary = updated(&r.start(0).unwrap());
    assert!(updated(&r.report(&canary[0], Report::Healthy, 1)).is_empty());
    assert_eq!(r.phase, Phase::AwaitingApproval { next: 1 });
    let next = updated(&r.approve(2).unwrap());
    assert_eq!(wave_ends(&four_waves(), 10), vec![1, 3, 10]);
    assert_eq!(next, r.plan()[1], "wave 1: the next two in canary order");
    r.pause("operator").unwrap();
    assert!(r.pause("again").is_err());
    assert!(
        updated(&r.tick(3)).is_empty(),
        "paused: nothing is handed out"
    );
    r.resume(4).unwrap();
    let reverts = r.abort("operator changed their mind").unwrap();
    // Every device asked so far goes back, in canary order.
    let expected: Vec<Command> = [canary, next]
        .concat()
        .into_iter()
        .map(Command::Revert)
        .collect();
    assert_eq!(reverts, expected);
    assert!(r.abort("twice").is_err());
}

#[test]
fn soak_time_holds_the_wave_boundary() {
    let gates = Gates {
        soak_secs: 300,
        ..Gates::default()
    };
    let mut r = Rollout::new("r", devices(10), four_waves(), gates);
    let canary = updated(&r.start(0).unwrap());
    assert!(updated(&r.report(&canary[0], Report::Healthy, 10)).is_empty());
    assert!(updated(&r.tick(299)).is_empty());
    assert_eq!(updated(&r.tick(300)), r.plan()[1], "wave 1 after the soak");
}

#[test]
fn max_in_flight_timeouts_retries_and_backoff() {
    let gates = Gates {
        max_in_flight: 2,
        device_timeout_secs: 10,
        retries: 1,
        ..Gates::default()
    };
    let mut r = Rollout::new("r", devices(6), vec![WaveSize::Percent(100.0)], gates);
    let first = updated(&r.start(0).unwrap());
    assert_eq!(first.len(), 2, "at most 2 in flight");
    // Both time out: backoff, then asked again (attempt 2), then failed.
    assert!(updated(&r.tick(10)).len() <= 2);
    assert!(matches!(
        r.devices[&first[0]],
        DeviceState::Backoff { attempt: 1, .. } | DeviceState::Updating { .. }
    ));
    let mut t = 10;
    let mut failed = false;
    for _ in 0..50 {
        t += 10;
        r.tick(t);
        if matches!(r.devices[&first[0]], DeviceState::Failed { .. }) {
            failed = true;
            break;
        }
    }
    assert!(failed, "{:?}", r.devices[&first[0]]);
    let in_flight = r
        .devices
        .values()
        .filter(|s| matches!(s, DeviceState::Updating { .. }))
        .count();
    assert!(in_flight <= 2);
}

#[test]
fn offline_devices_do_not_block_a_gate_forever_and_rejoin() {
    let gates = Gates {
        offline_grace_secs: 100,
        ..Gates::default()
    };
    let mut r = Rollout::new(
        "r",
        devices(4),
        vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
        gates,
    );
    let first = updated(&r.start(0).unwrap());
    assert_eq!(first.len(), 2);
    r.report(&first[1], Report::Offline, 1);
    assert!(
        updated(&r.report(&first[0], Report::Healthy, 2)).is_empty(),
        "offline grace not over"
    );
    let next = updated(&r.tick(101));
    assert_eq!(next.len(), 2, "the gate opened after the grace");
    // It comes back: asked again under the same gates.
    let again = updated(&r.report(&first[1], Report::Online, 102));
    assert_eq!(again, vec![first[1].clone()]);
}

/// Random device outcomes: whatever happens, a rollout whose failures
/// reach the threshold never starts a wave after the one in which that
/// happened.
#[test]
fn property_the_failure_threshold_stops_before_the_next_wave() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..300 {
        let n = 5 + (next() % 200) as usize;
        let fail_pct = (next() % 60) as f64;
        let threshold = 5.0 + (next() % 40) as f64;
        let gates = Gates {
            failure_pct: threshold,
            success_pct: 0.0,
            max_in_flight: 1 + (next() % 20) as u32,
            ..Gates::default()
        };
        let mut r = Rollout::new(&format!("p{case}"), devices(n), four_waves(), gates);
        let mut pending = updated(&r.start(0).unwrap());
        let mut t = 0;
        let mut crossed_in: Option<usize> = None;
        while let Some(d) = pending.pop() {
            t += 1;
            let wave = r.device_wave(&d).unwrap();
            let report = if ((next() % 100) as f64) < fail_pct {
                Report::Unhealthy("bad".into())
            } else {
                Report::Healthy
            };
            pending.extend(updated(&r.report(&d, report, t)));
            let c = r.counts(None);
            if crossed_in.is_none()
                && c.settled > 0
                && c.failed as f64 * 100.0 / c.settled as f64 >= threshold
            {
                crossed_in = Some(wave);
            }
            if let Some(w) = crossed_in {
                assert!(
                    matches!(r.phase, Phase::Paused { .. }),
                    "case {case}: {:?}",
                    r.phase
                );
                let plan = r.plan();
                for later in plan.iter().skip(w + 1).flatten() {
                    assert!(
                        matches!(r.devices[later], DeviceState::Waiting),
                        "case {case}: {later} in a later wave was asked"
                    );
                }
            }
        }
    }
}

#[test]
fn state_survives_serialisation() {
    let mut r = Rollout::new("r", devices(8), four_waves(), Gates::default());
    let canary = updated(&r.start(0).unwrap());
    r.report(&canary[0], Report::Healthy, 1);
    let json = serde_json::to_string(&r).unwrap();
    let back: Rollout = serde_json::from_str(&json).unwrap();
    assert_eq!(back, r);
}

#[test]
fn telemetry_limits_judge_error_rate_and_latency() {
    let gates = Gates {
        max_error_pct: Some(5.0),
        max_p95_ms: Some(20.0),
        min_inferences: 20,
        ..Gates::default()
    };
    assert!(gates.watches_telemetry());
    assert!(!Gates::default().watches_telemetry());
    assert_eq!(gates.judge(95, 5, Some(1_000.0)), None, "5 % is the limit");
    let why = gates.judge(90, 10, Some(1_000.0)).unwrap();
    assert!(
        why.contains("10.0 % > 5 %") && why.contains("10 of 100"),
        "{why}"
    );
    assert_eq!(
        gates.judge(5, 10, None),
        None,
        "too few inferences to judge"
    );
    let why = gates.judge(100, 0, Some(25_000.0)).unwrap();
    assert!(why.contains("25.00 ms > 20 ms"), "{why}");
    assert_eq!(gates.judge(100, 0, None), None);
    assert_eq!(Gates::default().judge(0, 1_000, Some(1e9)), None);
}

#[test]
fn degraded_telemetry_fails_even_a_confirmed_device() {
    let gates = Gates {
        failure_pct: 50.0,
        ..Gates::default()
    };
    let mut r = Rollout::new("r", devices(10), four_waves(), gates);
    let canary = updated(&r.start(0).unwrap());
    let wave1 = updated(&r.report(&canary[0], Report::Healthy, 1));
    assert_eq!(wave1.len(), 2);
    // The canary's error rate turns bad after it confirmed: 1 of 1
    // settled devices failed, over the threshold.
    r.report(&canary[0], Report::Degraded("error rate".into()), 2);
    assert!(matches!(r.devices[&canary[0]], DeviceState::Failed { .. }));
    assert!(matches!(&r.phase, Phase::Paused { reason, .. } if reason.contains("1 of 1")));
    // Degraded means nothing for a device not on the new version.
    let later = &r.plan()[2][0];
    r.report(later, Report::Degraded("x".into()), 3);
    assert_eq!(r.devices[later], DeviceState::Waiting);
}

#[test]
fn devices_joining_go_into_the_last_wave_under_the_same_gates() {
    let mut r = Rollout::new("r", devices(4), vec![WaveSize::Count(1)], Gates::default());
    assert_eq!(r.ends, vec![1, 4]);
    let canary = updated(&r.start(0).unwrap());
    // Joins while wave 0 runs: waits for the last wave.
    assert_eq!(r.join("late-1", true, 1), Some(Vec::new()));
    assert_eq!(r.join("late-1", true, 1), None, "already in");
    // Enrolled but never connected: offline until it reports.
    assert_eq!(r.join("late-2", false, 1), Some(Vec::new()));
    assert_eq!(r.plan()[1].len(), 5);
    let wave1 = updated(&r.report(&canary[0], Report::Healthy, 2));
    assert_eq!(wave1.len(), 4, "3 original devices and late-1: {wave1:?}");
    assert!(wave1.contains(&"late-1".to_string()));
    let back = updated(&r.report("late-2", Report::Online, 3));
    assert_eq!(back, vec!["late-2".to_string()]);
    // In the last wave, a joining device is asked at once.
    assert_eq!(
        r.join("late-3", true, 4).map(|c| updated(&c)),
        Some(vec!["late-3".to_string()])
    );
    let mut t = 5;
    for d in wave1
        .iter()
        .chain(&back)
        .chain(["late-3".to_string()].iter())
    {
        r.report(d, Report::Healthy, t);
        t += 1;
    }
    assert_eq!(r.phase, Phase::Completed);
    assert_eq!(
        r.join("late-4", true, t),
        None,
        "an ended rollout takes nobody"
    );
}

#[test]
fn overrides_exclude_retry_and_force_one_device() {
    let gates = Gates {
        failure_pct: 60.0,
        ..Gates::default()
    };
    let mut r = Rollout::new("r", devices(10), four_waves(), gates);
    let canary = updated(&r.start(0).unwrap())[0].clone();
    // A device far ahead of its wave can be forced now.
    let last = r.plan()[2][3].clone();
    assert_eq!(
        r.override_device(&last, Override::Force, 1).unwrap(),
        vec![Command::Update(last.clone())]
    );
    assert!(
        r.override_device(&last, Override::Force, 1).is_err(),
        "already updating"
    );
    // Excluding a device that moved sends it back; it no longer holds
    // the gate and is not a failure.
    assert_eq!(
        r.override_device(&last, Override::Exclude, 2).unwrap(),
        vec![Command::Revert(last.clone())]
    );
    let c = r.counts(None);
    assert_eq!((c.failed, c.excluded), (0, 1));
    // The canary fails; retrying puts it back in line and it is asked again.
    r.report(&canary, Report::Unhealthy("test vector".into()), 3);
    assert!(matches!(r.phase, Phase::Paused { .. }), "{:?}", r.phase);
    assert!(r
        .override_device(&canary, Override::Retry, 4)
        .unwrap()
        .is_empty());
    assert_eq!(r.devices[&canary], DeviceState::Waiting);
    assert_eq!(updated(&r.resume(5).unwrap()), vec![canary.clone()]);
    assert!(
        r.override_device(&canary, Override::Retry, 6).is_err(),
        "updating: nothing to retry"
    );
    assert!(r.override_device("nobody", Override::Exclude, 6).is_err());
    // The excluded device is skipped when its wave comes.
    let mut asked = updated(&r.report(&canary, Report::Healthy, 7));
    let mut t = 8;
    let mut all = Vec::new();
    while let Some(d) = asked.pop() {
        all.push(d.clone());
        asked.extend(updated(&r.report(&d, Report::Healthy, t)));
        t += 1;
    }
    assert_eq!(r.phase, Phase::Completed);
    assert!(!all.contains(&last));
    assert_eq!(r.summary()["excluded"], 1);
    assert!(
        r.override_device(&canary, Override::Exclude, t).is_err(),
        "ended"
    );
}

#[test]
fn outcomes_count_after_a_dropped_connection_and_lost_confirmations() {
    let gates = Gates {
        device_timeout_secs: 10,
        ..Gates::default()
    };
    let mut r = Rollout::new("r", devices(3), vec![WaveSize::Percent(100.0)], gates);
    let asked = updated(&r.start(0).unwrap());
    // Dropped while updating, its confirmation arrives after it is back.
    r.report(&asked[0], Report::Offline, 1);
    r.report(&asked[0], Report::Online, 2);
    assert_eq!(
        r.devices[&asked[0]],
        DeviceState::Updating {
            since: 2,
            attempt: 1
        }
    );
    r.report(&asked[1], Report::Offline, 2);
    r.report(&asked[1], Report::Healthy, 3);
    assert!(matches!(
        r.devices[&asked[1]],
        DeviceState::Confirmed { .. }
    ));
    // A status alone settles nothing on the first attempt ...
    r.report(&asked[0], Report::Running, 3);
    assert!(matches!(r.devices[&asked[0]], DeviceState::Updating { .. }));
    // ... but after a timeout it shows the confirmation was lost.
    r.tick(12);
    assert!(matches!(r.devices[&asked[0]], DeviceState::Backoff { .. }));
    r.report(&asked[0], Report::Running, 13);
    assert!(matches!(
        r.devices[&asked[0]],
        DeviceState::Confirmed { .. }
    ));
    r.report(&asked[2], Report::Healthy, 14);
    assert_eq!(r.phase, Phase::Completed);
}

#[test]
fn a_wave_of_only_offline_devices_passes_after_the_grace() {
    let gates = Gates {
        offline_grace_secs: 10,
        ..Gates::default()
    };
    let mut r = Rollout::new("r", devices(3), vec![WaveSize::Count(1)], gates);
    let canary = updated(&r.start(0).unwrap())[0].clone();
    r.report(&canary, Report::Offline, 1);
    assert!(updated(&r.tick(5)).is_empty());
    assert_eq!(
        updated(&r.tick(11)).len(),
        2,
        "the next wave after the grace"
    );
}

#[test]
fn the_index_is_rebuilt_after_loading() {
    let mut r = Rollout::new("r", devices(30), four_waves(), Gates::default());
    let canary = updated(&r.start(0).unwrap());
    let wave1 = updated(&r.report(&canary[0], Report::Healthy, 1));
    let json = serde_json::to_string(&r).unwrap();
    let mut back: Rollout = serde_json::from_str(&json).unwrap();
    assert_eq!(back.summary(), r.summary());
    for d in &wave1 {
        assert_eq!(
            back.report(d, Report::Healthy, 2),
            r.report(d, Report::Healthy, 2)
        );
    }
    assert_eq!(back, r);
    assert_eq!(back.counts(None), r.counts(None));
}

/// Random reports, overrides, joins, ticks and operator actions: the
/// index (per-wave counts, per-state sets) always agrees with a count
/// made from scratch, and a rollout rebuilt from its stored state
/// answers the same.
#[test]
fn property_the_index_always_matches_the_states() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for case in 0..100 {
        let n = 1 + (next() % 60) as usize;
        let gates = Gates {
            failure_pct: 30.0 + (next() % 70) as f64,
            success_pct: 0.0,
            max_in_flight: 1 + (next() % 10) as u32,
            device_timeout_secs: 5,
            retries: 1,
            offline_grace_secs: 20,
            ..Gates::default()
        };
        let mut r = Rollout::new(&format!("i{case}"), devices(n), four_waves(), gates);
        r.start(0).unwrap();
        let mut joined = 0;
        for t in 1..200u64 {
            let d = if next() % 10 == 0 && joined < 5 {
                joined += 1;
                let d = format!("late-{joined}");
                r.join(&d, next() % 2 == 0, t);
                d
            } else {
                r.order[(next() % r.order.len() as u64) as usize].clone()
            };
            match next() % 12 {
                0..=3 => {
                    r.report(&d, Report::Healthy, t);
                }
                4 => {
                    r.report(&d, Report::Unhealthy("x".into()), t);
                }
                5 => {
                    r.report(&d, Report::Degraded("y".into()), t);
                }
                6 => {
                    r.report(&d, Report::Offline, t);
                }
                7 => {
                    r.report(&d, Report::Online, t);
                }
                8 => {
                    let action = [Override::Exclude, Override::Retry, Override::Force]
                        [(next() % 3) as usize];
                    let _ = r.override_device(&d, action, t);
                }
                9 => {
                    let _ = r.resume(t).or_else(|_| r.approve(t));
                }
                10 => {
                    r.report(&d, Report::Running, t);
                }
                _ => {
                    r.tick(t);
                }
            }
            let mut scratch: BTreeMap<&'static str, usize> = BTreeMap::new();
            for state in r.devices.values() {
                *scratch.entry(KIND_NAMES[state.kind()]).or_default() += 1;
            }
            assert_eq!(r.summary(), scratch, "case {case} at {t}");
            let ends = r.ends.clone();
            assert_eq!(*ends.last().unwrap(), r.order.len());
            for (w, wave) in r.wave_summary().iter().enumerate() {
                let start = if w == 0 { 0 } else { ends[w - 1] };
                assert_eq!(wave["size"], ends[w] - start, "case {case}");
            }
            let in_flight = r.index.members[UPDATING].len();
            let counted = r
                .devices
                .values()
                .filter(|s| matches!(s, DeviceState::Updating { .. }))
                .count();
            assert_eq!(in_flight, counted);
        }
        let mut back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.counts(None), r.counts(None), "case {case}");
        assert_eq!(back.wave_summary(), r.wave_summary(), "case {case}");
    }
}

#[test]
fn the_drift_gate_fails_an_interval_over_its_limit() {
    let gates = Gates {
        max_drift_psi: Some(0.5),
        ..Gates::default()
    };
    assert!(gates.watches_telemetry());
    assert_eq!(gates.judge_drift(Some(0.2)), None);
    let why = gates.judge_drift(Some(5.6)).unwrap();
    assert!(
        why.contains("drift score") && why.contains("> 0.5"),
        "{why}"
    );
    // No reference, no score, nothing judged; no limit, nothing judged.
    assert_eq!(gates.judge_drift(None), None);
    assert_eq!(Gates::default().judge_drift(Some(5.6)), None);
}
