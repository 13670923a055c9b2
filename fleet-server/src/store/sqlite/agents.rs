//! Agent releases on SQLite: the builds of each release and the
//! assignments that deploy one to devices or to the whole fleet.

use rusqlite::{params, Connection};

use super::super::rows::{
    self, deployed_agent_release, missing_agent_release, stored, AGENT_ASSIGNMENT_COLUMNS,
    AGENT_BUILD_COLUMNS,
};
use super::super::{AgentBuildRecord, AssignedAgent, StoreError, Target, ALL_DEVICES};
use super::{devices, query_all, query_opt};

/// Adds a build (see [`rows::readd_agent_build`] for one stored already).
pub(super) fn add_build(
    conn: &Connection,
    b: &AgentBuildRecord,
) -> Result<AgentBuildRecord, StoreError> {
    if let Some(existing) = query_opt(
        conn,
        &format!(
            "SELECT {AGENT_BUILD_COLUMNS} FROM agent_builds WHERE version = ?1 AND target = ?2"
        ),
        params![b.version, b.target],
        rows::agent_build,
    )? {
        return rows::readd_agent_build(existing, b);
    }
    conn.execute(
        "INSERT INTO agent_builds (version, target, sha256, size, created_at, pushed_by, notes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            b.version,
            b.target,
            b.sha256,
            stored(b.size),
            stored(b.created_at),
            b.pushed_by,
            b.notes
        ],
    )?;
    Ok(b.clone())
}

/// The builds of one release, or of all, by version then target.
pub(super) fn builds(
    conn: &Connection,
    version: Option<&str>,
) -> Result<Vec<AgentBuildRecord>, StoreError> {
    query_all(
        conn,
        &format!(
            "SELECT {AGENT_BUILD_COLUMNS} FROM agent_builds
             WHERE ?1 IS NULL OR version = ?1 ORDER BY version, target"
        ),
        [version],
        rows::agent_build,
    )
}

/// Points `target` at a release; the ids of the devices affected.
pub(super) fn deploy(
    conn: &mut Connection,
    version: &str,
    allow_downgrade: bool,
    target: &Target,
    now: u64,
) -> Result<Vec<String>, StoreError> {
    let tx = conn.transaction()?;
    if builds(&tx, Some(version))?.is_empty() {
        return Err(missing_agent_release(version));
    }
    let assign =
        "INSERT INTO agent_assignments (scope, version, allow_downgrade) VALUES (?1, ?2, ?3)
                  ON CONFLICT (scope) DO UPDATE SET version = excluded.version,
                     allow_downgrade = excluded.allow_downgrade";
    let flag = i64::from(allow_downgrade);
    let ids = match target {
        Target::All => {
            tx.execute(assign, params![ALL_DEVICES, version, flag])?;
            devices::list(&tx)?.into_iter().map(|d| d.id).collect()
        }
        Target::Devices(ids) => {
            for id in ids {
                devices::ensure(&tx, id, now)?;
                tx.execute(assign, params![id, version, flag])?;
            }
            ids.clone()
        }
    };
    tx.commit()?;
    Ok(ids)
}

/// The release `device` should run, with its builds.
pub(super) fn for_device(
    conn: &Connection,
    device: &str,
) -> Result<Option<AssignedAgent>, StoreError> {
    let found = query_all(
        conn,
        &format!(
            "SELECT {AGENT_ASSIGNMENT_COLUMNS} FROM agent_assignments
             WHERE scope = ?1 OR scope = '{ALL_DEVICES}'"
        ),
        [device],
        rows::agent_assignment,
    )?;
    let Some((version, allow_downgrade)) = rows::applying_assignment(found) else {
        return Ok(None);
    };
    let builds = builds(conn, Some(&version))?;
    Ok(Some(AssignedAgent {
        version,
        allow_downgrade,
        builds,
    }))
}

/// Deletes an undeployed release; each build and whether its file is
/// still used by another build or a model.
pub(super) fn delete_release(
    conn: &mut Connection,
    version: &str,
) -> Result<Vec<(AgentBuildRecord, bool)>, StoreError> {
    let tx = conn.transaction()?;
    let removed = builds(&tx, Some(version))?;
    if removed.is_empty() {
        return Err(missing_agent_release(version));
    }
    let assigned = query_opt(
        &tx,
        "SELECT 1 FROM agent_assignments WHERE version = ?1 LIMIT 1",
        [version],
        |_| Ok(()),
    )?;
    if assigned.is_some() {
        return Err(deployed_agent_release(version));
    }
    tx.execute("DELETE FROM agent_builds WHERE version = ?1", [version])?;
    let mut out = Vec::with_capacity(removed.len());
    for b in removed {
        let still_used = query_opt(
            &tx,
            "SELECT 1 FROM agent_builds WHERE sha256 = ?1
             UNION ALL SELECT 1 FROM models WHERE sha256 = ?1 LIMIT 1",
            [&b.sha256],
            |_| Ok(()),
        )?
        .is_some();
        out.push((b, still_used));
    }
    tx.commit()?;
    Ok(out)
}
