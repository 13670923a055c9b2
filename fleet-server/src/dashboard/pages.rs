//! The dashboard's pages: plain functions from data to HTML (maud escapes
//! every interpolated value). Sections whose id carries `data-live` are
//! swapped in place by the page script's periodic refresh. The rollout
//! pages are in [`rollouts`].

use std::collections::BTreeMap;

use maud::{html, Markup, DOCTYPE};

use super::chart::{self, line_chart, Series};
use crate::api::types::RolloutSummary;
use crate::auth::Scope;
use crate::insights::{human_duration, Compliance, DeviceInsight, Minute};
use crate::rollout::Phase;
use crate::store::{DeviceRecord, EventRecord, ModelRecord};
use edgefleet_shared::TelemetryMessage;

mod drift;
mod quality;
mod rollouts;

pub use self::rollouts::{rollout, rollouts, RolloutsPage};

/// The logged-in operator, as pages need them.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub name: String,
    pub scope: Scope,
    pub csrf: String,
}

impl Viewer {
    pub fn can_write(&self) -> bool {
        self.scope >= Scope::Write
    }
}

/// A device with what the dashboard knows of it.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub device: DeviceRecord,
    pub insight: Option<DeviceInsight>,
    pub compliance: Compliance,
    pub attention: Vec<String>,
}

impl DeviceRow {
    /// The worst p95 latency over its models in the latest interval (ms).
    pub fn p95_ms(&self) -> Option<f64> {
        self.insight.as_ref().and_then(|i| {
            i.models
                .iter()
                .filter_map(|m| m.p95_us)
                .fold(None, |acc: Option<f64>, v| {
                    Some(acc.map_or(v, |a| a.max(v)))
                })
                .map(|us| us / 1000.0)
        })
    }
}

/// The time window a page's charts cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Hour,
    SixHours,
    Day,
}

impl Window {
    pub const ALL: [Window; 3] = [Self::Hour, Self::SixHours, Self::Day];

    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("6h") => Self::SixHours,
            Some("24h") => Self::Day,
            _ => Self::Hour,
        }
    }

    pub fn secs(self) -> u64 {
        match self {
            Self::Hour => 3600,
            Self::SixHours => 6 * 3600,
            Self::Day => 24 * 3600,
        }
    }

    pub fn param(self) -> &'static str {
        match self {
            Self::Hour => "1h",
            Self::SixHours => "6h",
            Self::Day => "24h",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Overview,
    Devices,
    Rollouts,
    Models,
    None,
}

/// "2026-11-27 17:42 UTC" for a unix time.
pub fn datetime(t: u64) -> String {
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let days = (t / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {} UTC", chart::clock(t))
}

fn ago(now: u64, t: u64) -> String {
    if t == 0 {
        return "never".into();
    }
    format!("{} ago", human_duration(now.saturating_sub(t)))
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

fn compliance_badge(c: Compliance) -> Markup {
    html! { span class={"badge " (c.as_str())} { (c.label()) } }
}

fn online_badge(online: bool) -> Markup {
    html! {
        @if online { span.badge.online { "online" } } @else { span.badge.offline { "offline" } }
    }
}

/// The frame around every page.
pub fn layout(viewer: Option<&Viewer>, title: &str, nav: Nav, live: bool, body: Markup) -> Markup {
    let link = |href: &str, label: &str, this: Nav| {
        html! { li { a href=(href) aria-current=[(nav == this).then_some("page")] { (label) } } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                @if let Some(v) = viewer { meta name="csrf-token" content=(v.csrf); }
                title { (title) " · edgefleet" }
                link rel="stylesheet" href=(super::asset_url("dashboard.css"));
                link rel="icon" href=(super::asset_url("favicon.svg")) type="image/svg+xml";
                script src=(super::asset_url("dashboard.js")) defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { span aria-hidden="true" { "◆" } " edgefleet" }
                    @if let Some(v) = viewer {
                        nav aria-label="Main" {
                            ul {
                                (link("/ui/", "Overview", Nav::Overview))
                                (link("/ui/devices", "Devices", Nav::Devices))
                                (link("/ui/rollouts", "Rollouts", Nav::Rollouts))
                                (link("/ui/models", "Models", Nav::Models))
                            }
                        }
                        div.who {
                            span { (v.name) " " span.scope { (v.scope.as_str()) } }
                            form method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(v.csrf);
                                button.link type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main id="main" data-refresh=[live.then_some("5")] {
                    (body)
                }
                div id="toast" role="status" aria-live="polite" {}
                @if live {
                    footer { span id="updated" aria-live="off" { "Live: refreshes every 5 s" } }
                }
            }
        }
    }
}

pub fn login(error: Option<&str>, next: &str) -> Markup {
    layout(
        None,
        "Log in",
        Nav::None,
        false,
        html! {
            section.card.login {
                h1 { "Log in" }
                p { "Paste an operator token. " code { "fleetctl tokens create --name NAME --scope read|write|admin" } " makes one; on first start the server writes an admin token to " code { "{data_dir}/admin.token" } "." }
                @if let Some(e) = error { p.error role="alert" id="login-error" { (e) } }
                form method="post" action="/ui/login" {
                    input type="hidden" name="next" value=(next);
                    label for="token" { "Operator token" }
                    input id="token" name="token" type="password" autocomplete="off" required autofocus placeholder="eft_…" aria-describedby=[error.map(|_| "login-error")];
                    button type="submit" { "Log in" }
                }
            }
        },
    )
}

/// A simple error page (not found, store failure).
pub fn error_page(viewer: Option<&Viewer>, title: &str, message: &str) -> Markup {
    layout(
        viewer,
        title,
        Nav::None,
        false,
        html! { section.card { h1 { (title) } p.error role="alert" { (message) } p { a href="/ui/" { "Back to the overview" } } } },
    )
}

fn window_links(base: &str, window: Window) -> Markup {
    html! {
        nav.window aria-label="Time window" {
            @for w in Window::ALL {
                a href={(base) "window=" (w.param())} aria-current=[(w == window).then_some("true")] { (w.param()) }
            }
        }
    }
}

/// A device's hardware class, `unknown` when it was never enrolled.
pub fn hardware_of(d: &DeviceRecord) -> &str {
    d.hardware.as_deref().unwrap_or("unknown")
}

fn stacked_bar(counts: &BTreeMap<Compliance, usize>, total: usize) -> Markup {
    let total = total.max(1) as f64;
    let mut x = 0.0;
    let segments: Vec<(Compliance, usize, f64, f64)> = Compliance::ALL
        .into_iter()
        .filter_map(|c| {
            let n = counts.get(&c).copied().unwrap_or(0);
            let w = n as f64 / total * 1000.0;
            x += w;
            (n > 0).then_some((c, n, x - w, w))
        })
        .collect();
    html! {
        svg.stack viewBox="0 0 1000 24" preserveAspectRatio="none" role="img" aria-label="Devices by compliance state" {
            @for (c, n, x, w) in segments {
                rect class={"fill " (c.as_str())} x=(format!("{x:.1}")) y="0" width=(format!("{w:.1}")) height="24" { title { (c.label()) ": " (n) } }
            }
        }
    }
}

pub struct Overview<'a> {
    pub now: u64,
    pub rows: &'a [DeviceRow],
    pub rollouts: &'a [RolloutSummary],
    pub series: &'a [Minute],
    pub window: Window,
}

pub fn overview(viewer: &Viewer, o: &Overview<'_>) -> Markup {
    let total = o.rows.len();
    let online = o.rows.iter().filter(|r| r.device.online).count();
    let attention: Vec<&DeviceRow> = o.rows.iter().filter(|r| !r.attention.is_empty()).collect();
    let mut by_state: BTreeMap<Compliance, usize> = BTreeMap::new();
    let mut by_hw: BTreeMap<&str, BTreeMap<Compliance, usize>> = BTreeMap::new();
    let mut hw_online: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut versions: BTreeMap<(String, u64), (usize, usize)> = BTreeMap::new();
    let mut releases: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for r in o.rows {
        *releases
            .entry((hardware_of(&r.device), agent_release(&r.device)))
            .or_default() += 1;
        *by_state.entry(r.compliance).or_default() += 1;
        let hw = hardware_of(&r.device);
        *by_hw
            .entry(hw)
            .or_default()
            .entry(r.compliance)
            .or_default() += 1;
        let e = hw_online.entry(hw).or_default();
        e.0 += 1;
        e.1 += usize::from(r.device.online);
        for m in &r.device.models {
            let e = versions.entry((m.name.clone(), m.version)).or_default();
            e.0 += 1;
            e.1 += usize::from(r.device.online);
        }
    }
    let active = o
        .rollouts
        .iter()
        .filter(|r| !matches!(r.phase, Phase::Completed | Phase::Aborted { .. }))
        .count();
    let hour: Vec<&Minute> = o.series.iter().filter(|m| m.t + 3600 >= o.now).collect();
    let inferences_hour: u64 = hour.iter().map(|m| m.inferences).sum();
    let errors_hour: u64 = hour.iter().map(|m| m.errors).sum();
    let from = o.now.saturating_sub(o.window.secs());
    let per_min = |f: fn(&Minute) -> Option<f64>| -> Vec<(u64, f64)> {
        o.series
            .iter()
            .filter_map(|m| f(m).map(|v| (m.t, v)))
            .collect()
    };
    layout(
        Some(viewer),
        "Fleet overview",
        Nav::Overview,
        true,
        html! {
            h1 { "Fleet overview" }
            section.stats id="summary" data-live aria-label="Summary" {
                a.stat href="/ui/devices" { span.n { (total) } span.l { "devices" } }
                a.stat href="/ui/devices?online=true" { span.n { (online) } span.l { "online" } }
                a.stat href="/ui/devices?online=false" { span.n { (total - online) } span.l { "offline" } }
                a.stat.warn[!attention.is_empty()] href="/ui/devices?attention=1" { span.n { (attention.len()) } span.l { "need attention" } }
                a.stat href="/ui/rollouts" { span.n { (active) } span.l { "active rollouts" } }
                div.stat { span.n { (chart::short_number(inferences_hour as f64)) } span.l { "inferences, last hour" } }
                div.stat { span.n { (if inferences_hour + errors_hour > 0 { format!("{:.2}%", errors_hour as f64 * 100.0 / (inferences_hour + errors_hour) as f64) } else { "–".into() }) } span.l { "errors, last hour" } }
            }
            section.card id="compliance" data-live {
                h2 { "Compliance" }
                (stacked_bar(&by_state, total))
                ul.legend.states {
                    @for c in Compliance::ALL {
                        li { a href={"/ui/devices?state=" (c.as_str())} { span class={"swatch fill " (c.as_str())} aria-hidden="true" {} (c.label()) ": " strong { (by_state.get(&c).copied().unwrap_or(0)) } } }
                    }
                }
                div.table-wrap {
                    table {
                        caption { "By hardware class" }
                        thead { tr { th scope="col" { "Hardware" } th scope="col" { "Devices" } th scope="col" { "Online" } @for c in Compliance::ALL { th scope="col" { (c.label()) } } } }
                        tbody {
                            @for (hw, states) in &by_hw {
                                @let (n, on) = hw_online[hw];
                                tr {
                                    th scope="row" { a href={"/ui/devices?hardware=" (hw)} { (hw) } }
                                    td.num { (n) } td.num { (on) }
                                    @for c in Compliance::ALL { td.num { (states.get(&c).copied().unwrap_or(0)) } }
                                }
                            }
                        }
                    }
                }
                div.table-wrap {
                    table {
                        caption { "Model versions running" }
                        thead { tr { th scope="col" { "Model" } th scope="col" { "Version" } th scope="col" { "Devices" } th scope="col" { "Online" } } }
                        tbody {
                            @for ((name, version), (n, on)) in &versions {
                                tr { th scope="row" { (name) } td.num { (version) } td.num { a href={"/ui/devices?model=" (name) "@" (version)} { (n) } } td.num { (on) } }
                            }
                            @if versions.is_empty() { tr { td colspan="4" { "No device runs a model yet." } } }
                        }
                    }
                }
                div.table-wrap {
                    table id="agent-releases" {
                        caption { "Agent releases by hardware class" }
                        thead { tr { th scope="col" { "Hardware" } th scope="col" { "Agent release" } th scope="col" { "Devices" } } }
                        tbody {
                            @for ((hw, release), n) in &releases {
                                tr { th scope="row" { a href={"/ui/devices?hardware=" (hw)} { (hw) } } td { (release) } td.num { (n) } }
                            }
                            @if releases.is_empty() { tr { td colspan="3" { "No device yet." } } }
                        }
                    }
                }
            }
            section.card id="attention" data-live {
                h2 { "Needs attention (" (attention.len()) ")" }
                @if attention.is_empty() {
                    p.ok { "Nothing needs attention." }
                } @else {
                    div.table-wrap {
                        table {
                            thead { tr { th scope="col" { "Device" } th scope="col" { "Hardware" } th scope="col" { "Why" } th scope="col" { "Last seen" } } }
                            tbody {
                                @for r in attention.iter().take(20) {
                                    tr {
                                        th scope="row" { a href={"/ui/devices/" (r.device.id)} { (r.device.id) } }
                                        td { (hardware_of(&r.device)) }
                                        td { ul.reasons { @for why in &r.attention { li { (why) } } } }
                                        td { (ago(o.now, r.device.last_seen)) }
                                    }
                                }
                            }
                        }
                    }
                    @if attention.len() > 20 { p { a href="/ui/devices?attention=1" { "All " (attention.len()) " devices that need attention" } } }
                }
            }
            section.card {
                div.heading { h2 { "Inference, fleet-wide" } (window_links("/ui/?", o.window)) }
                div.charts {
                    (line_chart("fleet-volume", "Inferences per minute", "count", from, o.now, &[
                        Series::new("inferences", o.series.iter().map(|m| (m.t, m.inferences as f64)).collect()),
                        Series::new("errors", o.series.iter().map(|m| (m.t, m.errors as f64)).collect()),
                    ]))
                    (line_chart("fleet-latency", "Latency", "ms", from, o.now, &[
                        Series::new("p50 (mean)", per_min(|m| m.p50_ms)),
                        Series::new("p95 (mean)", per_min(|m| m.p95_ms)),
                        Series::new("p95 (worst device)", per_min(|m| m.p95_max_ms)),
                    ]))
                }
            }
        },
    )
}

/// The devices table's query.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    pub q: String,
    pub hardware: String,
    pub state: String,
    pub online: String,
    pub model: String,
    pub attention: String,
    pub page: usize,
}

impl DeviceQuery {
    /// Whether a device passes the filters.
    pub fn matches(&self, r: &DeviceRow) -> bool {
        let d = &r.device;
        let q = self.q.trim().to_lowercase();
        (q.is_empty()
            || d.id.to_lowercase().contains(&q)
            || d.tags
                .iter()
                .any(|(k, v)| format!("{k}={v}").to_lowercase().contains(&q)))
            && (self.hardware.is_empty() || hardware_of(d) == self.hardware)
            && (self.state.is_empty() || r.compliance.as_str() == self.state)
            && match self.online.as_str() {
                "true" => d.online,
                "false" => !d.online,
                _ => true,
            }
            && (self.model.is_empty()
                || d.models.iter().any(|m| {
                    format!("{}@{}", m.name, m.version) == self.model || m.name == self.model
                }))
            && (self.attention.is_empty() || !r.attention.is_empty())
    }

    /// The query string with another page number.
    pub fn with_page(&self, page: usize) -> String {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("q", &self.q),
            ("hardware", &self.hardware),
            ("state", &self.state),
            ("online", &self.online),
            ("model", &self.model),
            ("attention", &self.attention),
        ] {
            if !v.is_empty() {
                out.append_pair(k, v);
            }
        }
        if page > 0 {
            out.append_pair("page", &page.to_string());
        }
        out.finish()
    }
}

pub const PAGE_SIZE: usize = 50;

pub fn devices(
    viewer: &Viewer,
    now: u64,
    q: &DeviceQuery,
    matched: &[&DeviceRow],
    hardware: &[String],
) -> Markup {
    let pages = matched.len().div_ceil(PAGE_SIZE).max(1);
    let page = q.page.min(pages - 1);
    let shown = &matched
        [(page * PAGE_SIZE).min(matched.len())..((page + 1) * PAGE_SIZE).min(matched.len())];
    let select = |name: &str, label: &str, current: &str, options: Vec<(String, String)>| {
        html! {
            div.field {
                label for=(name) { (label) }
                select id=(name) name=(name) {
                    option value="" { "any" }
                    @for (value, text) in options {
                        option value=(value) selected[value == current] { (text) }
                    }
                }
            }
        }
    };
    layout(
        Some(viewer),
        "Devices",
        Nav::Devices,
        true,
        html! {
            h1 { "Devices" }
            form.filters method="get" action="/ui/devices" role="search" {
                div.field.grow {
                    label for="q" { "Search id or tag" }
                    input id="q" name="q" type="search" value=(q.q) placeholder="e.g. pi-17 or site=lab";
                }
                (select("hardware", "Hardware", &q.hardware, hardware.iter().map(|h| (h.clone(), h.clone())).collect()))
                (select("state", "State", &q.state, Compliance::ALL.iter().map(|c| (c.as_str().to_string(), c.label().to_string())).collect()))
                (select("online", "Online", &q.online, vec![("true".into(), "online".into()), ("false".into(), "offline".into())]))
                div.field.check {
                    input id="attention" name="attention" type="checkbox" value="1" checked[!q.attention.is_empty()];
                    label for="attention" { "needs attention" }
                }
                @if !q.model.is_empty() { input type="hidden" name="model" value=(q.model); }
                button type="submit" { "Filter" }
            }
            section.card id="device-list" data-live {
                p.count { "Showing " (if shown.is_empty() { 0 } else { page * PAGE_SIZE + 1 }) "–" (page * PAGE_SIZE + shown.len()) " of " strong { (matched.len()) } " devices" }
                div.table-wrap {
                    table.devices {
                        thead {
                            tr {
                                th scope="col" { "Device" } th scope="col" { "Tags" } th scope="col" { "Hardware" } th scope="col" { "Models" }
                                th scope="col" { "State" } th scope="col" { "Last seen" } th scope="col" { "CPU" } th scope="col" { "Mem" } th scope="col" { "Temp" } th scope="col" { "p95" }
                            }
                        }
                        tbody {
                            @for r in shown {
                                @let i = r.insight.as_ref();
                                tr.attention[!r.attention.is_empty()] {
                                    th scope="row" { a href={"/ui/devices/" (r.device.id)} { (r.device.id) } @if !r.attention.is_empty() { span.flag title=(r.attention.join("; ")) { " ⚠" span.sr { "needs attention: " (r.attention.join("; ")) } } } }
                                    td.tags { @for (k, v) in &r.device.tags { span.tag { (k) "=" (v) } " " } }
                                    td { (hardware_of(&r.device)) }
                                    td { @for m in &r.device.models { span.tag { (m.name) "@" (m.version) } " " } }
                                    td { (online_badge(r.device.online)) " " (compliance_badge(r.compliance)) }
                                    td { (ago(now, r.device.last_seen)) }
                                    td.num { (opt(i.and_then(|i| i.cpu_percent), |v| format!("{v:.0}%"))) }
                                    td.num { (opt(i.and_then(|i| i.memory_used_pct), |v| format!("{v:.0}%"))) }
                                    td.num { (opt(i.and_then(|i| i.temperature_c), |v| format!("{v:.0} °C"))) }
                                    td.num { (opt(r.p95_ms(), |v| format!("{v:.1} ms"))) }
                                }
                            }
                            @if shown.is_empty() { tr { td colspan="10" { "No device matches." } } }
                        }
                    }
                }
                @if pages > 1 {
                    nav.pager aria-label="Pages" {
                        @if page > 0 { a rel="prev" href={"/ui/devices?" (q.with_page(page - 1))} { "← Previous" } }
                        span { "Page " (page + 1) " of " (pages) }
                        @if page + 1 < pages { a rel="next" href={"/ui/devices?" (q.with_page(page + 1))} { "Next →" } }
                    }
                }
            }
        },
    )
}

pub struct DevicePage<'a> {
    pub now: u64,
    pub row: &'a DeviceRow,
    pub telemetry: &'a [TelemetryMessage],
    pub events: &'a [EventRecord],
    pub window: Window,
}

/// The agent release a device reports: its version, `factory` for the
/// packaged executable, `–` when its agent does not say.
fn agent_release(d: &DeviceRecord) -> &str {
    match &d.agent {
        Some(a) => a.release.as_deref().unwrap_or("factory"),
        None => "–",
    }
}

pub fn device(viewer: &Viewer, p: &DevicePage<'_>) -> Markup {
    let d = &p.row.device;
    let t = p.telemetry;
    let from = p.now.saturating_sub(p.window.secs());
    let health = |f: &dyn Fn(&TelemetryMessage) -> Option<f64>| -> Vec<(u64, f64)> {
        t.iter().filter_map(|s| f(s).map(|v| (s.at, v))).collect()
    };
    let mut models: Vec<(String, u64)> = t
        .iter()
        .flat_map(|s| s.models.iter().map(|m| (m.name.clone(), m.version)))
        .collect();
    models.sort();
    models.dedup();
    let base = format!("/ui/devices/{}?", d.id);
    layout(
        Some(viewer),
        &d.id,
        Nav::Devices,
        true,
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/devices" { "Devices" } " / " }
            h1 { (d.id) }
            section.card id="device-facts" data-live {
                p { (online_badge(d.online)) " " (compliance_badge(p.row.compliance)) }
                @if !p.row.attention.is_empty() {
                    div.alert role="note" { strong { "Needs attention: " } (p.row.attention.join("; ")) }
                }
                dl.facts {
                    dt { "Hardware" } dd { (hardware_of(d)) }
                    dt { "Tags" } dd { @for (k, v) in &d.tags { span.tag { (k) "=" (v) } " " } @if d.tags.is_empty() { "–" } }
                    dt { "Agent" } dd { (if d.agent_version.is_empty() { "–" } else { &d.agent_version }) }
                    dt { "Agent release" } dd { (agent_release(d)) @if let Some(a) = &d.agent { " (" (a.target) ")" } }
                    dt { "Last seen" } dd { (ago(p.now, d.last_seen)) }
                    dt { "First seen" } dd { (datetime(d.first_seen)) }
                    dt { "Desired state" } dd { "v" (d.desired_version) ", device reports " (opt(d.reported_desired_version, |v| format!("v{v}"))) }
                    @if let Some(r) = d.revoked_at { dt { "Revoked" } dd { (datetime(r)) } }
                }
                div.table-wrap {
                    table {
                        caption { "Models" }
                        thead { tr { th scope="col" { "Model" } th scope="col" { "Version" } th scope="col" { "Runtime" } th scope="col" { "Inferences" } th scope="col" { "Errors" } th scope="col" { "p95" } } }
                        tbody {
                            @for m in &d.models {
                                @let h = p.row.insight.as_ref().and_then(|i| i.models.iter().find(|h| h.name == m.name));
                                tr {
                                    th scope="row" { (m.name) } td.num { (m.version) } td { (m.runtime) }
                                    td.num { (opt(h.map(|h| h.inferences), |v| v.to_string())) }
                                    td.num { (opt(h.and_then(|h| h.error_pct()), |v| format!("{v:.1}%"))) }
                                    td.num { (opt(h.and_then(|h| h.p95_us), |v| format!("{:.1} ms", v / 1000.0))) }
                                }
                            }
                            @if d.models.is_empty() { tr { td colspan="6" { "Serves no model." } } }
                        }
                    }
                }
            }
            section.card {
                div.heading { h2 { "Health" } (window_links(&base, p.window)) }
                div.charts {
                    (line_chart("cpu", "CPU", "%", from, p.now, &[
                        Series::new("system", health(&|s| s.health.cpu_percent.map(f64::from))),
                        Series::new("agent", health(&|s| s.health.agent_cpu_percent.map(f64::from))),
                    ]))
                    (line_chart("memory", "Memory used", "%", from, p.now, &[
                        Series::new("system", health(&|s| (s.health.memory_total_bytes > 0).then(|| {
                            s.health.memory_total_bytes.saturating_sub(s.health.memory_available_bytes) as f64 * 100.0 / s.health.memory_total_bytes as f64
                        }))),
                    ]))
                    (line_chart("temperature", "Temperature", "°C", from, p.now, &[
                        Series::new("hottest sensor", health(&|s| s.health.temperatures.iter().map(|t| f64::from(t.celsius)).reduce(f64::max))),
                    ]))
                    (line_chart("outbox", "Outbox depth", "records", from, p.now, &[
                        Series::new("waiting", health(&|s| Some((s.outbox.depth + s.outbox.memory_depth) as f64))),
                    ]))
                }
            }
            @for (i, (name, version)) in models.iter().enumerate() {
                @let of = |f: &dyn Fn(&edgefleet_shared::ModelTelemetry) -> Option<f64>| -> Vec<(u64, f64)> {
                    t.iter().filter_map(|s| s.models.iter().find(|m| &m.name == name && m.version == *version).and_then(f).map(|v| (s.at, v))).collect()
                };
                section.card {
                    h2 { "Inference: " (name) "@" (version) }
                    div.charts {
                        (line_chart(&format!("latency-{i}"), "Latency", "ms", from, p.now, &[
                            Series::new("p50", of(&|m| m.p50_us.map(|v| v / 1000.0))),
                            Series::new("p95", of(&|m| m.p95_us.map(|v| v / 1000.0))),
                            Series::new("p99", of(&|m| m.p99_us.map(|v| v / 1000.0))),
                        ]))
                        (line_chart(&format!("errors-{i}"), "Error rate", "%", from, p.now, &[
                            Series::new("errors", of(&|m| {
                                let total = m.inferences + m.errors;
                                (total > 0).then(|| m.errors as f64 * 100.0 / total as f64)
                            })),
                        ]))
                    }
                }
            }
            section.card id="history" data-live {
                h2 { "Update history" }
                div.table-wrap {
                    table {
                        thead { tr { th scope="col" { "When" } th scope="col" { "Event" } th scope="col" { "Model" } th scope="col" { "Desired" } th scope="col" { "Reason" } } }
                        tbody {
                            @for e in p.events {
                                tr {
                                    td { (datetime(e.at)) }
                                    td { span class={"event " (e.kind)} { (e.kind.replace('_', " ")) } }
                                    td { @if let Some(m) = &e.model { (m) @if let Some(v) = e.model_version { "@" (v) } } @if let Some(v) = &e.agent_version { "agent " (v) } }
                                    td.num { (opt(e.desired_version, |v| format!("v{v}"))) }
                                    td { (e.reason.as_deref().unwrap_or("")) }
                                }
                            }
                            @if p.events.is_empty() { tr { td colspan="5" { "No update events yet." } } }
                        }
                    }
                }
            }
        },
    )
}

/// Where a model version runs.
#[derive(Debug, Clone, Default)]
pub struct Running {
    pub devices: usize,
    pub online: usize,
    pub by_hardware: BTreeMap<String, usize>,
}

pub fn models(
    viewer: &Viewer,
    now: u64,
    models: &[ModelRecord],
    running: &BTreeMap<(String, u64), Running>,
    drift: &[crate::drift::view::ModelDrift],
    quality: &[crate::quality::ModelQuality],
) -> Markup {
    let none = Running::default();
    layout(
        Some(viewer),
        "Models",
        Nav::Models,
        true,
        html! {
            h1 { "Models" }
            section.card id="model-list" data-live {
                div.table-wrap {
                    table {
                        thead { tr { th scope="col" { "Model" } th scope="col" { "Version" } th scope="col" { "Format" } th scope="col" { "Size" } th scope="col" { "SHA-256" } th scope="col" { "Pushed" } th scope="col" { "By" } th scope="col" { "Test vector" } th scope="col" { "Runs on" } } }
                        tbody {
                            @for m in models.iter().rev() {
                                @let r = running.get(&(m.name.clone(), m.version)).unwrap_or(&none);
                                tr {
                                    th scope="row" { (m.name) @if let Some(notes) = &m.notes { br; small { (notes) } } }
                                    td.num { (m.version) }
                                    td { (format!("{:?}", m.format).to_lowercase()) }
                                    td.num { (bytes(m.size)) }
                                    td { code title=(m.sha256) { (m.sha256.get(..12).unwrap_or(&m.sha256)) "…" } }
                                    td { (ago(now, m.created_at)) }
                                    td { (m.pushed_by.as_deref().unwrap_or("–")) }
                                    td { (if m.test_vector.is_some() { "yes" } else { "no" }) }
                                    td {
                                        a href={"/ui/devices?model=" (m.name) "@" (m.version)} { (r.devices) " devices" } " (" (r.online) " online)"
                                        @if !r.by_hardware.is_empty() {
                                            br;
                                            small.where {
                                                @for (i, (hw, n)) in r.by_hardware.iter().enumerate() {
                                                    @if i > 0 { " · " }
                                                    a href={"/ui/devices?model=" (m.name) "@" (m.version) "&hardware=" (hw)} { (hw) " " (n) }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                            @if models.is_empty() { tr { td colspan="9" { "No model pushed yet: " code { "fleetctl model push FILE --name NAME --version N" } } } }
                        }
                    }
                }
            }
            (drift::card(drift))
            (quality::card(quality))
        },
    )
}

#[cfg(test)]
mod tests;
