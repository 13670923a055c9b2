//! The web dashboard, served by the fleet server itself under `/ui/`:
//! server-rendered HTML, one small script and one stylesheet, all compiled
//! into the binary (it works on an air-gapped network).
//!
//! Operators log in with an operator token (see [`session`]). Pages read
//! the store and the in-memory [`crate::insights`]; the buttons call the
//! same `/api/v1` endpoints as `fleetctl`, with the session cookie and the
//! page's CSRF token, so a `read` token sees no buttons and the API would
//! refuse it anyway.

pub mod chart;
pub mod pages;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use maud::Markup;
use serde::Deserialize;

use crate::api::types::{RolloutStatus, RolloutSummary};
use crate::auth;
use crate::fleet::Fleet;
use crate::insights::{attention, compliance};
use crate::logins as session;
use crate::store::StoreError;
use pages::{DeviceQuery, DeviceRow, Viewer, Window};

const CSS: &str = include_str!("../../assets/dashboard.css");
const JS: &str = include_str!("../../assets/dashboard.js");
const FAVICON: &str = include_str!("../../assets/favicon.svg");

/// Only our own scripts, styles and images; no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub fn router(fleet: Fleet) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(overview))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/devices", get(devices))
        .route("/ui/devices/{id}", get(device))
        .route("/ui/rollouts", get(rollouts))
        .route("/ui/rollouts/{id}", get(rollout))
        .route("/ui/models", get(models))
        .route("/ui/assets/{name}", get(asset))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(fleet)
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// `/ui/assets/NAME?v=HASH`: the hash changes with the content, so the
/// asset may be cached for long.
pub fn asset_url(name: &str) -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    let v = VERSION.get_or_init(|| {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest([CSS, JS, FAVICON].concat().as_bytes());
        hex::encode(&digest[..6])
    });
    format!("/ui/assets/{name}?v={v}")
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "dashboard.css" => (CSS, "text/css; charset=utf-8"),
        "dashboard.js" => (JS, "text/javascript; charset=utf-8"),
        "favicon.svg" => (FAVICON, "image/svg+xml"),
        _ => return (StatusCode::NOT_FOUND, "no such asset").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}

/// Why a page cannot be shown.
enum PageError {
    /// Not logged in: to the login page, then back.
    Login(String),
    NotFound(Viewer, String),
    Store(StoreError),
}

impl From<StoreError> for PageError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            Self::Login(next) => {
                let query = form_urlencoded::Serializer::new(String::new())
                    .append_pair("next", &next)
                    .finish();
                Redirect::to(&format!("/ui/login?{query}")).into_response()
            }
            Self::NotFound(viewer, what) => (
                StatusCode::NOT_FOUND,
                html(pages::error_page(Some(&viewer), "Not found", &what)),
            )
                .into_response(),
            Self::Store(e) => {
                tracing::error!(error = %e, "dashboard: store failure");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    html(pages::error_page(
                        None,
                        "Server error",
                        &format!("The store failed: {e}"),
                    )),
                )
                    .into_response()
            }
        }
    }
}

fn html(markup: Markup) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        markup.into_string(),
    )
        .into_response()
}

type PageResult = Result<Response, PageError>;

/// The logged-in operator, or a redirect to the login page.
async fn viewer(fleet: &Fleet, headers: &HeaderMap, here: &str) -> Result<Viewer, PageError> {
    let Some(id) = session::from_cookies(headers) else {
        return Err(PageError::Login(here.to_string()));
    };
    match fleet.logins.token(&fleet.store, &id).await? {
        Some((record, session)) => Ok(Viewer {
            name: record.name,
            scope: record.scope,
            csrf: session.csrf,
        }),
        None => Err(PageError::Login(here.to_string())),
    }
}

/// Where to go after logging in: only a dashboard path of this server.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("//") && !n.contains('\\') => {
            n.to_string()
        }
        _ => "/ui/".to_string(),
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NextQuery {
    next: Option<String>,
}

async fn login_form(Query(q): Query<NextQuery>) -> Response {
    html(pages::login(None, &safe_next(q.next.as_deref())))
}

/// A form post from another site is refused (browsers send
/// `Sec-Fetch-Site`; a client that sends none is not a browser page).
fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "same-origin" && v != "none")
}

async fn login(
    State(fleet): State<Fleet>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> PageResult {
    let form: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let next = safe_next(form.get("next").map(String::as_str));
    let refuse = |message: &str| {
        Ok((
            StatusCode::UNAUTHORIZED,
            html(pages::login(Some(message), &next)),
        )
            .into_response())
    };
    if cross_site(&headers) {
        return refuse("Log in from this server's own login page.");
    }
    let token = form.get("token").map(|t| t.trim()).unwrap_or("");
    if token.is_empty() {
        return refuse("Enter an operator token.");
    }
    let Some((id, secret)) = auth::parse(token) else {
        return refuse("That is not an operator token (they look like eft_<16 hex>_<64 hex>).");
    };
    let record = match fleet.store.token_for_auth(id).await? {
        Some((record, hash)) if record.revoked_at.is_none() && auth::matches(secret, &hash) => {
            record
        }
        _ => return refuse("Unknown or revoked operator token."),
    };
    let (session_id, _) = fleet.logins.create(&fleet.store, &record.id).await?;
    tracing::info!(token = %record.id, name = %record.name, "dashboard login");
    let mut response = Redirect::to(&next).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::set_cookie(&session_id, fleet.secure_cookies))
            .expect("a session cookie is hex and attribute names, a valid header"),
    );
    Ok(response)
}

async fn logout(
    State(fleet): State<Fleet>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let form: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if let Some(id) = session::from_cookies(&headers) {
        // The session must be gone from the store before the browser is
        // told it logged out: a store failure is an error to retry.
        let unavailable = |e: StoreError| {
            tracing::error!(error = %e, "cannot end a dashboard session");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "logout failed: the database did not answer; try again",
            )
                .into_response()
        };
        match fleet.logins.get(&fleet.store, &id).await {
            Ok(Some(s)) if session::csrf_matches(&s, form.get("csrf").map(String::as_str)) => {
                if let Err(e) = fleet.logins.remove(&fleet.store, &id).await {
                    return unavailable(e);
                }
            }
            Err(e) => return unavailable(e),
            Ok(Some(_)) => {
                return (
                    StatusCode::FORBIDDEN,
                    "logout refused: missing or wrong CSRF token",
                )
                    .into_response()
            }
            Ok(None) => {}
        }
    }
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&session::clear_cookie(fleet.secure_cookies))
            .expect("a clearing cookie is ASCII, a valid header"),
    );
    response
}

/// Every device with what the dashboard knows of it.
async fn device_rows(fleet: &Fleet, now: u64) -> Result<Vec<DeviceRow>, StoreError> {
    let mut insights = fleet.insights.devices();
    Ok(fleet
        .store
        .list_devices()
        .await?
        .into_iter()
        .map(|device| {
            let insight = insights.remove(&device.id);
            row(device, insight, now)
        })
        .collect())
}

fn row(
    device: crate::store::DeviceRecord,
    insight: Option<crate::insights::DeviceInsight>,
    now: u64,
) -> DeviceRow {
    let state = compliance(
        &device,
        insight.as_ref().and_then(|i| i.last_event.as_ref()),
    );
    let why = attention(&device, insight.as_ref(), now);
    DeviceRow {
        device,
        insight,
        compliance: state,
        attention: why,
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WindowQuery {
    window: Option<String>,
}

async fn overview(
    State(fleet): State<Fleet>,
    headers: HeaderMap,
    Query(q): Query<WindowQuery>,
) -> PageResult {
    let viewer = viewer(&fleet, &headers, "/ui/").await?;
    let now = edgefleet_shared::unix_now();
    let window = Window::parse(q.window.as_deref());
    let rows = device_rows(&fleet, now).await?;
    let rollouts = rollout_summaries(&fleet).await;
    let series = fleet.insights.series(now, window.secs());
    Ok(html(pages::overview(
        &viewer,
        &pages::Overview {
            now,
            rows: &rows,
            rollouts: &rollouts,
            series: &series,
            window,
        },
    )))
}

/// The distinct hardware classes of `devices`, sorted.
fn hardware_classes<'a>(devices: impl Iterator<Item = &'a str>) -> Vec<String> {
    let classes: std::collections::BTreeSet<&str> = devices.collect();
    classes.into_iter().map(str::to_string).collect()
}

async fn devices(State(fleet): State<Fleet>, headers: HeaderMap, uri: http::Uri) -> PageResult {
    let here = uri.path_and_query().map_or("/ui/devices", |p| p.as_str());
    let viewer = viewer(&fleet, &headers, here).await?;
    // Unknown or malformed parameters are ignored, not an error page.
    let q: DeviceQuery = device_query(uri.query().unwrap_or(""));
    let now = edgefleet_shared::unix_now();
    let rows = device_rows(&fleet, now).await?;
    let matched: Vec<&DeviceRow> = rows.iter().filter(|r| q.matches(r)).collect();
    Ok(html(pages::devices(
        &viewer,
        now,
        &q,
        &matched,
        &hardware_classes(rows.iter().map(|r| pages::hardware_of(&r.device))),
    )))
}

/// The devices query from a query string, field by field, ignoring what
/// does not parse.
fn device_query(query: &str) -> DeviceQuery {
    let mut q = DeviceQuery::default();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let v = v.into_owned();
        match k.as_ref() {
            "q" => q.q = v,
            "hardware" => q.hardware = v,
            "state" => q.state = v,
            "online" => q.online = v,
            "model" => q.model = v,
            "attention" => q.attention = v,
            "page" => q.page = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    q
}

async fn device(
    State(fleet): State<Fleet>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<WindowQuery>,
) -> PageResult {
    let viewer = viewer(&fleet, &headers, &format!("/ui/devices/{id}")).await?;
    let Some(record) = fleet.store.get_device(&id).await? else {
        return Err(PageError::NotFound(
            viewer,
            format!("No device {id:?} is known."),
        ));
    };
    let now = edgefleet_shared::unix_now();
    let window = Window::parse(q.window.as_deref());
    let telemetry: Vec<edgefleet_shared::TelemetryMessage> = fleet
        .store
        .recent_telemetry(&id, now.saturating_sub(window.secs()), 2000)
        .await?
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    let events = fleet.store.events_for_device(&id, 50).await?;
    let row = row(record, fleet.insights.device(&id), now);
    Ok(html(pages::device(
        &viewer,
        &pages::DevicePage {
            now,
            row: &row,
            telemetry: &telemetry,
            events: &events,
            window,
        },
    )))
}

async fn rollouts(State(fleet): State<Fleet>, headers: HeaderMap) -> PageResult {
    let viewer = viewer(&fleet, &headers, "/ui/rollouts").await?;
    let list = rollout_summaries(&fleet).await;
    let models = fleet.store.list_models().await?;
    // Only enrolled classes: a rollout selects by the enrolled one.
    let devices = fleet.store.list_devices().await?;
    let hardware = hardware_classes(devices.iter().filter_map(|d| d.hardware.as_deref()));
    Ok(html(pages::rollouts(
        &viewer,
        &pages::RolloutsPage {
            rollouts: &list,
            models: &models,
            hardware: &hardware,
        },
    )))
}

async fn rollout(
    State(fleet): State<Fleet>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> PageResult {
    let viewer = viewer(&fleet, &headers, &format!("/ui/rollouts/{id}")).await?;
    match fleet.rollouts.record(&id).await {
        Some(record) => Ok(html(pages::rollout(
            &viewer,
            &RolloutStatus::of(&record, false),
        ))),
        None => Err(PageError::NotFound(viewer, format!("No rollout {id:?}."))),
    }
}

/// Every rollout in brief.
async fn rollout_summaries(fleet: &Fleet) -> Vec<RolloutSummary> {
    let records = fleet.rollouts.records().await;
    records.iter().map(RolloutSummary::of).collect()
}

async fn models(State(fleet): State<Fleet>, headers: HeaderMap) -> PageResult {
    let viewer = viewer(&fleet, &headers, "/ui/models").await?;
    let models = fleet.store.list_models().await?;
    let mut running: BTreeMap<(String, u64), pages::Running> = BTreeMap::new();
    let devices = fleet.store.list_devices().await?;
    let classes = crate::drift::view::hardware_classes(&devices);
    for d in devices {
        let hardware = pages::hardware_of(&d);
        for m in &d.models {
            let r = running.entry((m.name.clone(), m.version)).or_default();
            r.devices += 1;
            r.online += usize::from(d.online);
            *r.by_hardware.entry(hardware.to_string()).or_default() += 1;
        }
    }
    let now = edgefleet_shared::unix_now();
    let view = &fleet.desired.drift;
    let drift: Vec<_> = view
        .models()
        .iter()
        .map(|m| view.model(m, &classes, now))
        .collect();
    let insights = fleet.insights.devices();
    let names: std::collections::BTreeSet<&str> = models.iter().map(|m| m.name.as_str()).collect();
    let quality: Vec<_> = names
        .into_iter()
        .map(|name| crate::quality::summarize(name, &insights))
        .collect();
    Ok(html(pages::models(
        &viewer, now, &models, &running, &drift, &quality,
    )))
}

#[cfg(test)]
mod login_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logins_only_return_to_dashboard_paths() {
        assert_eq!(safe_next(Some("/ui/devices?q=a")), "/ui/devices?q=a");
        for hostile in [
            "https://evil.example/",
            "//evil.example/ui/",
            "/api/v1/tokens",
            "/ui/\\evil",
        ] {
            assert_eq!(safe_next(Some(hostile)), "/ui/", "{hostile}");
        }
        assert_eq!(safe_next(None), "/ui/");
    }

    #[test]
    fn device_queries_ignore_what_does_not_parse() {
        let q = device_query("q=pi&page=x&bogus=1&state=failed");
        assert_eq!(q.q, "pi");
        assert_eq!(q.page, 0);
        assert_eq!(q.state, "failed");
    }
}
