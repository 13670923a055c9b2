//! Keeping the fleet's root document from expiring.
//!
//! Devices accept no desired state under an expired root
//! ([`edgefleet_shared::RootDocument::walk_chain`]). At start and then every
//! [`CHECK_EVERY`], the server asks its [`Signer`] to keep the root fresh
//! ([`Signer::keep_root_fresh`]): with the root keys in the keys directory
//! it renews the root once less than a third of `root_expiry_days` is left
//! and publishes the new chain; with them offline it logs loudly (at every
//! start, and at every check once renewal is due) what the operator must
//! do. `/metrics` carries the expiry as `edgefleet_root_expires_seconds`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::keys::{RootUpkeep, Signer};

/// How often the running server checks its root.
pub const CHECK_EVERY: Duration = Duration::from_secs(6 * 3600);

/// The check at start, before anything is published, so devices get the
/// renewed chain from the first publication on.
pub fn check_at_start(signer: &Signer, lifetime_secs: u64, keys_dir: &Path) {
    match signer.keep_root_fresh(lifetime_secs, edgefleet_shared::unix_now()) {
        Ok(upkeep) => log(&upkeep, keys_dir, true),
        Err(e) => tracing::error!(error = %e, "cannot renew the root document"),
    }
}

/// Checks the root every [`CHECK_EVERY`] until `shutdown`; after a renewal
/// publishes the new chain (retained, for devices to walk forward to) and
/// the new expiry.
pub async fn run(fleet: Fleet, lifetime_secs: u64, keys_dir: PathBuf, shutdown: CancellationToken) {
    fleet.metrics.set_root_expires(fleet.signer.root().expires);
    let start = tokio::time::Instant::now() + CHECK_EVERY;
    let mut tick = tokio::time::interval_at(start, CHECK_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let signer = fleet.signer.clone();
        let upkeep = tokio::task::spawn_blocking(move || {
            signer.keep_root_fresh(lifetime_secs, edgefleet_shared::unix_now())
        })
        .await;
        match upkeep {
            Ok(Ok(upkeep)) => {
                log(&upkeep, &keys_dir, false);
                if let RootUpkeep::Renewed { expires, .. } = upkeep {
                    fleet.metrics.set_root_expires(expires);
                    publish_chain(&fleet).await;
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot renew the root document"),
            Err(e) => tracing::error!(error = %e, "the root document check failed"),
        }
    }
}

/// Publishes the root chain, retained (the bridge publishes it too, each
/// time it connects).
async fn publish_chain(fleet: &Fleet) {
    let chain = serde_json::to_vec(&fleet.signer.chain())
        .expect("a root chain is plain data and always serialises");
    fleet.metrics.published("roots");
    if let Err(e) = fleet
        .mqtt
        .publish(fleet.prefix.roots(), QoS::AtLeastOnce, true, chain)
        .await
    {
        tracing::error!(error = %e, "cannot publish the renewed root chain; devices get it when the server reconnects or restarts");
    }
}

/// Logs what a check found. A root whose keys are offline is reported at
/// every start, and at every check once it is due.
fn log(upkeep: &RootUpkeep, keys_dir: &Path, at_start: bool) {
    let now = edgefleet_shared::unix_now();
    let days_left = |expires: u64| (expires as i64 - now as i64) / 86_400;
    match *upkeep {
        RootUpkeep::Fresh {
            version,
            expires,
            renewable: true,
        } if at_start => tracing::info!(
            root_version = version,
            expires,
            days_left = days_left(expires),
            "root document valid; its root keys are in the keys directory, so the server renews it before it expires"
        ),
        RootUpkeep::Fresh {
            version,
            expires,
            renewable: false,
        } if at_start => tracing::warn!(
            root_version = version,
            expires,
            "ROOT DOCUMENT EXPIRES IN {} DAYS and its root keys are offline, so the server cannot renew it: before then bring the root keys and run `fleetctl keys rotate --dir {}`, then restart the server; once it has expired devices accept no desired state",
            days_left(expires),
            keys_dir.display()
        ),
        RootUpkeep::Fresh { .. } => {}
        RootUpkeep::NeedsOperator { version, expires } => {
            let when = if expires <= now {
                "HAS EXPIRED (devices accept no desired state until a newer root is published)"
                    .to_string()
            } else {
                format!("EXPIRES IN {} DAYS", days_left(expires))
            };
            tracing::error!(
                root_version = version,
                expires,
                "ROOT DOCUMENT {when} and its root keys are offline: bring the root keys and run `fleetctl keys rotate --dir {}`, then restart the server",
                keys_dir.display()
            );
        }
        RootUpkeep::Renewed { version, expires } => tracing::warn!(
            root_version = version,
            expires,
            days_left = days_left(expires),
            "root document renewed with the root keys in the keys directory (same keys, later expiry); devices walk forward to it"
        ),
    }
}
