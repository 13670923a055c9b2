//! `fleetctl tokens`: operator tokens (admin scope). A created token is
//! printed once; listings never show secrets.

use fleet_server::api::types::Token;

use crate::cli::TokensCommand;
use crate::failure::Failure;
use crate::output::{ago, print_json, print_table};
use crate::Context;

/// Runs a `tokens` command.
pub async fn run(ctx: &Context, command: &TokensCommand) -> Result<(), Failure> {
    match command {
        TokensCommand::Create { name, scope } => {
            let answer = ctx.client.create_token(name, *scope).await?;
            let made = &answer.body;
            ctx.report(&answer.raw, || {
                format!(
                    "created token {} ({}, scope {}); it is shown only now:\n{}",
                    made.record.id,
                    made.record.name,
                    made.record.scope.as_str(),
                    made.token
                )
            });
        }
        TokensCommand::List => {
            let answer = ctx.client.list_tokens().await?;
            if ctx.json {
                print_json(&answer.raw);
            } else {
                print_table(
                    &["ID", "NAME", "SCOPE", "CREATED", "STATE"],
                    &rows(&answer.body),
                );
            }
        }
        TokensCommand::Revoke { id } => {
            let answer = ctx.client.revoke_token(id).await?;
            ctx.report(&answer.raw, || format!("revoked token {id}"));
        }
    }
    Ok(())
}

/// The token table's rows.
pub fn rows(tokens: &[Token]) -> Vec<Vec<String>> {
    tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                t.scope.as_str().into(),
                ago(t.created_at),
                t.revoked_at
                    .map_or("active".into(), |at| format!("revoked {}", ago(at))),
            ]
        })
        .collect()
}
