//! `fleetctl model quality|split|split-end|promote|shadow|shadow-end`: a
//! model's versions in the field side by side, A/B tests and shadow
//! candidates.

use edgefleet_shared::quality::{Comparison, OutputComparison};
use fleet_server::api::types::{
    ModelQuality, PromoteRequest, QualityChanged, QualityTarget, ShadowRequest, SplitRequest,
};
use reqwest::Method;

use crate::cli::{ModelCommand, TargetArgs};
use crate::client::Answer;
use crate::commands::parse_tags;
use crate::failure::{usage, Failure};
use crate::output::print_table;
use crate::Context;

/// `OUTPUT=KIND[:X]` options: how each named output is compared.
pub fn parse_compare(options: &[String]) -> Result<Vec<OutputComparison>, Failure> {
    options
        .iter()
        .map(|o| {
            let bad = |why: &str| {
                usage(anyhow::anyhow!(
                    "--compare {o:?}: {why} (OUTPUT=top1, OUTPUT=cosine:MIN, OUTPUT=max_abs:LIMIT or OUTPUT=max_rel:LIMIT)"
                ))
            };
            let (output, kind) = o.split_once('=').ok_or_else(|| bad("no '='"))?;
            let (kind, figure) = match kind.split_once(':') {
                Some((k, x)) => (k, Some(x.parse::<f64>().map_err(|_| bad("not a number"))?)),
                None => (kind, None),
            };
            let comparison = match (kind, figure) {
                ("top1", None) => Comparison::Top1,
                ("cosine", Some(min)) => Comparison::Cosine { min },
                ("max_abs", Some(limit)) => Comparison::MaxAbs { limit },
                ("max_rel", Some(limit)) => Comparison::MaxRel { limit },
                _ => return Err(bad("unknown kind or missing figure")),
            };
            comparison.validate().map_err(|e| bad(&e))?;
            if output.is_empty() {
                return Err(bad("no output name"));
            }
            Ok(OutputComparison {
                output: output.to_string(),
                comparison,
            })
        })
        .collect()
}

fn target(args: &TargetArgs) -> Result<QualityTarget, Failure> {
    Ok(QualityTarget {
        devices: args.devices.clone(),
        all: args.all,
        tags: parse_tags(&args.tags)?,
    })
}

fn changed(ctx: &Context, answer: &Answer<QualityChanged>, what: String) {
    ctx.report(&answer.raw, || {
        format!(
            "{what}; signed desired state published to {} device(s)",
            answer.body.published.len()
        )
    });
}

fn percent(x: Option<f64>, scale: f64) -> String {
    x.map_or("-".into(), |v| format!("{:.1} %", v * scale))
}

fn ms(us: Option<f64>) -> String {
    us.map_or("-".into(), |v| format!("{:.2} ms", v / 1000.0))
}

/// The figures as two tables.
fn print_quality(q: &ModelQuality) {
    let rows: Vec<Vec<String>> = q
        .versions
        .iter()
        .map(|v| {
            vec![
                v.version.to_string(),
                v.variant.clone().unwrap_or_else(|| "-".into()),
                v.devices.to_string(),
                v.inferences.to_string(),
                percent(v.share, 100.0),
                percent(v.error_pct, 1.0),
                ms(v.p50_us),
                ms(v.p95_us),
            ]
        })
        .collect();
    print_table(
        &[
            "VERSION",
            "VARIANT",
            "DEVICES",
            "INFERENCES",
            "SHARE",
            "ERRORS",
            "P50",
            "P95",
        ],
        &rows,
    );
    if q.shadows.is_empty() {
        return;
    }
    println!();
    let rows: Vec<Vec<String>> = q
        .shadows
        .iter()
        .map(|s| {
            vec![
                s.version.to_string(),
                s.candidate_version.to_string(),
                s.devices.to_string(),
                s.compared.to_string(),
                percent(s.agreement, 100.0),
                s.errors.to_string(),
                s.dropped.to_string(),
                ms(s.p99_us),
            ]
        })
        .collect();
    print_table(
        &[
            "SERVED",
            "CANDIDATE",
            "DEVICES",
            "COMPARED",
            "AGREEMENT",
            "ERRORS",
            "DROPPED",
            "P99",
        ],
        &rows,
    );
}

/// Runs one of the commands above.
pub async fn run(ctx: &Context, command: &ModelCommand) -> Result<(), Failure> {
    match command {
        ModelCommand::Quality { name } => {
            let answer = ctx.client.model_quality(name).await?;
            if ctx.json {
                crate::output::print_json(&answer.raw);
            } else if answer.body.versions.is_empty() {
                println!("no device reports model {name} yet");
            } else {
                print_quality(&answer.body);
            }
        }
        ModelCommand::Split {
            name,
            version,
            share,
            experiment,
            target: t,
        } => {
            let sel = target(t)?;
            let body = SplitRequest {
                version: *version,
                share: *share,
                experiment: experiment.clone(),
                devices: sel.devices,
                all: sel.all,
                tags: sel.tags,
            };
            let answer = ctx
                .client
                .model_setting(Method::PUT, name, &["split"], &body)
                .await?;
            changed(
                ctx,
                &answer,
                format!(
                    "{name}: {:.0} % of client keys to v{version}",
                    share * 100.0
                ),
            );
        }
        ModelCommand::SplitEnd { name, target: t } => {
            let answer = ctx
                .client
                .model_setting(Method::DELETE, name, &["split"], &target(t)?)
                .await?;
            changed(ctx, &answer, format!("{name}: A/B test ended"));
        }
        ModelCommand::Promote {
            name,
            variant,
            version,
            target: t,
        } => {
            let version = match (variant.as_str(), version) {
                ("b", None) => Some(variant_b(ctx, name).await?),
                (_, v) => *v,
            };
            let sel = target(t)?;
            let body = PromoteRequest {
                variant: variant.clone(),
                version,
                devices: sel.devices,
                all: sel.all,
                tags: sel.tags,
            };
            let answer = ctx
                .client
                .model_setting(Method::POST, name, &["split", "promote"], &body)
                .await?;
            changed(ctx, &answer, format!("{name}: variant {variant} kept"));
        }
        ModelCommand::Shadow {
            name,
            version,
            sample_rate,
            compare,
            target: t,
        } => {
            let sel = target(t)?;
            let body = ShadowRequest {
                version: *version,
                sample_rate: *sample_rate,
                compare: parse_compare(compare)?,
                devices: sel.devices,
                all: sel.all,
                tags: sel.tags,
            };
            let answer = ctx
                .client
                .model_setting(Method::PUT, name, &["shadow"], &body)
                .await?;
            changed(ctx, &answer, format!("{name}: v{version} runs in shadow"));
        }
        ModelCommand::ShadowEnd { name, target: t } => {
            let answer = ctx
                .client
                .model_setting(Method::DELETE, name, &["shadow"], &target(t)?)
                .await?;
            changed(ctx, &answer, format!("{name}: shadow stopped"));
        }
        _ => unreachable!("not a quality command"),
    }
    Ok(())
}

/// The version devices serve as variant b, when there is exactly one.
async fn variant_b(ctx: &Context, name: &str) -> Result<u64, Failure> {
    let q = ctx.client.model_quality(name).await?.body;
    let mut versions: Vec<u64> = q
        .versions
        .iter()
        .filter(|v| v.variant.as_deref() == Some("b"))
        .map(|v| v.version)
        .collect();
    versions.dedup();
    match versions.as_slice() {
        [one] => Ok(*one),
        [] => Err(usage(anyhow::anyhow!(
            "no device reports a variant b of {name}: give --version"
        ))),
        many => Err(usage(anyhow::anyhow!(
            "devices report several variant b versions of {name} ({many:?}): give --version"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_are_parsed_and_bad_ones_named() {
        let parsed = parse_compare(&[
            "probabilities=top1".into(),
            "emb=cosine:0.99".into(),
            "x=max_abs:0.01".into(),
        ])
        .unwrap();
        assert_eq!(parsed[1].comparison, Comparison::Cosine { min: 0.99 });
        assert_eq!(parsed[2].comparison, Comparison::MaxAbs { limit: 0.01 });
        for bad in ["emb", "emb=cosine", "emb=cosine:2", "emb=median:1", "=top1"] {
            let e = parse_compare(&[bad.to_string()]).unwrap_err();
            let e = format!("{:#}", e.error);
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }
}
