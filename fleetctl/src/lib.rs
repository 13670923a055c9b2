//! `fleetctl`, the operator's command line for an edgefleet fleet server.
//!
//! [`cli`] defines the command line; [`run`] builds a typed API
//! [`client`] and hands the command to its module under [`commands`],
//! which prints through [`output`]. Failures carry their exit code
//! ([`failure`]): 0 success, 1 the server refused or failed the request,
//! 2 bad usage or local input, 3 the server could not be reached, 4 not
//! allowed (no token, a bad or revoked one, or too small a scope).

pub mod cli;
pub mod client;
pub mod commands;
pub mod failure;
pub mod flash;
pub mod output;

use cli::{Cli, Command};
use client::Client;
use failure::Failure;

/// What every command that talks to the server gets.
#[derive(Debug)]
pub struct Context {
    pub client: Client,
    /// Print the server's JSON instead of tables and sentences.
    pub json: bool,
}

impl Context {
    /// Prints `raw` with `--json`, else the sentence `say` makes.
    pub fn report(&self, raw: &serde_json::Value, say: impl FnOnce() -> String) {
        if self.json {
            output::print_json(raw);
        } else {
            println!("{}", say());
        }
    }
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        // Key management is local: no server, no token.
        Command::Keys { command } => commands::keys::run(command, cli.json),
        Command::Model { command } => commands::models::run(&context(&cli)?, command).await,
        Command::Agent { command } => commands::agent::run(&context(&cli)?, command).await,
        Command::Deploy {
            model,
            version,
            agent,
            allow_downgrade,
            devices,
            all,
            tags,
        } => {
            let what = match (agent, model, version) {
                (Some(release), _, _) => commands::deploy::What::Agent {
                    release,
                    allow_downgrade: *allow_downgrade,
                },
                (None, _, _) if *allow_downgrade => {
                    return Err(failure::usage(anyhow::anyhow!(
                    "--allow-downgrade goes with --agent VERSION: model versions only go forward"
                )))
                }
                (None, Some(model), Some(version)) => commands::deploy::What::Model {
                    model,
                    version: *version,
                },
                _ => {
                    return Err(failure::usage(anyhow::anyhow!(
                        "give --model NAME --version N, or --agent VERSION"
                    )))
                }
            };
            commands::deploy::run(&context(&cli)?, what, devices, *all, tags).await
        }
        Command::Devices { command } => {
            commands::devices::run(&context(&cli)?, command.as_ref()).await
        }
        Command::Broker { command } => commands::broker::run(&context(&cli)?, command).await,
        Command::Events { device, limit } => {
            commands::devices::events(&context(&cli)?, device, *limit).await
        }
        Command::Tokens { command } => commands::tokens::run(&context(&cli)?, command).await,
        Command::Rollout { command } => commands::rollout::run(&context(&cli)?, command).await,
        Command::Audit { after, limit } => {
            commands::audit::run(&context(&cli)?, *after, *limit).await
        }
    }
}

/// The client the global options describe: `--token`, else the token
/// file (none is fine: the server then says a token is needed).
fn context(cli: &Cli) -> Result<Context, Failure> {
    let token = match &cli.token {
        Some(t) => Some(t.clone()),
        None => std::fs::read_to_string(&cli.token_file).ok(),
    };
    Ok(Context {
        client: Client::new(&cli.server, token.as_deref(), cli.ca_cert.as_deref())?,
        json: cli.json,
    })
}
