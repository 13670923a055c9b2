//! The embedded MQTT broker (rumqttd), for fleets that fit on one machine.
//!
//! rumqttd binds its listener on its own thread, so start-up success is
//! confirmed by connecting to it (see [`crate::bridge`]).

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Who may connect when device authentication is on: the server itself
/// (its own user name and a password made at start) and enrolled,
/// unrevoked devices, whose user name and client id must both be their
/// device id.
#[derive(Clone)]
pub struct DeviceAuth {
    pub store: crate::store::Store,
    pub server_user: String,
    pub server_password: String,
}

impl DeviceAuth {
    pub async fn allows(&self, client_id: &str, user: &str, password: &str) -> bool {
        if user == self.server_user {
            return crate::auth::matches(
                password,
                &crate::auth::hash_secret(&self.server_password),
            );
        }
        if client_id != user {
            tracing::warn!(
                client_id,
                user,
                "MQTT connection refused: client id and user name differ"
            );
            return false;
        }
        match self.store.device_credential(user).await {
            Ok(Some(hash)) if crate::auth::verify_mosquitto(password, &hash) => true,
            Ok(Some(_)) => {
                tracing::warn!(device = user, "MQTT connection refused: wrong password");
                false
            }
            Ok(None) => {
                tracing::warn!(
                    device = user,
                    "MQTT connection refused: not enrolled, or revoked"
                );
                false
            }
            Err(e) => {
                tracing::error!(device = user, error = %e, "MQTT connection refused: cannot read credentials");
                false
            }
        }
    }
}

/// A free loopback address for the broker behind the gate.
pub fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| anyhow::anyhow!("cannot find a loopback port for the embedded broker: {e}"))?;
    Ok(probe.local_addr()?)
}

/// Starts the broker on `listen` on a background thread; with `auth`,
/// only the clients it allows may connect.
pub fn start_embedded(listen: SocketAddr, auth: Option<DeviceAuth>) -> anyhow::Result<()> {
    // Refuse early, with a clear message, if the port is taken.
    drop(std::net::TcpListener::bind(listen).map_err(|e| {
        anyhow::anyhow!("embedded MQTT broker cannot listen on {listen}: {e} (choose another --mqtt-listen, or use --broker for an external one)")
    })?);
    let mut connections = ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 4 * 1024 * 1024,
        // Above the server client's own window (1,000 publishes in flight): at
        // scale it publishes thousands of desired states at once, and a
        // smaller broker limit stalled its connection (packet id collisions).
        max_inflight_count: 4096,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(auth) = auth {
        connections.set_auth_handler(move |client_id: String, user: String, password: String| {
            let auth = auth.clone();
            async move { auth.allows(&client_id, &user, &password).await }
        });
    }
    let server = ServerSettings {
        name: "edgefleet-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })?;
    Ok(())
}
