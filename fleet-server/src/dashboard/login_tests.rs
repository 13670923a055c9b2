//! Dashboard logins shared by replicas: two servers' routers (each its
//! own [`Fleet`] and connection pool) on one PostgreSQL database, as
//! replicas behind one load balancer. A login through one is accepted by
//! the other; logging out, or revoking the token, through one ends it on
//! both.

use std::sync::Arc;

use edgefleet_shared::TopicPrefix;

use crate::artifacts::ArtifactStore;
use crate::auth::{self, Scope};
use crate::clock::ManualClock;
use crate::desired::{DesiredStates, MemoryPublisher, Revoked};
use crate::fleet::Fleet;
use crate::keys::{init_keys, Signer};
use crate::store::Store;

const START: u64 = 1_800_000_000;

/// A server's HTTP routers (API and dashboard) on `store`, listening on
/// a local port; returns its base URL.
async fn serve(store: Store, dir: &std::path::Path) -> String {
    let keys = dir.join("keys");
    if !keys.exists() {
        init_keys(&keys, 1, 1, 365).unwrap();
    }
    let signer = Arc::new(Signer::load(&keys).unwrap());
    let artifacts = ArtifactStore::open(&dir.join("artifacts")).unwrap();
    let clock = Arc::new(ManualClock::at(START));
    let prefix = TopicPrefix::new("edgefleet/v1").unwrap();
    let desired = DesiredStates {
        store: store.clone(),
        artifacts: artifacts.clone(),
        signer: signer.clone(),
        publisher: Arc::new(MemoryPublisher::default()),
        clock: clock.clone(),
        prefix: prefix.clone(),
        public_url: "http://fleet.test".into(),
        expiry_secs: 3600,
        revoked: Revoked::default(),
        metrics: Default::default(),
        drift: Default::default(),
    };
    let rollouts = crate::rollout::Rollouts::load(store.clone(), desired.clone(), clock)
        .await
        .unwrap();
    // Never connected: nothing here publishes.
    let (mqtt, _) = rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("t", "127.0.0.1", 1), 10);
    let fleet = Fleet {
        store,
        artifacts,
        signer,
        mqtt,
        prefix,
        public_url: "http://fleet.test".into(),
        max_upload_bytes: 1 << 20,
        metrics: Default::default(),
        device_mqtt_url: "mqtt://fleet.test:1883".into(),
        device_ca_pem: None,
        desired,
        external_broker: None,
        broker: None,
        device_keys: Arc::new(crate::device_keys::DeviceKeys::new(&[], false)),
        rollouts,
        sessions: Default::default(),
        insights: Default::default(),
        logins: Default::default(),
        secure_cookies: false,
    };
    let app = crate::api::router(fleet.clone()).merge(super::router(fleet));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn replicas_share_logins_and_logouts() {
    let db = crate::store::tests::fresh_postgres_schema().await;
    let dir = tempfile::tempdir().unwrap();
    let (a_store, b_store) = (
        Store::open(&db).await.unwrap(),
        Store::open(&db).await.unwrap(),
    );
    let a = serve(a_store.clone(), &dir.path().join("a")).await;
    let b = serve(b_store, &dir.path().join("b")).await;
    let made = auth::generate("ops", Scope::Read, edgefleet_shared::unix_now());
    a_store
        .create_token(&made.record, &made.hash)
        .await
        .unwrap();

    // As the server does at start: reqwest's TLS needs a provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let login = |server: &str| {
        client
            .post(format!("{server}/ui/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("sec-fetch-site", "same-origin")
            .body(format!("token={}&next=%2Fui%2F", made.token))
            .send()
    };
    let overview = |server: &str, cookie: &str| {
        client
            .get(format!("{server}/ui/"))
            .header("cookie", cookie)
            .send()
    };

    // Log in through A; B accepts the cookie, pages and API alike.
    let ok = login(&a).await.unwrap();
    assert_eq!(ok.status(), 303);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    let page = overview(&b, &cookie).await.unwrap();
    assert_eq!(page.status(), 200, "a login made through A, on B");
    let html = page.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries its CSRF token")
        .to_string();
    let devices = client
        .get(format!("{b}/api/v1/devices"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(devices.status(), 200);
    // The database holds the id's hash, never the id.
    let id = cookie.split_once('=').unwrap().1;
    assert!(a_store
        .dashboard_session(id, edgefleet_shared::unix_now(), &crate::logins::RULES)
        .await
        .unwrap()
        .is_none());

    // Log out through B (the page's CSRF token came from B; it is the
    // session's, so A's pages carry the same); A refuses the cookie.
    let out = client
        .post(format!("{b}/ui/logout"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("cookie", &cookie)
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    assert_eq!(out.headers()["location"], "/ui/login");
    for server in [&a, &b] {
        let after = overview(server, &cookie).await.unwrap();
        assert_eq!(after.status(), 303, "logged out: {server}");
        assert!(after.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/ui/login"));
    }

    // Revoking the token ends a session on every replica.
    let again = login(&b).await.unwrap();
    let cookie = again.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_string();
    assert_eq!(overview(&a, &cookie).await.unwrap().status(), 200);
    a_store
        .revoke_token(&made.record.id, edgefleet_shared::unix_now())
        .await
        .unwrap();
    assert_eq!(overview(&b, &cookie).await.unwrap().status(), 303);
}
