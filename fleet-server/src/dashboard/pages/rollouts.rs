//! The rollout pages: the list of rollouts with the form that creates one,
//! and one rollout's phase, waves, devices held back and gates, with the
//! operator's actions on it. They render the API's own rollout types.

use maud::{html, Markup};

use super::{datetime, layout, Nav, Viewer};
use crate::api::types::{RolloutStatus, RolloutSummary};
use crate::rollout::{DeviceState, Phase};
use crate::store::ModelRecord;

/// A phase's name as the API spells it, and the reason it carries.
fn phase_of(phase: &Phase) -> (&'static str, Option<&str>) {
    match phase {
        Phase::Created => ("created", None),
        Phase::Running { .. } => ("running", None),
        Phase::AwaitingApproval { .. } => ("awaiting_approval", None),
        Phase::Paused { reason, .. } => ("paused", Some(reason)),
        Phase::Aborted { reason } => ("aborted", Some(reason)),
        Phase::Completed => ("completed", None),
    }
}

/// The wave a rollout is in, while it has one.
fn current_wave(phase: &Phase) -> Option<usize> {
    match phase {
        Phase::Running { wave, .. } | Phase::Paused { wave, .. } => Some(*wave),
        _ => None,
    }
}

/// A device state's name as the API spells it, and the reason it carries.
fn state_of(state: &DeviceState) -> (&'static str, Option<&str>) {
    match state {
        DeviceState::Waiting => ("waiting", None),
        DeviceState::Updating { .. } => ("updating", None),
        DeviceState::Backoff { .. } => ("backoff", None),
        DeviceState::Confirmed { .. } => ("confirmed", None),
        DeviceState::Failed { reason } => ("failed", Some(reason)),
        DeviceState::Reverted => ("reverted", None),
        DeviceState::Offline { .. } => ("offline", None),
        DeviceState::Excluded => ("excluded", None),
    }
}

fn phase_badge(r: &RolloutSummary) -> Markup {
    let (phase, _) = phase_of(&r.phase);
    html! { span class={"badge phase " (phase)} { (phase.replace('_', " ")) } }
}

/// What a rollout moves devices to: `digits@2`, `agent 1.2.0`.
fn moves(r: &RolloutSummary) -> String {
    match &r.agent {
        Some(release) => format!("agent {release}"),
        None => format!("{}@{}", r.model, r.version),
    }
}

fn progress(r: &RolloutSummary) -> Markup {
    let n = |k: &str| r.counts.get(k).copied().unwrap_or(0);
    let total: usize = r.counts.values().sum();
    html! {
        span.progress {
            (n("confirmed")) " / " (total) " confirmed"
            @if n("failed") + n("reverted") > 0 { ", " span.bad { (n("failed") + n("reverted")) " failed" } }
        }
    }
}

pub struct RolloutsPage<'a> {
    pub rollouts: &'a [RolloutSummary],
    pub models: &'a [ModelRecord],
    pub hardware: &'a [String],
}

pub fn rollouts(viewer: &Viewer, p: &RolloutsPage<'_>) -> Markup {
    layout(
        Some(viewer),
        "Rollouts",
        Nav::Rollouts,
        true,
        html! {
            h1 { "Rollouts" }
            section.card id="rollout-list" data-live {
                div.table-wrap {
                    table {
                        thead { tr { th scope="col" { "Rollout" } th scope="col" { "Model" } th scope="col" { "Phase" } th scope="col" { "Progress" } th scope="col" { "Created" } } }
                        tbody {
                            @for r in p.rollouts.iter().rev() {
                                tr {
                                    th scope="row" { a href={"/ui/rollouts/" (r.id)} { (r.id) } }
                                    td { (moves(r)) }
                                    td { (phase_badge(r)) }
                                    td { (progress(r)) }
                                    td { (datetime(r.created_at)) }
                                }
                            }
                            @if p.rollouts.is_empty() { tr { td colspan="5" { "No rollout yet." } } }
                        }
                    }
                }
            }
            @if viewer.can_write() {
                section.card {
                    h2 { "New rollout" }
                    @if p.models.is_empty() {
                        p { "Push a model first: " code { "fleetctl model push FILE --name NAME --version N" } }
                    } @else {
                        form.stacked id="new-rollout" {
                            div.field { label for="r-id" { "Name" } input id="r-id" name="id" required pattern="[A-Za-z0-9._\\-]{1,64}" placeholder="e.g. digits-v3"; }
                            div.field {
                                label for="r-model" { "Model version" }
                                select id="r-model" name="model" required {
                                    @for m in p.models.iter().rev() { option value={(m.name) "@" (m.version)} { (m.name) "@" (m.version) } }
                                }
                            }
                            div.field {
                                label for="r-target" { "Devices" }
                                select id="r-target" name="target" {
                                    option value="all" { "every device" }
                                    @for h in p.hardware { option value={"hardware:" (h)} { "hardware " (h) } }
                                }
                            }
                            div.field { label for="r-tags" { "Only with tags" } input id="r-tags" name="tags" placeholder="site=lab, ring=beta"; }
                            div.field { label for="r-waves" { "Waves (cumulative)" } input id="r-waves" name="waves" value="1, 10%, 50%, 100%" aria-describedby="r-waves-help"; small id="r-waves-help" { "Device counts or percentages, each including the waves before." } }
                            div.field { label for="r-soak" { "Soak per wave (s)" } input id="r-soak" name="soak" type="number" min="0" value="60"; }
                            div.field.check { input id="r-approval" name="approval" type="checkbox"; label for="r-approval" { "Wait for approval between waves" } }
                            button type="submit" { "Create rollout" }
                        }
                    }
                }
            }
        },
    )
}

pub fn rollout(viewer: &Viewer, status: &RolloutStatus) -> Markup {
    let r = &status.summary;
    let id = r.id.as_str();
    let (phase, reason) = phase_of(&r.phase);
    let action = |name: &str, label: &str, confirm: Option<String>, class: &str| {
        html! {
            button type="button" class=(class) data-api={"/api/v1/rollouts/" (id) "/" (name)} data-confirm=[confirm] data-done={"Rollout " (id) ": " (name) " done"} { (label) }
        }
    };
    let waves = status.waves.as_deref().unwrap_or_default();
    let held_back: Vec<(&String, &'static str, Option<&str>)> = status
        .devices
        .iter()
        .flatten()
        .map(|(device, s)| {
            let (state, reason) = state_of(s);
            (device, state, reason)
        })
        .filter(|(_, state, _)| matches!(*state, "failed" | "offline" | "backoff"))
        .collect();
    // The gates as the API shows them, field by field.
    let gates = match serde_json::to_value(&r.gates) {
        Ok(serde_json::Value::Object(fields)) => fields,
        _ => Default::default(),
    };
    use crate::rollout::KIND_NAMES as KINDS;
    layout(
        Some(viewer),
        &format!("Rollout {id}"),
        Nav::Rollouts,
        true,
        html! {
            nav.crumbs aria-label="Breadcrumb" { a href="/ui/rollouts" { "Rollouts" } " / " }
            h1 { "Rollout " (id) }
            section.card id="rollout-state" data-live {
                p.phase-line {
                    (phase_badge(r)) " "
                    (moves(r)) " · " (progress(r))
                    @if let Some(wave) = current_wave(&r.phase) { " · wave " (wave + 1) " of " (waves.len()) }
                }
                @if let Some(reason) = reason { p.alert role="note" { strong { (if phase == "paused" { "Paused: " } else { "Why: " }) } (reason) } }
                @if phase == "awaiting_approval" { p.alert role="note" { "Waiting for an operator to approve wave " (match r.phase { Phase::AwaitingApproval { next } => next + 1, _ => 0 }) "." } }
                @if viewer.can_write() {
                    div.actions {
                        @if phase == "created" { (action("start", "Start", Some(format!("Start rollout {id}?")), "primary")) }
                        @if matches!(phase, "running" | "awaiting_approval") { (action("pause", "Pause", None, "")) }
                        @if phase == "paused" { (action("resume", "Resume", Some(format!("Resume rollout {id}?")), "primary")) }
                        @if phase == "awaiting_approval" { (action("approve", "Approve next wave", Some(format!("Approve the next wave of {id}?")), "primary")) }
                        @if !matches!(phase, "completed" | "aborted") { (action("abort", "Abort", Some(format!("Abort rollout {id}? Devices that moved are sent back to their previous version.")), "danger")) }
                    }
                }
                div.table-wrap {
                    table {
                        caption { "Devices per state and wave" }
                        thead { tr { th scope="col" { "Wave" } th scope="col" { "Size" } @for k in KINDS { th scope="col" { (k) } } } }
                        tbody {
                            @for (i, w) in r.wave_counts.iter().enumerate() {
                                tr {
                                    th scope="row" { (i + 1) }
                                    td.num { (w.get("size").copied().unwrap_or(0)) }
                                    @for k in KINDS { td.num { (w.get(k).copied().unwrap_or(0)) } }
                                }
                            }
                        }
                        tfoot {
                            tr {
                                th scope="row" { "All" }
                                td.num { (r.counts.values().sum::<usize>()) }
                                @for k in KINDS { td.num { (r.counts.get(k).copied().unwrap_or(0)) } }
                            }
                        }
                    }
                }
                @if !held_back.is_empty() {
                    div.table-wrap {
                        table {
                            caption { "Devices held back" }
                            thead { tr { th scope="col" { "Device" } th scope="col" { "State" } th scope="col" { "Reason" } @if viewer.can_write() { th scope="col" { "Action" } } } }
                            tbody {
                                @for (device, state, reason) in held_back.iter().take(50) {
                                    tr {
                                        th scope="row" { a href={"/ui/devices/" (device)} { (device) } }
                                        td { (state) }
                                        td { (reason.unwrap_or("")) }
                                        @if viewer.can_write() {
                                            td {
                                                button type="button" data-api={"/api/v1/rollouts/" (id) "/devices/" (device) "/retry"} data-done={"Retrying " (device)} { "Retry" } " "
                                                button type="button" data-api={"/api/v1/rollouts/" (id) "/devices/" (device) "/exclude"} data-confirm={"Exclude " (device) " from " (id) "?"} data-done={"Excluded " (device)} { "Exclude" }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            section.card {
                h2 { "Gates" }
                dl.facts {
                    @for (k, v) in &gates {
                        dt { (k.replace('_', " ")) } dd { (if v.is_null() { "–".to_string() } else { v.to_string().trim_matches('"').to_string() }) }
                    }
                }
                h2 { "Selection" }
                pre.json { (serde_json::to_string_pretty(&r.selection).unwrap_or_default()) }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::auth::Scope;

    fn paused_rollout() -> RolloutStatus {
        use crate::rollout::{Gates, Selection};
        let mut devices = BTreeMap::new();
        devices.insert(
            "cam-1".to_string(),
            DeviceState::Failed {
                reason: "test vector failed".into(),
            },
        );
        devices.insert("cam-2".to_string(), DeviceState::Waiting);
        RolloutStatus {
            summary: RolloutSummary {
                id: "digits-v2".into(),
                model: "digits".into(),
                version: 2,
                agent: None,
                created_at: 0,
                selection: Selection::default(),
                phase: Phase::Paused {
                    wave: 0,
                    reason: "failure threshold crossed".into(),
                },
                wave_counts: vec![
                    [("size".to_string(), 1), ("failed".to_string(), 1)].into(),
                    [("size".to_string(), 1), ("waiting".to_string(), 1)].into(),
                ],
                counts: [("failed".to_string(), 1), ("waiting".to_string(), 1)].into(),
                gates: Gates::default(),
                shadow: Vec::new(),
            },
            waves: Some(vec![vec!["cam-1".into()], vec!["cam-2".into()]]),
            devices: Some(devices),
        }
    }

    fn writer() -> Viewer {
        Viewer {
            name: "ops".into(),
            scope: Scope::Write,
            csrf: "t".into(),
        }
    }

    #[test]
    fn a_rollout_page_shows_its_phase_and_the_devices_held_back() {
        let page = rollout(&writer(), &paused_rollout()).into_string();
        assert!(page.contains("Paused: "), "{page}");
        assert!(page.contains("failure threshold crossed"));
        assert!(page.contains(" · wave 1 of 2"));
        assert!(page.contains("0 / 2 confirmed"));
        assert!(page.contains("test vector failed"));
        assert!(page.contains("/api/v1/rollouts/digits-v2/devices/cam-1/retry"));
        // Only held-back devices get a row of their own.
        assert!(!page.contains("/devices/cam-2/retry"));
        assert!(page.contains("/api/v1/rollouts/digits-v2/resume"));
        assert!(!page.contains("/api/v1/rollouts/digits-v2/start"));
    }

    #[test]
    fn the_rollout_list_links_each_rollout_with_its_phase() {
        let paused = paused_rollout().summary;
        let done = RolloutSummary {
            id: "old".into(),
            phase: Phase::Completed,
            ..paused.clone()
        };
        let page = rollouts(
            &writer(),
            &RolloutsPage {
                rollouts: &[paused, done],
                models: &[],
                hardware: &[],
            },
        )
        .into_string();
        assert!(page.contains("href=\"/ui/rollouts/digits-v2\""), "{page}");
        assert!(page.contains("badge phase paused"));
        assert!(page.contains("badge phase completed"));
    }
}
