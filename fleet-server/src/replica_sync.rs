//! What a replica re-reads from the database because another replica
//! may change it: each device's registered key (enrolled, registered or
//! set through any replica's API) and who is revoked. A replica checks
//! every device message against these in memory, so it refreshes them
//! every [`EVERY`]; until then a device enrolled elsewhere has its
//! messages refused (they stay unreceipted on the device and are sent
//! again), and a device revoked elsewhere may still be heard.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;

/// How often a replica re-reads keys and revocations.
pub const EVERY: Duration = Duration::from_secs(3);

/// Re-reads every device's key and revocation until `shutdown`.
pub async fn run(fleet: Fleet, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match fleet.store.find_all_devices(&Default::default()).await {
            Ok(devices) => {
                for device in &devices {
                    fleet.device_keys.refresh(device);
                    let revoked = device.revoked_at.is_some();
                    if fleet.is_revoked(&device.id) != revoked {
                        fleet.set_revoked(&device.id, revoked);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot re-read device keys and revocations"),
        }
    }
}
