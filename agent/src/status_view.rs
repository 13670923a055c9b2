//! Fills the status display's [`StatusView`] from the agent's state: the
//! fleet link, the served models, the outbox and the last alert.

use std::time::Duration;

use edgefleet_shared::DeviceId;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::display::{Connectivity, ModelLine, StatusView};
use crate::outbox::OutboxHandle;
use crate::registry::ModelRegistry;
use crate::uplink::LinkState;

/// Where the view's facts come from.
pub struct Sources {
    /// Set in fleet mode.
    pub device: Option<DeviceId>,
    pub registry: ModelRegistry,
    pub link: watch::Receiver<LinkState>,
    pub alert: watch::Receiver<Option<String>>,
    pub outbox: Option<OutboxHandle>,
}

/// The view as it stands now.
pub fn current(sources: &Sources) -> StatusView {
    let connectivity = match &sources.device {
        None => Connectivity::Standalone,
        Some(_) => {
            let link = *sources.link.borrow();
            let secs = link.since.elapsed().as_secs();
            if link.connected {
                Connectivity::Online { since_secs: secs }
            } else {
                Connectivity::Offline { for_secs: secs }
            }
        }
    };
    let models = sources.registry.all();
    let model = models.first();
    let health = sources.outbox.as_ref().map(|o| o.health());
    StatusView {
        device_id: sources
            .device
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default(),
        connectivity,
        model: model.map(|m| ModelLine {
            name: m.name.clone(),
            version: m.version,
            runtime: m.engine.runtime().to_string(),
        }),
        models_total: models.len(),
        last_latency_us: model
            .and_then(|m| m.stats.last_latency())
            .map(|d| d.as_secs_f64() * 1e6),
        outbox_backlog: health
            .as_ref()
            .map(|h| h.depth + h.memory_depth)
            .unwrap_or(0),
        outbox_oldest_secs: health.and_then(|h| h.oldest_age_secs),
        alert: sources.alert.borrow().clone(),
    }
}

/// The view with durations taken out: the display ages durations itself,
/// so a view is only worth sending when something else changed.
fn timeless(view: &StatusView) -> StatusView {
    let mut v = view.clone();
    v.connectivity = match v.connectivity {
        Connectivity::Online { .. } => Connectivity::Online { since_secs: 0 },
        Connectivity::Offline { .. } => Connectivity::Offline { for_secs: 0 },
        Connectivity::Standalone => Connectivity::Standalone,
    };
    v.outbox_oldest_secs = v.outbox_oldest_secs.map(|_| 0);
    v
}

/// Rebuilds the view every `every` and sends it when it changed.
pub async fn run(
    sources: Sources,
    view: watch::Sender<StatusView>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(200)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sources = std::sync::Arc::new(sources);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let s = sources.clone();
        // The outbox read is a (short) blocking query.
        let Ok(next) = tokio::task::spawn_blocking(move || current(&s)).await else {
            break;
        };
        view.send_if_modified(|shown| {
            if timeless(shown) == timeless(&next) {
                false
            } else {
                *shown = next;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standalone_agent_shows_its_models_and_the_alert() {
        let (_link_tx, link) = watch::channel(LinkState::default());
        let (alert_tx, alert) = watch::channel(None);
        let sources = Sources {
            device: None,
            registry: ModelRegistry::default(),
            link,
            alert,
            outbox: None,
        };
        let v = current(&sources);
        assert_eq!(v.connectivity, Connectivity::Standalone);
        assert_eq!((v.models_total, v.model.clone()), (0, None));
        alert_tx.send_replace(Some("refused: expired".into()));
        assert_eq!(current(&sources).alert.as_deref(), Some("refused: expired"));
    }

    #[test]
    fn time_alone_does_not_make_a_new_view() {
        let a = StatusView {
            connectivity: Connectivity::Online { since_secs: 3 },
            ..Default::default()
        };
        let mut b = a.clone();
        b.connectivity = Connectivity::Online { since_secs: 9 };
        assert_eq!(timeless(&a), timeless(&b));
        b.connectivity = Connectivity::Offline { for_secs: 9 };
        assert_ne!(timeless(&a), timeless(&b));
    }
}
