//! `fleetctl model`: the model registry. `push` streams a model file up
//! (with a progress bar) and then its attachments; `list` and `delete`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fleet_server::api::types::ModelRecord;

use crate::cli::ModelCommand;
use crate::client::Attachment;
use crate::failure::{usage, Failure};
use crate::output::{ago, print_json, print_table};
use crate::Context;

/// The model table's columns.
const HEADERS: [&str; 8] = [
    "NAME", "VERSION", "FORMAT", "SIZE", "SHA256", "PUSHED", "BY", "NOTES",
];

/// Runs a `model` command.
pub async fn run(ctx: &Context, command: &ModelCommand) -> Result<(), Failure> {
    match command {
        ModelCommand::Push {
            file,
            name,
            version,
            format,
            notes,
            test_vector,
            spec,
            reference,
        } => {
            // Read the attachments first: a missing file fails before
            // uploading.
            let attachments = [
                (
                    Attachment::TestVector,
                    read_optional(test_vector.as_deref())?,
                ),
                (Attachment::Spec, read_optional(spec.as_deref())?),
            ];
            let reference = read_optional(reference.as_deref())?;
            let mut answer = push(
                ctx,
                file,
                name,
                *version,
                format.as_deref(),
                notes.as_deref(),
            )
            .await?;
            for (attachment, body) in attachments {
                let Some(body) = body else { continue };
                answer = ctx
                    .client
                    .put_attachment(name, *version, attachment, body)
                    .await
                    .map_err(|e| {
                        Failure::from(e).context(format!(
                            "{name} v{version} was pushed but its {} was refused",
                            attachment.what()
                        ))
                    })?;
            }
            if let Some(body) = reference {
                let set = ctx
                    .client
                    .put_reference(name, *version, body)
                    .await
                    .map_err(|e| {
                        Failure::from(e).context(format!(
                            "{name} v{version} was pushed but its drift reference was refused"
                        ))
                    })?;
                if !ctx.json {
                    println!("{}", super::reference::set_line(&set.body));
                }
            }
            let m = &answer.body;
            ctx.report(&answer.raw, || {
                format!(
                    "pushed {} v{} ({} bytes, {}, sha256 {})",
                    m.name,
                    m.version,
                    m.size,
                    m.format,
                    short_sha(&m.sha256)
                )
            });
            Ok(())
        }
        ModelCommand::List => {
            let answer = ctx.client.list_models().await?;
            if ctx.json {
                print_json(&answer.raw);
            } else {
                print_table(&HEADERS, &rows(&answer.body));
            }
            Ok(())
        }
        ModelCommand::Reference { command } => super::reference::run(ctx, command).await,
        ModelCommand::Drift { name } => super::reference::drift(ctx, name).await,
        ModelCommand::Quality { .. }
        | ModelCommand::Split { .. }
        | ModelCommand::SplitEnd { .. }
        | ModelCommand::Promote { .. }
        | ModelCommand::Shadow { .. }
        | ModelCommand::ShadowEnd { .. } => super::quality::run(ctx, command).await,
        ModelCommand::Delete { name, version } => {
            let answer = ctx.client.delete_model(name, *version).await?;
            ctx.report(&answer.raw, || format!("deleted {name} v{version}"));
            Ok(())
        }
    }
}

/// The model table's rows.
pub fn rows(models: &[ModelRecord]) -> Vec<Vec<String>> {
    models
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.version.to_string(),
                m.format.to_string(),
                m.size.to_string(),
                short_sha(&m.sha256).to_string(),
                ago(m.created_at),
                m.pushed_by.clone().unwrap_or_else(|| "-".into()),
                m.notes.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

/// The first 16 hex digits of a digest, enough to tell versions apart.
fn short_sha(sha256: &str) -> &str {
    sha256.get(..16).unwrap_or(sha256)
}

/// The bytes of an optional attachment file.
fn read_optional(path: Option<&Path>) -> Result<Option<Vec<u8>>, Failure> {
    path.map(|path| {
        std::fs::read(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .map_err(usage)
    })
    .transpose()
}

/// Streams the model file to the server, showing progress unless the
/// output is JSON.
async fn push(
    ctx: &Context,
    file: &PathBuf,
    name: &str,
    version: u64,
    format: Option<&str>,
    notes: Option<&str>,
) -> Result<crate::client::Answer<ModelRecord>, Failure> {
    let format = match format {
        Some(f) => f.to_string(),
        None => edgefleet_shared::ModelFormat::from_path(file)
            .map(|f| f.to_string())
            .ok_or_else(|| {
                usage(anyhow::anyhow!(
                    "cannot tell the format of {} from its extension; pass --format",
                    file.display()
                ))
            })?,
    };
    let handle = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))
        .map_err(usage)?;
    let size = handle
        .metadata()
        .await
        .with_context(|| format!("cannot read the size of {}", file.display()))
        .map_err(usage)?
        .len();
    let (body, bar) =
        super::upload_body(handle, size, format!("pushing {name} v{version}"), ctx.json);
    let answer = ctx
        .client
        .push_model(name, version, &format, notes, body, size)
        .await;
    bar.finish_and_clear();
    Ok(answer?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_rows_shorten_the_digest_and_fill_blanks() {
        let json = serde_json::json!({
            "name": "digits", "version": 2, "format": "onnx",
            "sha256": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "size": 1234, "created_at": edgefleet_shared::unix_now(),
        });
        let record: ModelRecord = serde_json::from_value(json).expect("a model record");
        let rows = rows(&[record]);
        assert_eq!(
            rows[0][..5],
            ["digits", "2", "onnx", "1234", "0123456789abcdef"]
        );
        assert!(rows[0][5].ends_with("s ago"), "{}", rows[0][5]);
        assert_eq!(rows[0][6], "-");
        assert_eq!(rows[0][7], "");
    }
}
