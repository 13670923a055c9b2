//! Agent releases on PostgreSQL: the builds of each release and the
//! assignments that deploy one to devices or to the whole fleet. A
//! release's builds are locked while it is deployed or deleted, so the two
//! cannot interleave.

use deadpool_postgres::GenericClient;

use super::super::rows::{
    self, deployed_agent_release, missing_agent_release, stored, AGENT_ASSIGNMENT_COLUMNS,
    AGENT_BUILD_COLUMNS,
};
use super::super::{AgentBuildRecord, AssignedAgent, StoreError, Target, ALL_DEVICES};
use super::{devices, query_all, query_opt};

/// Adds a build (see [`rows::readd_agent_build`] for one stored already).
pub(super) async fn add_build(
    c: &impl GenericClient,
    b: &AgentBuildRecord,
) -> Result<AgentBuildRecord, StoreError> {
    let n = c
        .execute(
            "INSERT INTO agent_builds (version, target, sha256, size, created_at, pushed_by, notes)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
            &[
                &b.version,
                &b.target,
                &b.sha256,
                &stored(b.size),
                &stored(b.created_at),
                &b.pushed_by,
                &b.notes,
            ],
        )
        .await?;
    if n == 1 {
        return Ok(b.clone());
    }
    let existing = query_opt(
        c,
        &format!(
            "SELECT {AGENT_BUILD_COLUMNS} FROM agent_builds WHERE version = $1 AND target = $2"
        ),
        &[&b.version, &b.target],
        rows::agent_build,
    )
    .await?
    .ok_or_else(|| missing_agent_release(&b.version))?;
    rows::readd_agent_build(existing, b)
}

/// The builds of one release, or of all, by version then target
/// (`lock`: `FOR SHARE` or `FOR UPDATE` on them, or nothing).
async fn builds_locked(
    c: &impl GenericClient,
    version: Option<&str>,
    lock: &str,
) -> Result<Vec<AgentBuildRecord>, StoreError> {
    query_all(
        c,
        &format!(
            "SELECT {AGENT_BUILD_COLUMNS} FROM agent_builds
             WHERE $1::TEXT IS NULL OR version = $1 ORDER BY version, target {lock}"
        ),
        &[&version],
        rows::agent_build,
    )
    .await
}

/// The builds of one release, or of all, by version then target.
pub(super) async fn builds(
    c: &impl GenericClient,
    version: Option<&str>,
) -> Result<Vec<AgentBuildRecord>, StoreError> {
    builds_locked(c, version, "").await
}

/// Points `target` at a release; the ids of the devices affected.
pub(super) async fn deploy(
    client: &mut deadpool_postgres::Client,
    version: &str,
    allow_downgrade: bool,
    target: &Target,
    now: u64,
) -> Result<Vec<String>, StoreError> {
    let tx = client.transaction().await?;
    if builds_locked(&tx, Some(version), "FOR SHARE")
        .await?
        .is_empty()
    {
        return Err(missing_agent_release(version));
    }
    let assign =
        "INSERT INTO agent_assignments (scope, version, allow_downgrade) VALUES ($1, $2, $3)
                  ON CONFLICT (scope) DO UPDATE SET version = excluded.version,
                     allow_downgrade = excluded.allow_downgrade";
    let ids = match target {
        Target::All => {
            tx.execute(assign, &[&ALL_DEVICES, &version, &allow_downgrade])
                .await?;
            devices::list(&tx)
                .await?
                .into_iter()
                .map(|d| d.id)
                .collect()
        }
        Target::Devices(ids) => {
            for id in ids {
                devices::ensure(&tx, id, now).await?;
                tx.execute(assign, &[id, &version, &allow_downgrade])
                    .await?;
            }
            ids.clone()
        }
    };
    tx.commit().await?;
    Ok(ids)
}

/// The release `device` should run, with its builds.
pub(super) async fn for_device(
    c: &impl GenericClient,
    device: &str,
) -> Result<Option<AssignedAgent>, StoreError> {
    let found = query_all(
        c,
        &format!(
            "SELECT {AGENT_ASSIGNMENT_COLUMNS} FROM agent_assignments
             WHERE scope = $1 OR scope = '{ALL_DEVICES}'"
        ),
        &[&device],
        rows::agent_assignment,
    )
    .await?;
    let Some((version, allow_downgrade)) = rows::applying_assignment(found) else {
        return Ok(None);
    };
    let builds = builds(c, Some(&version)).await?;
    Ok(Some(AssignedAgent {
        version,
        allow_downgrade,
        builds,
    }))
}

/// Deletes an undeployed release; each build and whether its file is
/// still used by another build or a model.
pub(super) async fn delete_release(
    client: &mut deadpool_postgres::Client,
    version: &str,
) -> Result<Vec<(AgentBuildRecord, bool)>, StoreError> {
    let tx = client.transaction().await?;
    let removed = builds_locked(&tx, Some(version), "FOR UPDATE").await?;
    if removed.is_empty() {
        return Err(missing_agent_release(version));
    }
    let assigned = query_opt(
        &tx,
        "SELECT 1 FROM agent_assignments WHERE version = $1 LIMIT 1",
        &[&version],
        |_| Ok(()),
    )
    .await?;
    if assigned.is_some() {
        return Err(deployed_agent_release(version));
    }
    tx.execute("DELETE FROM agent_builds WHERE version = $1", &[&version])
        .await?;
    let mut out = Vec::with_capacity(removed.len());
    for b in removed {
        let still_used = query_opt(
            &tx,
            "SELECT 1 FROM agent_builds WHERE sha256 = $1
             UNION ALL SELECT 1 FROM models WHERE sha256 = $1 LIMIT 1",
            &[&b.sha256],
            |_| Ok(()),
        )
        .await?
        .is_some();
        out.push((b, still_used));
    }
    tx.commit().await?;
    Ok(out)
}
