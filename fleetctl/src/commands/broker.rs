//! `fleetctl broker mosquitto`: the password and ACL files an external
//! Mosquitto needs to authenticate the fleet's devices (each kept under
//! its own topics) and the server's own user.

use std::path::Path;

use anyhow::Context as _;

use crate::cli::BrokerCommand;
use crate::failure::{usage, Failure};
use crate::Context;

/// Runs a `broker` command.
pub async fn run(ctx: &Context, command: &BrokerCommand) -> Result<(), Failure> {
    let BrokerCommand::Mosquitto {
        out,
        server_user,
        server_password,
    } = command;
    let files = ctx.client.mosquitto_files(server_user).await?.body;
    let passwords = format!(
        "{server_user}:{}\n{}",
        fleet_server::auth::mosquitto_hash(server_password),
        files.password_file
    );
    write_files(out, &passwords, &files.acl_file).map_err(usage)?;
    println!(
        "wrote {0}/passwords and {0}/acl; in mosquitto.conf: allow_anonymous false, password_file {0}/passwords, acl_file {0}/acl (then reload Mosquitto)",
        out.display()
    );
    Ok(())
}

/// Writes `passwords` (owner-only: it holds password hashes) and `acl`
/// into `dir`, creating it.
fn write_files(dir: &Path, passwords: &str, acl: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("passwords");
    edgefleet_shared::secret_file::write(&path, passwords.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let path = dir.join("acl");
    std::fs::write(&path, acl).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
