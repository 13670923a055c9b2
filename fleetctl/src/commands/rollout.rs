//! `fleetctl rollout`: staged rollouts. `create` turns the wave and gate
//! flags into a typed request (or, with `--dry-run`, shows the plan);
//! `status`, the phase actions and per-device decisions print one line
//! per rollout (the server's JSON with `--json`).

use fleet_server::api::types::{CreateRollout, RolloutStatus};
use fleet_server::rollout::{FailureAction, Gates, Phase, WaveSize};

use crate::cli::{CreateRolloutArgs, RolloutCommand};
use crate::client::RolloutAction;
use crate::commands::parse_tags;
use crate::failure::{usage, Failure};
use crate::output::print_json;
use crate::Context;

/// Runs a `rollout` command.
pub async fn run(ctx: &Context, command: &RolloutCommand) -> Result<(), Failure> {
    let answer = match command {
        RolloutCommand::Create(args) => ctx.client.create_rollout(&request(args)?).await?,
        RolloutCommand::Status { id: None, .. } => {
            let answer = ctx.client.list_rollouts().await?;
            if ctx.json {
                print_json(&answer.raw);
            } else {
                let lines: Vec<String> = answer.body.iter().map(line).collect();
                println!("{}", lines.join("\n"));
            }
            return Ok(());
        }
        RolloutCommand::Status {
            id: Some(id),
            brief,
        } => {
            // The line needs no per-device states.
            let brief = *brief || !ctx.json;
            ctx.client.get_rollout(id, brief).await?
        }
        RolloutCommand::Device { id, device, action } => {
            ctx.client.rollout_device_action(id, device, action).await?
        }
        RolloutCommand::Start { id } => ctx.client.rollout_action(id, RolloutAction::Start).await?,
        RolloutCommand::Pause { id } => ctx.client.rollout_action(id, RolloutAction::Pause).await?,
        RolloutCommand::Resume { id } => {
            ctx.client.rollout_action(id, RolloutAction::Resume).await?
        }
        RolloutCommand::Approve { id } => {
            ctx.client
                .rollout_action(id, RolloutAction::Approve)
                .await?
        }
        RolloutCommand::Abort { id } => ctx.client.rollout_action(id, RolloutAction::Abort).await?,
    };
    ctx.report(&answer.raw, || line(&answer.body));
    Ok(())
}

/// The request `rollout create` sends.
pub fn request(args: &CreateRolloutArgs) -> Result<CreateRollout, Failure> {
    let waves = match &args.waves {
        Some(w) => parse_waves(w)?,
        None => Vec::new(),
    };
    let ramp = args.ramp.as_deref().map(parse_ramp).transpose()?;
    let failure_action = match args.on_failure.as_str() {
        "pause" => FailureAction::Pause,
        "abort" => FailureAction::Abort,
        _ => {
            return Err(usage(anyhow::anyhow!(
                "--on-failure must be pause or abort"
            )))
        }
    };
    let gates = Gates {
        success_pct: args.success_pct,
        failure_pct: args.failure_pct,
        failure_action,
        soak_secs: args.soak_secs,
        manual_approval: args.approve_each,
        max_in_flight: args.max_in_flight,
        device_timeout_secs: args.device_timeout_secs,
        retries: args.retries,
        offline_grace_secs: args.offline_grace_secs,
        max_error_pct: args.max_error_pct,
        max_p95_ms: args.max_p95_ms,
        max_drift_psi: args.max_drift_psi,
        min_inferences: args.min_inferences,
        min_shadow_agreement: args.min_shadow_agreement,
        min_shadow_requests: args.min_shadow_requests,
        shadow_sample_rate: args.shadow_sample_rate,
        shadow_compare: super::quality::parse_compare(&args.shadow_compare)?,
        ..Gates::default()
    };
    if args.allow_downgrade && args.agent.is_none() {
        return Err(usage(anyhow::anyhow!(
            "--allow-downgrade goes with --agent VERSION: model versions only go forward"
        )));
    }
    Ok(CreateRollout {
        id: args.id.clone(),
        model: args.model.clone().unwrap_or_default(),
        version: args.version.unwrap_or_default(),
        agent: args.agent.clone(),
        allow_downgrade: args.allow_downgrade,
        devices: args.devices.clone(),
        all: args.all,
        tags: parse_tags(&args.tags)?,
        hardware: args.hardware.clone(),
        waves,
        ramp,
        gates: Some(gates),
        dry_run: args.dry_run,
    })
}

/// `--waves 1,5%,100%`: cumulative wave sizes, counts or percents.
pub fn parse_waves(text: &str) -> Result<Vec<WaveSize>, Failure> {
    text.split(',')
        .map(|w| {
            let w = w.trim();
            match w.strip_suffix('%') {
                Some(p) => p.parse::<f64>().ok().map(WaveSize::Percent),
                None => w.parse::<u32>().ok().map(WaveSize::Count),
            }
            .ok_or_else(|| {
                usage(anyhow::anyhow!(
                    "wave {w:?} is not a count or a percent (N%)"
                ))
            })
        })
        .collect()
}

/// `--ramp BASE,FACTOR`: an exponential ramp.
fn parse_ramp(text: &str) -> Result<(u32, f64), Failure> {
    text.split_once(',')
        .and_then(|(b, f)| Some((b.trim().parse::<u32>().ok()?, f.trim().parse::<f64>().ok()?)))
        .ok_or_else(|| usage(anyhow::anyhow!("--ramp {text:?} must be BASE,FACTOR")))
}

/// One rollout on one line: what it moves, its phase, confirmed devices
/// per wave and its counts per state.
pub fn line(status: &RolloutStatus) -> String {
    let r = &status.summary;
    let what = match &r.phase {
        Phase::Created => "created".to_string(),
        Phase::Running { wave, .. } => match r.shadow.get(*wave).filter(|s| !s.passed) {
            Some(s) if s.started.is_some() => format!(
                "running wave {wave}, its devices running v{} in shadow: {} of {} requests compared, agreement {}",
                r.version,
                s.total(),
                r.gates.min_shadow_requests,
                s.agreement().map_or("-".into(), |a| format!("{a:.3}"))
            ),
            _ => format!("running wave {wave}"),
        },
        Phase::Paused { wave, reason } => format!("paused in wave {wave}: {reason}"),
        Phase::AwaitingApproval { next } => format!("waiting for approval of wave {next}"),
        Phase::Aborted { reason } => format!("aborted: {reason}"),
        Phase::Completed => "completed".to_string(),
    };
    let waves: Vec<String> = r
        .wave_counts
        .iter()
        .map(|w| {
            let count = |key: &str| w.get(key).copied().unwrap_or(0);
            format!("{}/{}", count("confirmed"), count("size"))
        })
        .collect();
    let counts = serde_json::to_string(&r.counts).unwrap_or_default();
    let moves = match &r.agent {
        Some(release) => format!("agent {release}"),
        None => format!("{} v{}", r.model, r.version),
    };
    format!(
        "{} {moves}: {what}; confirmed per wave [{}]; {counts}",
        r.id,
        waves.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_are_counts_or_percents() {
        assert_eq!(
            parse_waves("1, 5%,100%").expect("valid waves"),
            vec![
                WaveSize::Count(1),
                WaveSize::Percent(5.0),
                WaveSize::Percent(100.0)
            ]
        );
        let bad = parse_waves("1,half").expect_err("not a wave");
        assert!(bad.error.to_string().contains("\"half\""), "{}", bad.error);
    }

    #[test]
    fn ramps_need_a_base_and_a_factor() {
        assert_eq!(parse_ramp("2, 3.5").expect("a ramp"), (2, 3.5));
        assert!(parse_ramp("2").is_err());
        assert!(parse_ramp("x,3").is_err());
    }

    #[test]
    fn status_lines_say_the_phase_and_progress() {
        let status: RolloutStatus = serde_json::from_value(serde_json::json!({
            "id": "digits-v2", "model": "digits", "version": 2, "created_at": 1,
            "selection": {"devices": [], "all": true, "tags": {}, "hardware": null},
            "phase": {"phase": "paused", "wave": 1, "reason": "too many failures"},
            "wave_counts": [{"size": 1, "confirmed": 1}, {"size": 4, "failed": 2, "waiting": 2}],
            "counts": {"confirmed": 1, "failed": 2, "waiting": 2},
            "gates": Gates::default(),
        }))
        .expect("a rollout status");
        assert_eq!(
            line(&status),
            "digits-v2 digits v2: paused in wave 1: too many failures; confirmed per wave [1/1, 0/4]; {\"confirmed\":1,\"failed\":2,\"waiting\":2}"
        );
    }
}
