//! `fleetctl deploy`: points devices (some, tagged, or all) at a model
//! version or at an agent release; the server publishes each one's new
//! signed desired state.

use fleet_server::api::types::{AgentDeployRequest, DeployRequest};

use crate::commands::parse_tags;
use crate::failure::Failure;
use crate::Context;

/// What a deployment points devices at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What<'a> {
    Model {
        model: &'a str,
        version: u64,
    },
    Agent {
        release: &'a str,
        allow_downgrade: bool,
    },
}

/// Runs `deploy`.
pub async fn run(
    ctx: &Context,
    what: What<'_>,
    devices: &[String],
    all: bool,
    tags: &[String],
) -> Result<(), Failure> {
    let tags = parse_tags(tags)?;
    match what {
        What::Model { model, version } => {
            let request = DeployRequest {
                model: model.to_string(),
                version,
                devices: devices.to_vec(),
                all,
                tags,
            };
            let answer = ctx.client.deploy(&request).await?;
            ctx.report(&answer.raw, || {
                format!(
                    "{model} v{version} deployed; signed desired state published to {} device(s)",
                    answer.body.published.len()
                )
            });
        }
        What::Agent {
            release,
            allow_downgrade,
        } => {
            let request = AgentDeployRequest {
                version: release.to_string(),
                devices: devices.to_vec(),
                all,
                tags,
                allow_downgrade,
            };
            let answer = ctx.client.deploy_agent(&request).await?;
            ctx.report(&answer.raw, || {
                format!(
                    "agent {release} deployed{}; signed desired state published to {} device(s)",
                    if allow_downgrade {
                        " (downgrade allowed)"
                    } else {
                        ""
                    },
                    answer.body.published.len()
                )
            });
        }
    }
    Ok(())
}
