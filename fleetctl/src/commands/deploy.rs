//! `fleetctl deploy`: points devices (some, tagged, or all) at a model
//! version; the server publishes each one's new signed desired state.

use fleet_server::api::types::DeployRequest;

use crate::commands::parse_tags;
use crate::failure::Failure;
use crate::Context;

/// Runs `deploy`.
pub async fn run(
    ctx: &Context,
    model: &str,
    version: u64,
    devices: &[String],
    all: bool,
    tags: &[String],
) -> Result<(), Failure> {
    let request = DeployRequest {
        model: model.to_string(),
        version,
        devices: devices.to_vec(),
        all,
        tags: parse_tags(tags)?,
    };
    let answer = ctx.client.deploy(&request).await?;
    ctx.report(&answer.raw, || {
        format!(
            "{model} v{version} deployed; signed desired state published to {} device(s)",
            answer.body.published.len()
        )
    });
    Ok(())
}
