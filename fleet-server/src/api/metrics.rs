//! Prometheus metrics of the API: every call timed by method, route
//! template and status, and `GET /metrics` (device counts and broker
//! counters refreshed at each scrape).

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::types::ErrorBody;
use super::ApiResult;
use crate::fleet::Fleet;

/// Times every call by method, route template and status.
pub(super) async fn time_request(
    State(fleet): State<Fleet>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    fleet
        .metrics
        .http
        .get_or_create(&crate::metrics::HttpLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "server", responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String), (status = 401, description = "no, a malformed, unknown or revoked operator token", body = ErrorBody)))]
pub(super) async fn metrics(State(fleet): State<Fleet>) -> ApiResult<Response> {
    let devices = fleet.store.list_devices().await?;
    let online = devices.iter().filter(|d| d.online).count();
    fleet.metrics.set_devices(online, devices.len() - online);
    let classes = crate::drift::view::hardware_classes(&devices);
    fleet.metrics.set_drift(
        &fleet
            .desired
            .drift
            .gauges(&classes, edgefleet_shared::unix_now()),
    );
    if let Some(broker) = &fleet.broker {
        let (stats, clients) = broker.stats();
        fleet.metrics.set_broker(stats, clients);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        fleet.metrics.encode(),
    )
        .into_response())
}
