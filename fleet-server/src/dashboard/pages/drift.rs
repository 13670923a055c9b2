//! The models page's drift card: per model version with a reference, the
//! fleet-wide score, each hardware class's and the worst device's, each
//! coloured against the server's alert threshold (`.bad` at or over it,
//! `.warn`-coloured badge at 0.1 and over, the usual "moderate shift"
//! reading of PSI, `.ok` below).

use maud::{html, Markup};

use crate::drift::view::{ModelDrift, Score};

/// PSI at or over this reads as a moderate shift.
const MODERATE_PSI: f64 = 0.1;

/// A score, coloured.
fn psi_cell(score: Option<&Score>, threshold: f64) -> Markup {
    let Some(psi) = score.and_then(|s| s.psi) else {
        return html! { td.num { "–" } };
    };
    let class = if psi >= threshold {
        "bad"
    } else if psi >= MODERATE_PSI {
        "badge rolled_back"
    } else {
        "ok"
    };
    let worst = score
        .into_iter()
        .flat_map(|s| &s.features)
        .filter(|f| f.psi.is_some())
        .max_by(|a, b| {
            a.psi
                .partial_cmp(&b.psi)
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|f| format!("worst feature: {}/{}", f.tensor, f.feature))
        .unwrap_or_default();
    html! { td.num { span class=(class) title=(worst) data-psi=(format!("{psi:.4}")) { (format!("{psi:.3}")) } } }
}

/// The drift card (nothing when no model has a reference).
pub fn card(drift: &[ModelDrift]) -> Markup {
    let scored: Vec<_> = drift
        .iter()
        .flat_map(|m| {
            m.versions
                .iter()
                .filter(|v| v.reference.is_some())
                .map(move |v| (m, v))
        })
        .collect();
    if scored.is_empty() {
        return html! {};
    }
    html! {
        section.card id="model-drift" data-live {
            h2 { "Drift" }
            p { small { "Largest feature PSI against each version's reference: fleet and hardware classes over the last " (drift[0].window_secs / 60) " minutes, devices over their latest interval. Drifting at " (drift[0].threshold) " or more." } }
            div.table-wrap {
                table {
                    thead { tr { th scope="col" { "Model" } th scope="col" { "Version" } th scope="col" { "State" } th scope="col" { "Fleet" } th scope="col" { "By hardware class" } th scope="col" { "Worst device" } } }
                    tbody {
                        @for (m, v) in &scored {
                            @let drifting = v.fleet.as_ref().is_some_and(|s| s.drifting) || v.devices.iter().any(|d| d.score.drifting);
                            @let worst = v.devices.iter().filter(|d| d.score.psi.is_some()).max_by(|a, b| a.score.psi.partial_cmp(&b.score.psi).unwrap_or(std::cmp::Ordering::Equal));
                            tr data-model=(m.model) data-version=(v.version) {
                                th scope="row" { (m.model) }
                                td.num { (v.version) }
                                td { @if drifting { span.bad { "drifting" } } @else if v.fleet.is_none() { "no data yet" } @else { span.ok { "stable" } } }
                                (psi_cell(v.fleet.as_ref(), m.threshold))
                                td {
                                    @for (i, c) in v.classes.iter().enumerate() {
                                        @if i > 0 { " · " }
                                        (c.class) " " (c.score.psi.map_or_else(|| "–".to_string(), |p| format!("{p:.3}")))
                                        @if c.score.drifting { " " span.bad { "drifting" } }
                                    }
                                }
                                @match worst {
                                    Some(d) => td { a href={"/ui/devices/" (d.device)} { (d.device) } " " (psi_cell(Some(&d.score), m.threshold)) },
                                    None => td { "–" },
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
