//! Unit tests of key creation, loading, rotation and root renewal.

use super::*;

#[test]
fn init_then_load_signer_and_refuse_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let keys = init_keys(dir.path(), 3, 2, 365).unwrap();
    assert_eq!(keys.root.root.threshold, 2);
    assert_eq!(keys.root_key_paths.len(), 3);
    let signer = Signer::load(dir.path()).unwrap();
    assert_eq!(signer.root(), keys.root);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&keys.online_key_path)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(matches!(
        init_keys(dir.path(), 1, 1, 1),
        Err(KeyError::Exists(_))
    ));
}

#[test]
fn signer_refuses_an_online_key_the_root_does_not_name() {
    let dir = tempfile::tempdir().unwrap();
    init_keys(dir.path(), 1, 1, 365).unwrap();
    fs::remove_file(dir.path().join("online.key")).unwrap();
    write_key(
        &dir.path().join("online.key"),
        &SecretKey::generate().unwrap(),
    )
    .unwrap();
    assert!(matches!(
        Signer::load(dir.path()),
        Err(KeyError::KeyNotInRoot { .. })
    ));
}

#[test]
fn bad_threshold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        init_keys(dir.path(), 2, 3, 1),
        Err(KeyError::Invalid(_))
    ));
}

#[test]
fn rotations_extend_a_verifiable_chain() {
    let dir = tempfile::tempdir().unwrap();
    init_keys(dir.path(), 3, 2, 365).unwrap();
    let first = Signer::load(dir.path()).unwrap();
    assert_eq!(first.chain().len(), 1);
    let old_online = first.key.key_id();

    // Plain rotation: a new online key, the old one retired.
    let r = rotate(
        dir.path(),
        &Rotation {
            expires_days: 30,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.root.version, 2);
    assert_ne!(r.online_key, old_online);
    assert!(r.retired_online_key.as_ref().unwrap().exists());
    let signer = Signer::load(dir.path()).unwrap();
    assert_eq!(signer.chain().len(), 2);
    assert_eq!(signer.root().desired.keyids, vec![r.online_key.clone()]);
    let doc = DesiredState::new(
        edgefleet_shared::DeviceId::new("d").unwrap(),
        1,
        0,
        10,
        vec![],
    );
    assert!(signer.trusts_signer_of(&signer.sign(&doc)));
    assert!(
        !signer.trusts_signer_of(&first.sign(&doc)),
        "the retired key"
    );
    // Devices walk it: version 1 accepts version 2.
    first.root().verify_successor(&signer.chain()[1]).unwrap();

    // Revoking the current online key is a rotation too.
    let current = signer.key.key_id();
    let r = rotate(
        dir.path(),
        &Rotation {
            revoke: Some(current.clone()),
            expires_days: 30,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.root.version, 3);
    assert!(!r.root.desired.keyids.contains(&current));

    // New root keys: signed by the old threshold and the new.
    let r = rotate(
        dir.path(),
        &Rotation {
            new_root_keys: Some((2, 2)),
            expires_days: 30,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.root.version, 4);
    assert_eq!(r.new_root_key_paths.len(), 2);
    let chain = read_chain(dir.path()).unwrap();
    assert_eq!(chain.len(), 4);

    // Without enough root keys at hand, nothing changes.
    for p in &r.new_root_key_paths {
        fs::remove_file(p).unwrap();
    }
    let err = rotate(
        dir.path(),
        &Rotation {
            expires_days: 30,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("must be signed by 2 of the current root keys"),
        "{err}"
    );
    assert_eq!(read_chain(dir.path()).unwrap().len(), 4);
    let err = rotate(
        dir.path(),
        &Rotation {
            revoke: Some(SecretKey::generate().unwrap().key_id()),
            expires_days: 30,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("must be signed"), "{err}");
}

#[test]
fn renewal_is_due_when_less_than_a_third_of_the_lifetime_is_left() {
    let day = 86_400;
    let lifetime = 300 * day;
    let now = 1_700_000_000;
    assert!(!renewal_due(now + 300 * day, lifetime, now), "brand new");
    assert!(!renewal_due(now + 101 * day, lifetime, now));
    assert!(!renewal_due(now + 100 * day, lifetime, now), "a third left");
    assert!(renewal_due(now + 100 * day - 1, lifetime, now));
    assert!(renewal_due(now + 1, lifetime, now));
    assert!(renewal_due(now, lifetime, now), "expires now");
    assert!(renewal_due(now - 5 * day, lifetime, now), "expired");
    // A root made to live shorter than the server's lifetime is
    // renewed at once, to that lifetime.
    assert!(renewal_due(now + 30 * day, 365 * day, now));
}

#[test]
fn a_server_holding_the_root_keys_renews_its_root() {
    let dir = tempfile::tempdir().unwrap();
    let keys = init_keys(dir.path(), 3, 2, 10).unwrap();
    let signer = Signer::load(dir.path()).unwrap();
    let online = signer.key.key_id();
    let now = edgefleet_shared::unix_now();
    let lifetime = 365 * 86_400;
    // Ten days left of a 365-day lifetime: due.
    let upkeep = signer.keep_root_fresh(lifetime, now).unwrap();
    assert_eq!(
        upkeep,
        RootUpkeep::Renewed {
            version: 2,
            expires: now + lifetime
        }
    );
    let root = signer.root();
    assert_eq!((root.version, root.expires), (2, now + lifetime));
    // Same keys: nothing to re-sign, the online key is still trusted.
    assert_eq!(root.keys, keys.root.keys);
    assert_eq!(root.root, keys.root.root);
    assert_eq!(root.desired.keyids, vec![online]);
    let doc = DesiredState::new(
        edgefleet_shared::DeviceId::new("d").unwrap(),
        1,
        0,
        10,
        vec![],
    );
    assert!(signer.trusts_signer_of(&signer.sign(&doc)));
    // Devices walk from version 1 to it; it is what a restart loads.
    let chain = signer.chain();
    assert_eq!(chain.len(), 2);
    assert_eq!(signer.root_envelope(), chain[1]);
    let walk = keys.root.walk_chain(&chain, now);
    assert_eq!((walk.accepted.len(), walk.error), (1, None));
    assert_eq!(Signer::load(dir.path()).unwrap().root(), root);
    // Fresh now: nothing more to do.
    assert_eq!(
        signer.keep_root_fresh(lifetime, now).unwrap(),
        RootUpkeep::Fresh {
            version: 2,
            expires: now + lifetime,
            renewable: true
        }
    );
    // A year later it is due again, and goes on being renewed.
    let later = now + lifetime - 100 * 86_400;
    assert!(matches!(
        signer.keep_root_fresh(lifetime, later).unwrap(),
        RootUpkeep::Renewed { version: 3, .. }
    ));
}

#[test]
fn an_expired_root_still_loads_and_renews() {
    let dir = tempfile::tempdir().unwrap();
    let keys = init_keys(dir.path(), 1, 1, 0).unwrap();
    let now = edgefleet_shared::unix_now() + 10;
    assert!(keys.root.check_unexpired(now).is_err());
    let signer = Signer::load(dir.path()).unwrap();
    assert!(matches!(
        signer.keep_root_fresh(30 * 86_400, now).unwrap(),
        RootUpkeep::Renewed { version: 2, .. }
    ));
    // A device pinned to the expired version 1 walks to version 2.
    let pinned = RootDocument::verify_pinned(&signer.chain()[0]).unwrap();
    assert_eq!(pinned.walk_chain(&signer.chain(), now).error, None);
}

#[test]
fn with_the_root_keys_offline_the_operator_must_renew() {
    let dir = tempfile::tempdir().unwrap();
    let keys = init_keys(dir.path(), 2, 2, 10).unwrap();
    // One of the two needed root keys taken offline.
    fs::remove_file(&keys.root_key_paths[0]).unwrap();
    let signer = Signer::load(dir.path()).unwrap();
    let now = edgefleet_shared::unix_now();
    assert_eq!(
        signer.keep_root_fresh(365 * 86_400, now).unwrap(),
        RootUpkeep::NeedsOperator {
            version: 1,
            expires: keys.root.expires
        }
    );
    assert_eq!(
        signer.keep_root_fresh(15 * 86_400, now).unwrap(),
        RootUpkeep::Fresh {
            version: 1,
            expires: keys.root.expires,
            renewable: false
        }
    );
    assert!(!dir.path().join("roots/2.json").exists());
    assert_eq!(signer.root(), keys.root);
    let err = renew_root(dir.path(), 365 * 86_400, now).unwrap_err();
    assert!(
        err.to_string().contains("needs 2 of its root keys"),
        "{err}"
    );
}

#[test]
fn a_damaged_chain_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    init_keys(dir.path(), 1, 1, 365).unwrap();
    rotate(
        dir.path(),
        &Rotation {
            expires_days: 30,
            ..Default::default()
        },
    )
    .unwrap();
    fs::remove_file(dir.path().join("roots/1.json")).unwrap();
    assert!(read_chain(dir.path()).is_err());
    assert!(Signer::load(dir.path()).is_err());
}
