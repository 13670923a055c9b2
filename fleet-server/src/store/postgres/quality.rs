//! Quality settings of assignments on PostgreSQL (see
//! [`super::super::quality`]). The fleet-wide and device rows a change
//! reads are locked, so two changes to one assignment cannot interleave.

use deadpool_postgres::GenericClient;

use super::super::quality::{AssignedQuality, DeviceQuality, QualityChange, ResolvedQuality};
use super::super::rows::stored;
use super::super::{missing_model, StoreError, Target, ALL_DEVICES};
use super::{devices, models, query_all, query_opt};

async fn write(
    c: &impl GenericClient,
    scope: &str,
    model: &str,
    q: &AssignedQuality,
) -> Result<(), StoreError> {
    let shadow = q.shadow.as_ref().map(|s| stored(s.version));
    let split = q.split.as_ref().map(|s| stored(s.version));
    c.execute(
        "INSERT INTO assignments (scope, model, version, quality, shadow_version, split_version)
         SELECT $1, $2, version, $3, $4, $5 FROM assignments
          WHERE model = $2 AND (scope = $1 OR scope = $6)
          ORDER BY scope = $6 LIMIT 1
         ON CONFLICT (scope, model) DO UPDATE SET quality = excluded.quality,
             shadow_version = excluded.shadow_version, split_version = excluded.split_version",
        &[
            &scope,
            &model,
            &q.to_column(),
            &shadow,
            &split,
            &ALL_DEVICES,
        ],
    )
    .await?;
    Ok(())
}

/// Changes the quality settings of `model`'s assignments for `target`; a
/// device on the fleet-wide assignment gets a row of its own (same
/// version). Returns the devices whose desired state changes.
pub(super) async fn set(
    client: &mut deadpool_postgres::Client,
    model: &str,
    change: &QualityChange,
    target: &Target,
) -> Result<Vec<String>, StoreError> {
    let tx = client.transaction().await?;
    if let Some(version) = change.version() {
        if models::get(&tx, model, version).await?.is_none() {
            return Err(missing_model(model, version));
        }
    }
    let ids = match target {
        Target::All => {
            let rows = query_all(
                &tx,
                "SELECT scope, quality FROM assignments WHERE model = $1 ORDER BY scope FOR UPDATE",
                &[&model],
                |r| Ok((r.text(0)?, r.opt_text(1)?)),
            )
            .await?;
            if rows.is_empty() {
                return Err(StoreError::NotFound(format!(
                    "model {model} is not deployed anywhere"
                )));
            }
            for (scope, text) in rows {
                let mut q = AssignedQuality::from_column(text.as_deref())?;
                q.apply(change);
                write(&tx, &scope, model, &q).await?;
            }
            devices::list(&tx)
                .await?
                .into_iter()
                .map(|d| d.id)
                .collect()
        }
        Target::Devices(ids) => {
            for id in ids {
                let row = query_opt(
                    &tx,
                    "SELECT quality FROM assignments
                      WHERE model = $2 AND (scope = $1 OR scope = $3)
                      ORDER BY scope = $3 LIMIT 1 FOR UPDATE",
                    &[id, &model, &ALL_DEVICES],
                    |r| r.opt_text(0),
                )
                .await?;
                let Some(text) = row else {
                    return Err(StoreError::NotFound(format!(
                        "device {id} does not run model {model}"
                    )));
                };
                let mut q = AssignedQuality::from_column(text.as_deref())?;
                q.apply(change);
                write(&tx, id, model, &q).await?;
            }
            ids.clone()
        }
    };
    tx.commit().await?;
    Ok(ids)
}

/// The quality settings of every model `device` runs, with the records of
/// the versions they name.
pub(super) async fn for_device(
    c: &impl GenericClient,
    device: &str,
) -> Result<DeviceQuality, StoreError> {
    let rows = query_all(
        c,
        "SELECT a.model, a.quality FROM assignments a
         WHERE a.quality IS NOT NULL
           AND (a.scope = $1 OR (a.scope = $2 AND NOT EXISTS (
                SELECT 1 FROM assignments d WHERE d.scope = $1 AND d.model = a.model)))",
        &[&device, &ALL_DEVICES],
        |r| Ok((r.text(0)?, r.text(1)?)),
    )
    .await?;
    let mut out = DeviceQuality::new();
    for (model, text) in rows {
        let q = AssignedQuality::from_column(Some(&text))?;
        let mut resolved = ResolvedQuality::default();
        if let Some(s) = q.shadow {
            if let Some(record) = models::get(c, &model, s.version).await? {
                resolved.shadow = Some((s, record));
            }
        }
        if let Some(s) = q.split {
            if let Some(record) = models::get(c, &model, s.version).await? {
                resolved.split = Some((s, record));
            }
        }
        out.insert(model, resolved);
    }
    Ok(out)
}
