//! The embedded MQTT broker (rumqttd), for fleets that fit on one machine.
//!
//! rumqttd binds its listener on its own thread, so start-up success is
//! confirmed by connecting to it (see [`crate::bridge`]).

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts the broker on `listen` on a background thread.
pub fn start_embedded(listen: SocketAddr) -> anyhow::Result<()> {
    // Refuse early, with a clear message, if the port is taken.
    drop(std::net::TcpListener::bind(listen).map_err(|e| {
        anyhow::anyhow!("embedded MQTT broker cannot listen on {listen}: {e} (choose another --mqtt-listen, or use --broker for an external one)")
    })?);
    let server = ServerSettings {
        name: "edgefleet-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 4 * 1024 * 1024,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
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
