//! The store suite's agent release tests, on both backends like the
//! rest: builds (immutable per version and target), assignments to devices
//! and the fleet, what a desired state is signed from, and the agent and
//! events devices report.

use super::*;

const ARM: &str = "aarch64-unknown-linux-musl";
const X86: &str = "x86_64-unknown-linux-musl";

/// A build of an agent release whose file hash is `seed` repeated.
fn agent_build(version: &str, target: &str, seed: u8) -> AgentBuildRecord {
    AgentBuildRecord {
        version: version.into(),
        target: target.into(),
        sha256: format!("{seed:02x}").repeat(32),
        size: 1000 + u64::from(seed),
        created_at: 5,
        pushed_by: Some("ci".into()),
        notes: (seed == 1).then(|| "first release".into()),
    }
}

async fn agent_builds_are_immutable_and_deployed_to_devices_or_the_fleet(f: Fixture) {
    let s = &f.store;
    let arm = agent_build("1.0.0", ARM, 1);
    let x86 = agent_build("1.0.0", X86, 2);
    assert_eq!(s.add_agent_build(&arm).await.unwrap(), arm);
    // The identical file again is a no-op that answers with what is stored.
    let again = AgentBuildRecord {
        created_at: 99,
        notes: None,
        ..arm.clone()
    };
    assert_eq!(s.add_agent_build(&again).await.unwrap(), arm);
    let changed = AgentBuildRecord {
        sha256: "ff".repeat(32),
        ..arm.clone()
    };
    let err = s.add_agent_build(&changed).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(m) if m.contains("1.0.0 already has a different build for aarch64-unknown-linux-musl")),
        "{err}"
    );
    s.add_agent_build(&x86).await.unwrap();
    let newer = agent_build("1.1.0", ARM, 3);
    s.add_agent_build(&newer).await.unwrap();
    assert_eq!(
        s.agent_builds(None).await.unwrap(),
        vec![arm.clone(), x86.clone(), newer.clone()]
    );
    assert_eq!(
        s.agent_builds(Some("1.0.0")).await.unwrap(),
        vec![arm.clone(), x86.clone()]
    );
    assert!(s.agent_builds(Some("9.9.9")).await.unwrap().is_empty());

    let err = s
        .deploy_agent("2.0.0", false, &Target::All, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound(m) if m.contains("agent release 2.0.0 does not exist; push it first")),
        "{err}"
    );
    assert_eq!(s.agent_for_device("pi-1").await.unwrap(), None);
    s.record_status(&status("pi-1", 1, true), 1).await.unwrap();
    s.record_status(&status("pi-2", 1, true), 1).await.unwrap();
    let all = s
        .deploy_agent("1.0.0", false, &Target::All, 2)
        .await
        .unwrap();
    assert_eq!(all, vec!["pi-1".to_string(), "pi-2".into()]);
    let own = s
        .deploy_agent(
            "1.1.0",
            false,
            &Target::Devices(vec!["pi-2".into(), "pi-3".into()]),
            3,
        )
        .await
        .unwrap();
    assert_eq!(own, vec!["pi-2".to_string(), "pi-3".into()]);
    assert!(s.get_device("pi-3").await.unwrap().is_some(), "created");
    assert_eq!(
        s.agent_for_device("pi-1").await.unwrap(),
        Some(AssignedAgent {
            version: "1.0.0".into(),
            allow_downgrade: false,
            builds: vec![arm.clone(), x86.clone()],
        })
    );
    assert_eq!(
        s.agent_for_device("pi-2").await.unwrap(),
        Some(AssignedAgent {
            version: "1.1.0".into(),
            allow_downgrade: false,
            builds: vec![newer.clone()],
        })
    );
    // An operator's (or an abort's) step back, allowed explicitly.
    s.deploy_agent("1.0.0", true, &Target::Devices(vec!["pi-2".into()]), 4)
        .await
        .unwrap();
    let pi2 = s.agent_for_device("pi-2").await.unwrap().unwrap();
    assert_eq!((pi2.version.as_str(), pi2.allow_downgrade), ("1.0.0", true));
    assert_eq!(
        s.assigned_agent_releases(&["pi-3".into(), "pi-9".into()])
            .await
            .unwrap(),
        [
            ("pi-3".to_string(), Some("1.1.0".to_string())),
            ("pi-9".into(), Some("1.0.0".into()))
        ]
        .into()
    );

    // Deletion: only releases nothing points at; files still used stay.
    for (version, deployed) in [("1.0.0", true), ("1.1.0", true), ("9.9.9", false)] {
        let err = s.delete_agent_release(version).await.unwrap_err();
        if deployed {
            assert!(
                matches!(&err, StoreError::Conflict(m) if m.contains("is deployed")),
                "{err}"
            );
        } else {
            assert!(matches!(&err, StoreError::NotFound(_)), "{err}");
        }
    }
    s.deploy_agent("1.0.0", false, &Target::Devices(vec!["pi-3".into()]), 5)
        .await
        .unwrap();
    assert_eq!(
        s.delete_agent_release("1.1.0").await.unwrap(),
        vec![(newer, false)]
    );
    s.add_model(&model("m", 1)).await.unwrap();
    let shared_file = AgentBuildRecord {
        sha256: model("m", 1).sha256,
        ..agent_build("1.2.0", ARM, 4)
    };
    s.add_agent_build(&shared_file).await.unwrap();
    assert_eq!(
        s.delete_agent_release("1.2.0").await.unwrap(),
        vec![(shared_file, true)],
        "a model has the same file"
    );
    assert_eq!(s.agent_builds(None).await.unwrap(), vec![arm, x86]);
}

async fn desired_state_carries_the_agent_release(f: Fixture) {
    let s = &f.store;
    s.add_agent_build(&agent_build("1.0.0", ARM, 1))
        .await
        .unwrap();
    s.add_agent_build(&agent_build("1.0.0", X86, 2))
        .await
        .unwrap();
    s.deploy_agent("1.0.0", false, &Target::Devices(vec!["a".into()]), 1)
        .await
        .unwrap();
    // Only an agent release assigned: still a document.
    let (v1, bytes) = s
        .sign_desired("a", 2, sign_listing())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v1, 1);
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        format!("v1:;agent 1.0.0 [{ARM},{X86}]")
    );
    assert_eq!(s.sign_desired("b", 2, sign_listing()).await.unwrap(), None);
    s.add_model(&model("m", 1)).await.unwrap();
    s.deploy("m", 1, &Target::All, 3).await.unwrap();
    s.deploy_agent("1.0.0", true, &Target::Devices(vec!["a".into()]), 3)
        .await
        .unwrap();
    let (_, bytes) = s
        .sign_desired("a", 4, sign_listing())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        format!("v2:m@1;agent 1.0.0+downgrade [{ARM},{X86}]")
    );
    let (_, bytes) = s
        .sign_desired("b", 4, sign_listing())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bytes, b"v1:m@1", "no agent release for b");
}

async fn devices_and_events_keep_what_the_agent_reports(f: Fixture) {
    let s = &f.store;
    let running = |release: Option<&str>| {
        Some(edgefleet_shared::AgentStatus {
            target: ARM.into(),
            release: release.map(str::to_string),
        })
    };
    let mut msg = status("a", 1, true);
    msg.agent = running(None);
    s.record_status(&msg, 1).await.unwrap();
    assert_eq!(
        s.get_device("a").await.unwrap().unwrap().agent,
        running(None)
    );
    msg.seq = 2;
    msg.agent = running(Some("1.2.0"));
    s.record_status(&msg, 2).await.unwrap();
    assert_eq!(
        s.get_device("a").await.unwrap().unwrap().agent,
        running(Some("1.2.0"))
    );
    assert_eq!(
        s.list_devices().await.unwrap()[0].agent,
        running(Some("1.2.0"))
    );
    let found = s
        .find_devices(&DeviceFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(found[0].agent, running(Some("1.2.0")));
    // A stale status changes nothing; an agent that does not say clears it.
    msg.seq = 1;
    msg.agent = None;
    s.record_status(&msg, 3).await.unwrap();
    assert_eq!(
        s.get_device("a").await.unwrap().unwrap().agent,
        running(Some("1.2.0"))
    );
    s.record_status(&status("a", 3, true), 4).await.unwrap();
    assert_eq!(s.get_device("a").await.unwrap().unwrap().agent, None);

    let event = UpdateEvent {
        schema: SCHEMA_VERSION,
        device_id: DeviceId::new("a").unwrap(),
        seq: 4,
        at: 5,
        kind: EventKind::RolledBack,
        desired_version: Some(3),
        model: None,
        model_version: None,
        reason: Some("no report within 60 s".into()),
        agent_version: Some("1.2.0".into()),
    };
    assert!(s.record_event(&event).await.unwrap());
    let stored = s.events_for_device("a", 10).await.unwrap();
    assert_eq!(stored[0].agent_version.as_deref(), Some("1.2.0"));
    assert_eq!(stored[0].kind, "rolled_back");
    assert_eq!(stored[0].model, None);
}

suite!(
    agent_builds_are_immutable_and_deployed_to_devices_or_the_fleet,
    desired_state_carries_the_agent_release,
    devices_and_events_keep_what_the_agent_reports,
);
