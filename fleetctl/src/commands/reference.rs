//! `fleetctl model reference` and `fleetctl model drift`: set a model
//! version's drift reference (from a reference file, which the server
//! bins, or from a period of the traffic devices reported), and show a
//! model's drift scores. The reference file format is the server's
//! (`{"samples": [{"inputs": {NAME: [numbers]}, "outputs": {NAME:
//! [numbers]}}]}`); it is sent as read, so the server names what is wrong
//! with it.

use fleet_server::api::types::{ModelDrift, ReferenceSet, Score, TrafficPeriod};

use crate::cli::ReferenceCommand;
use crate::failure::{usage, Failure};
use crate::output::print_table;
use crate::Context;

/// Runs a `model reference` command.
pub async fn run(ctx: &Context, command: &ReferenceCommand) -> Result<(), Failure> {
    let answer = match command {
        ReferenceCommand::Set {
            name,
            version,
            file,
        } => {
            let body = std::fs::read(file)
                .map_err(|e| usage(anyhow::anyhow!("cannot read {}: {e}", file.display())))?;
            ctx.client.put_reference(name, *version, body).await?
        }
        ReferenceCommand::FromTraffic {
            name,
            version,
            since,
            until,
        } => {
            let now = edgefleet_shared::unix_now();
            let period = TrafficPeriod {
                since: parse_time(since, now)?,
                until: until
                    .as_deref()
                    .map(|u| parse_time(u, now))
                    .transpose()?
                    .unwrap_or(now),
            };
            ctx.client
                .reference_from_traffic(name, *version, &period)
                .await?
        }
    };
    ctx.report(&answer.raw, || set_line(&answer.body));
    Ok(())
}

/// The sentence a set reference is reported with.
pub fn set_line(set: &ReferenceSet) -> String {
    format!(
        "drift reference of {} v{} set from {} ({} samples): {}; {} device(s) re-published",
        set.model,
        set.version,
        set.reference.source,
        set.reference.samples,
        set.features.join(", "),
        set.published.len()
    )
}

/// A time: unix seconds, or an age before `now` (`90s`, `30m`, `2h`,
/// `1d`).
pub fn parse_time(text: &str, now: u64) -> Result<u64, Failure> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    let unit = match text.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86_400,
        _ => 0,
    };
    let amount = text
        .get(..text.len().saturating_sub(1))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|_| unit > 0);
    match amount {
        Some(n) => Ok(now.saturating_sub(n.saturating_mul(unit))),
        None => Err(usage(anyhow::anyhow!(
            "{text:?} is not a time: give unix seconds or an age like 90s, 30m, 2h, 1d"
        ))),
    }
}

/// Runs `model drift NAME`.
pub async fn drift(ctx: &Context, name: &str) -> Result<(), Failure> {
    let answer = ctx.client.model_drift(name).await?;
    if ctx.json {
        crate::output::print_json(&answer.raw);
    } else {
        print_table(
            &["VERSION", "SCOPE", "PSI", "DRIFTING", "WORST FEATURE"],
            &rows(&answer.body),
        );
    }
    Ok(())
}

/// The drift table's rows: per version the fleet, each class, each
/// device.
pub fn rows(drift: &ModelDrift) -> Vec<Vec<String>> {
    let row = |version: u64, scope: String, score: &Score| {
        let worst = score
            .features
            .iter()
            .filter(|f| f.psi.is_some())
            .max_by(|a, b| {
                a.psi
                    .partial_cmp(&b.psi)
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .map_or_else(|| "-".into(), |f| format!("{}/{}", f.tensor, f.feature));
        vec![
            version.to_string(),
            scope,
            score.psi.map_or_else(|| "-".into(), |p| format!("{p:.3}")),
            if score.drifting { "yes" } else { "no" }.into(),
            worst,
        ]
    };
    let mut out = Vec::new();
    for v in &drift.versions {
        if v.reference.is_none() {
            out.push(vec![
                v.version.to_string(),
                "-".into(),
                "-".into(),
                "no reference".into(),
                "-".into(),
            ]);
            continue;
        }
        if let Some(fleet) = &v.fleet {
            out.push(row(v.version, "fleet".into(), fleet));
        }
        for c in &v.classes {
            out.push(row(v.version, format!("class {}", c.class), &c.score));
        }
        for d in &v.devices {
            out.push(row(v.version, format!("device {}", d.device), &d.score));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_unix_seconds_or_ages() {
        assert_eq!(parse_time("1700000000", 5).unwrap(), 1_700_000_000);
        assert_eq!(parse_time("2h", 10_000).unwrap(), 10_000 - 7200);
        assert_eq!(parse_time("30m", 10_000).unwrap(), 10_000 - 1800);
        assert_eq!(parse_time("1d", 100).unwrap(), 0);
        assert!(parse_time("soon", 1).is_err());
        assert!(parse_time("2w", 1).is_err());
    }
}
