//! The Update Framework's threats that apply to a device, one by one,
//! against a real agent: the test controls the broker's desired-state
//! topic (with or without the server's online key) and an artifact server.
//! Each attack must be refused and reported with its reason, and leave the
//! device as it was: same model serving, same trusted desired state.
//! (Root-chain attacks, a retired key after rotation and a skipped root
//! version, are in key_rotation.rs; an unknown key in
//! tampered_desired_state.rs.)

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;

use edgefleet_shared::{DesiredState, DeviceId, ModelSlot, SecretKey, Signed};
use edgefleet_tests::artifact_server::{ArtifactServer, Behaviour};
use edgefleet_tests::{digits_model, samples, wait_for, Agent, Server};
use serde_json::Value;

const DEVICE: &str = "target-1";
const WAIT: Duration = Duration::from_secs(30);

struct Bench {
    server: Server,
    agent: Agent,
    key: SecretKey,
    /// The newest desired-state version the device accepted.
    accepted: u64,
}

fn doc(version: u64, expires_in: i64, models: Vec<ModelSlot>) -> DesiredState {
    let now = edgefleet_shared::unix_now();
    DesiredState::new(
        DeviceId::new(DEVICE).unwrap(),
        version,
        now,
        now.saturating_add_signed(expires_in),
        models,
    )
}

impl Bench {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let server = Server::start(dir).await?;
        server.push(&digits_model("int8"), "digits", 1);
        server.push(&digits_model("fp32"), "digits", 2);
        let agent = Agent::builder(dir, DEVICE, &server)
            .config("[update]\ndownload_stall_secs = 1\ndownload_attempts = 2\n")
            .start()?;
        server.deploy("digits", 1, DEVICE);
        server.wait_for_model(DEVICE, "digits", 1).await?;
        let (_, genuine) = server.desired(DEVICE).await?;
        let key = server.online_key();
        Ok(Self {
            server,
            agent,
            key,
            accepted: genuine.version,
        })
    }

    fn trusted_desired(&self) -> Vec<u8> {
        std::fs::read(self.agent.dir.join("data/trust/desired.json")).unwrap()
    }

    /// Publishes `payload` and waits for an event of `kind`, newer than any
    /// stored before, whose reason contains `why`.
    async fn expect(&self, payload: Vec<u8>, kind: &str, why: &str) -> anyhow::Result<Value> {
        let newest = self
            .server
            .events(DEVICE)
            .await
            .first()
            .map(|e| e["seq"].as_u64());
        self.server.publish_desired(DEVICE, payload).await?;
        self.server
            .wait_event_matching(DEVICE, &format!("{kind} event saying {why:?}"), WAIT, |e| {
                Some(e["seq"].as_u64()) > newest
                    && e["kind"] == kind
                    && e["reason"].as_str().is_some_and(|r| r.contains(why))
            })
            .await
            .map_err(|e| anyhow::anyhow!("{e}\n{}", self.agent.proc.log_text()))
    }

    /// Signs a desired state whose model (`bytes` as v2) downloads from
    /// `from`, and expects `download_failed` saying `why`. The document
    /// itself is genuine, so it becomes the trusted one; the model is not
    /// served, and v1 goes on serving.
    async fn refused_download(
        &mut self,
        bytes: &[u8],
        from: &ArtifactServer,
        why: &str,
    ) -> anyhow::Result<()> {
        self.accepted += 1;
        let slot = Server::digits_slot(bytes, 2, from.url("x"));
        let signed = Signed::sign(&doc(self.accepted, 600, vec![slot]), &[&self.key]);
        self.expect(signed.to_json(), "download_failed", why)
            .await?;
        let trusted = self.trusted_desired();
        self.assert_untouched("1", &trusted).await
    }

    async fn assert_untouched(&self, serving: &str, trusted: &[u8]) -> anyhow::Result<()> {
        let (status, meta) = self
            .agent
            .request(http::Method::GET, "/v2/models/digits", None)
            .await?;
        assert!(status.is_success());
        assert_eq!(meta["versions"][0], serving);
        assert_eq!(
            self.trusted_desired(),
            trusted,
            "trusted desired state changed"
        );
        let s = samples();
        assert_eq!(self.agent.classify(&s.inputs[3]).await?, s.labels[3]);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_applicable_update_attack_is_refused_and_changes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut b = Bench::start(dir.path()).await?;
    let (genuine_env, genuine) = b.server.desired(DEVICE).await?;
    let v1 = genuine.models[0].clone();
    let trusted = b.trusted_desired();

    // Arbitrary model: no signature at all.
    let mut unsigned = Signed::sign(&doc(b.accepted + 1, 600, vec![v1.clone()]), &[&b.key]);
    unsigned.signatures.clear();
    b.expect(
        unsigned.to_json(),
        "refused",
        "needs 1 valid signature(s), found 0",
    )
    .await?;
    b.assert_untouched("1", &trusted).await?;

    // Mix and match: one document's body under another's signature.
    let a = Signed::sign(&doc(b.accepted + 1, 600, vec![v1.clone()]), &[&b.key]);
    let other = Signed::sign(&doc(b.accepted + 2, 600, vec![v1.clone()]), &[&b.key]);
    let mixed = Signed {
        signed: other.signed.clone(),
        signatures: a.signatures.clone(),
    };
    b.expect(mixed.to_json(), "refused", "does not verify")
        .await?;
    b.assert_untouched("1", &trusted).await?;

    // Indefinite freeze: a validly signed but expired document.
    let stale = Signed::sign(&doc(b.accepted + 1, -10, vec![v1.clone()]), &[&b.key]);
    b.expect(stale.to_json(), "refused", "expired").await?;
    b.assert_untouched("1", &trusted).await?;

    // Another device's document.
    let mut foreign = doc(b.accepted + 1, 600, vec![v1.clone()]);
    foreign.device_id = DeviceId::new("someone-else")?;
    let foreign = Signed::sign(&foreign, &[&b.key]);
    b.expect(foreign.to_json(), "refused", "not this device")
        .await?;
    b.assert_untouched("1", &trusted).await?;

    // Replay: a newer document is accepted (same model, nothing to do),
    // then the older genuine one is sent again.
    let newer = Signed::sign(&doc(b.accepted + 1, 600, vec![v1.clone()]), &[&b.key]);
    b.server.publish_desired(DEVICE, newer.to_json()).await?;
    wait_for("newer document trusted", WAIT, || async {
        (b.trusted_desired() == newer.to_json()).then_some(())
    })
    .await?;
    b.accepted += 1;
    let trusted = b.trusted_desired();
    b.expect(genuine_env.to_json(), "refused", "rollback or replay")
        .await?;
    b.assert_untouched("1", &trusted).await?;

    // Endless data: the artifact server never stops sending. The document
    // itself is genuine, so it is accepted; the model is not.
    let fp32 = std::fs::read(digits_model("fp32"))?;
    let endless = ArtifactServer::start(Behaviour::Endless).await?;
    b.refused_download(&fp32, &endless, "more than the signed size of 19851 bytes")
        .await?;
    let staged = std::fs::read_dir(b.agent.dir.join("data/staging"))?.count();
    assert_eq!(staged, 0, "the oversized download is deleted");

    // Slow retrieval: headers and 100 bytes, then silence.
    let stall = ArtifactServer::start(Behaviour::Stall {
        size: fp32.len(),
        sent: 100,
    })
    .await?;
    b.refused_download(&fp32, &stall, "stalled: no data for 1s")
        .await?;
    assert_eq!(
        stall.connections.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "two attempts"
    );

    // Wrong model: the right size, other bytes.
    let mut other_bytes = fp32.clone();
    other_bytes.reverse();
    let wrong = ArtifactServer::start(Behaviour::Honest {
        body: other_bytes,
        cuts: 0,
        cut_after: 0,
    })
    .await?;
    b.refused_download(&fp32, &wrong, "the signed desired state says")
        .await?;

    // A genuine update to v2 through the server, then a newer document
    // that takes the model back to v1: refused.
    b.accepted += 1;
    let v2 = Server::digits_slot(&fp32, 2, String::new());
    let v2 = ModelSlot {
        urls: vec![format!("{}/artifacts/{}", b.server.url, v2.sha256)],
        ..v2
    };
    let signed = Signed::sign(&doc(b.accepted, 600, vec![v2]), &[&b.key]);
    b.server.publish_desired(DEVICE, signed.to_json()).await?;
    b.server.wait_for_model(DEVICE, "digits", 2).await?;
    let trusted = b.trusted_desired();
    let back = Signed::sign(&doc(b.accepted + 1, 600, vec![v1]), &[&b.key]);
    b.expect(
        back.to_json(),
        "refused",
        "model digits version 1 is older than version 2",
    )
    .await?;
    b.assert_untouched("2", &trusted).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes_without_fetching_bytes_twice() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let b = Bench::start(dir.path()).await?;
    let fp32 = std::fs::read(digits_model("fp32"))?;
    // Every one of the first three connections breaks after 4,000 bytes.
    let flaky = ArtifactServer::start(Behaviour::Honest {
        body: fp32.clone(),
        cuts: 3,
        cut_after: 4000,
    })
    .await?;
    let agent = Agent::builder(dir.path(), "resumer", &b.server)
        .config("[update]\ndownload_stall_secs = 2\ndownload_attempts = 5\n")
        .start()?;
    // Retained: the agent gets it whenever it connects.
    let now = edgefleet_shared::unix_now();
    let resumer_doc = DesiredState::new(
        DeviceId::new("resumer")?,
        1,
        now,
        now + 600,
        vec![Server::digits_slot(&fp32, 2, flaky.url("x"))],
    );
    b.server
        .publish_desired("resumer", Signed::sign(&resumer_doc, &[&b.key]).to_json())
        .await?;
    b.server
        .wait_for_model("resumer", "digits", 2)
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", agent.proc.log_text()))?;
    let sent = flaky.bytes_sent();
    let connections = flaky.connections.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "artifact {} bytes; {sent} bytes sent over {connections} connections ({:.3}x)",
        fp32.len(),
        sent as f64 / fp32.len() as f64
    );
    assert_eq!(connections, 4, "three cut connections and the last one");
    assert!(
        sent as f64 <= 1.05 * fp32.len() as f64,
        "{sent} bytes sent for a {}-byte artifact",
        fp32.len()
    );
    let s = samples();
    assert_eq!(agent.classify(&s.inputs[1]).await?, s.labels[1]);
    Ok(())
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(bytes, ruzstd::encoding::CompressionLevel::Fastest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_artifacts_are_used_capped_and_verified_after_unpacking() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut b = Bench::start(dir.path()).await?;
    let fp32 = std::fs::read(digits_model("fp32"))?;

    // The server keeps a compressed copy of what is pushed, and the
    // signed slot names it with its own size cap.
    let (_, genuine) = b.server.desired(DEVICE).await?;
    let z = genuine.models[0]
        .zstd
        .clone()
        .expect("the server offers a compressed copy");
    assert!(z.size < genuine.models[0].size, "{z:?}");
    assert!(z.urls[0].ends_with(".zst"));

    // A compressed copy only: the plain URL stalls, so the model can only
    // arrive through the .zst, and no more bytes than it has are sent.
    let packed = zstd(&fp32);
    let good = ArtifactServer::start(Behaviour::Honest {
        body: packed.clone(),
        cuts: 1,
        cut_after: packed.len() / 2,
    })
    .await?;
    let stall = ArtifactServer::start(Behaviour::Stall {
        size: fp32.len(),
        sent: 0,
    })
    .await?;
    let mut slot = Server::digits_slot(&fp32, 2, stall.url("plain"));
    slot.zstd = Some(edgefleet_shared::Compressed {
        size: packed.len() as u64,
        urls: vec![good.url("x.zst")],
    });
    b.accepted += 1;
    let signed = Signed::sign(&doc(b.accepted, 600, vec![slot]), &[&b.key]);
    b.server.publish_desired(DEVICE, signed.to_json()).await?;
    b.server.wait_for_model(DEVICE, "digits", 2).await?;
    assert_eq!(
        good.bytes_sent(),
        packed.len() as u64,
        "the cut compressed download resumed"
    );
    assert_eq!(
        stall.connections.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    let s = samples();
    assert_eq!(b.agent.classify(&s.inputs[5]).await?, s.labels[5]);

    // A compression bomb: 64 MiB of zeros in a few KiB. Unpacking stops
    // just past the model's signed size; the device falls back to the plain
    // file (from the real server) and never writes more than that.
    let bomb = zstd(&vec![0u8; 64 << 20]);
    let bomber = ArtifactServer::start(Behaviour::Honest {
        body: bomb.clone(),
        cuts: 0,
        cut_after: 0,
    })
    .await?;
    let int8 = std::fs::read(digits_model("int8"))?;
    let mut slot = Server::digits_slot(
        &int8,
        3,
        format!("{}/artifacts/{}", b.server.url, genuine.models[0].sha256),
    );
    slot.zstd = Some(edgefleet_shared::Compressed {
        size: bomb.len() as u64,
        urls: vec![bomber.url("bomb.zst")],
    });
    b.accepted += 1;
    let signed = Signed::sign(&doc(b.accepted, 600, vec![slot]), &[&b.key]);
    b.server.publish_desired(DEVICE, signed.to_json()).await?;
    b.server.wait_for_model(DEVICE, "digits", 3).await?;
    assert_eq!(
        bomber.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert!(
        b.agent
            .proc
            .log_text()
            .contains("compressed download failed; trying the plain file"),
        "the bomb was refused"
    );
    assert_eq!(b.agent.classify(&s.inputs[6]).await?, s.labels[6]);
    let staged = std::fs::read_dir(b.agent.dir.join("data/staging"))?.count();
    assert_eq!(staged, 0);
    Ok(())
}
