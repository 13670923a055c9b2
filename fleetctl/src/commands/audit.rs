//! `fleetctl audit`: operator actions, oldest first (admin scope).

use crate::failure::Failure;
use crate::output::{ago, print_json, print_table};
use crate::Context;

/// Runs `audit`: entries after id `after`, at most `limit`.
pub async fn run(ctx: &Context, after: u64, limit: u32) -> Result<(), Failure> {
    let answer = ctx.client.list_audit(after, limit).await?;
    if ctx.json {
        print_json(&answer.raw);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answer
        .body
        .into_iter()
        .map(|a| {
            vec![
                a.id.to_string(),
                ago(a.entry.at),
                a.entry.actor,
                a.entry.action,
                a.entry.target,
            ]
        })
        .collect();
    print_table(&["ID", "WHEN", "WHO", "ACTION", "TARGET"], &rows);
    Ok(())
}
