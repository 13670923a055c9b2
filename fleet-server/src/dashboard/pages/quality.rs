//! The models page's quality card: per model under an A/B test or with a
//! shadow candidate, each version's and variant's figures from the
//! devices' latest telemetry, and each candidate's agreement.

use maud::{html, Markup};

use crate::quality::ModelQuality;

fn pct(x: Option<f64>, scale: f64) -> String {
    x.map_or_else(|| "–".to_string(), |v| format!("{:.1} %", v * scale))
}

fn ms(us: Option<f64>) -> String {
    us.map_or_else(|| "–".to_string(), |v| format!("{:.2} ms", v / 1000.0))
}

/// The card (nothing when no model has a variant or a shadow candidate).
pub fn card(models: &[ModelQuality]) -> Markup {
    let shown: Vec<&ModelQuality> = models
        .iter()
        .filter(|m| !m.shadows.is_empty() || m.versions.iter().any(|v| v.variant.is_some()))
        .collect();
    if shown.is_empty() {
        return html! {};
    }
    html! {
        section.card id="model-quality" data-live {
            h2 { "A/B tests and shadow candidates" }
            p { small { "Inferences and errors since each version was activated, latency over the devices' latest interval; shadow agreement over the intervals this server has seen." } }
            div.table-wrap {
                table {
                    thead { tr { th scope="col" { "Model" } th scope="col" { "Version" } th scope="col" { "Variant" } th scope="col" { "Devices" } th scope="col" { "Inferences" } th scope="col" { "Share" } th scope="col" { "Errors" } th scope="col" { "p50" } th scope="col" { "p95" } } }
                    tbody {
                        @for m in &shown {
                            @for v in &m.versions {
                                tr data-model=(m.model) data-version=(v.version) data-variant=(v.variant.as_deref().unwrap_or("")) {
                                    th scope="row" { (m.model) }
                                    td.num { (v.version) }
                                    td { (v.variant.as_deref().unwrap_or("–")) }
                                    td.num { (v.devices) }
                                    td.num { (v.inferences) }
                                    td.num { (pct(v.share, 100.0)) }
                                    td.num { (pct(v.error_pct, 1.0)) }
                                    td.num { (ms(v.p50_us)) }
                                    td.num { (ms(v.p95_us)) }
                                }
                            }
                        }
                    }
                }
            }
            @if shown.iter().any(|m| !m.shadows.is_empty()) {
                div.table-wrap {
                    table {
                        thead { tr { th scope="col" { "Model" } th scope="col" { "Served" } th scope="col" { "Candidate" } th scope="col" { "Devices" } th scope="col" { "Compared" } th scope="col" { "Agreement" } th scope="col" { "Candidate errors" } th scope="col" { "Dropped" } th scope="col" { "Candidate p99" } } }
                        tbody {
                            @for m in &shown {
                                @for s in &m.shadows {
                                    tr data-model=(m.model) data-candidate=(s.candidate_version) data-agreement=(s.agreement.map(|a| format!("{a:.4}")).unwrap_or_default()) {
                                        th scope="row" { (m.model) }
                                        td.num { (s.version) }
                                        td.num { (s.candidate_version) }
                                        td.num { (s.devices) }
                                        td.num { (s.compared) }
                                        td.num { (pct(s.agreement, 100.0)) }
                                        td.num { (s.errors) }
                                        td.num { (s.dropped) }
                                        td.num { (ms(s.p99_us)) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
