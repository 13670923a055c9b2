//! What several servers coordinate through (SQLite's side: one server,
//! so the lease is always its own, but the same code path runs): the
//! rollout driver's lease and its inbox.

use rusqlite::{params, Connection, OptionalExtension};

use super::super::StoreError;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub(super) fn lease(
    conn: &Connection,
    name: &str,
    holder: &str,
    ttl_ms: u64,
) -> Result<Option<u64>, StoreError> {
    let now = now_ms();
    let epoch: Option<i64> = conn
        .query_row(
            "INSERT INTO leases (name, holder, epoch, expires_ms) VALUES (?1, ?2, 1, ?3 + ?4)
             ON CONFLICT (name) DO UPDATE SET
                 epoch = CASE WHEN leases.holder = excluded.holder THEN leases.epoch ELSE leases.epoch + 1 END,
                 holder = excluded.holder,
                 expires_ms = excluded.expires_ms
             WHERE leases.holder = excluded.holder OR leases.expires_ms < ?3
             RETURNING epoch",
            params![name, holder, now, ttl_ms as i64],
            |row| row.get(0),
        )
        .optional()?;
    Ok(epoch.map(|e| e as u64))
}

pub(super) fn release_lease(conn: &Connection, name: &str, holder: &str) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE leases SET expires_ms = 0 WHERE name = ?1 AND holder = ?2",
        params![name, holder],
    )?;
    Ok(())
}

pub(super) fn push_inbox(
    conn: &mut Connection,
    bodies: &[String],
    now: u64,
) -> Result<Vec<i64>, StoreError> {
    let tx = conn.transaction()?;
    let mut ids = Vec::with_capacity(bodies.len());
    {
        let mut stmt = tx.prepare_cached("INSERT INTO rollout_inbox (body, at) VALUES (?1, ?2)")?;
        for body in bodies {
            stmt.execute(params![body, now as i64])?;
            ids.push(tx.last_insert_rowid());
        }
    }
    tx.commit()?;
    Ok(ids)
}

pub(super) fn inbox(conn: &Connection, limit: u32) -> Result<Vec<(i64, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, body FROM rollout_inbox WHERE outcome IS NULL ORDER BY id LIMIT ?1",
    )?;
    let rows = stmt
        .query_map(params![limit], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub(super) fn settle_inbox(
    conn: &mut Connection,
    done: &[i64],
    answers: &[(i64, String)],
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut delete = tx.prepare_cached("DELETE FROM rollout_inbox WHERE id = ?1")?;
        for id in done {
            delete.execute(params![id])?;
        }
        let mut answer =
            tx.prepare_cached("UPDATE rollout_inbox SET outcome = ?2 WHERE id = ?1")?;
        for (id, outcome) in answers {
            answer.execute(params![id, outcome])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn take_outcome(conn: &Connection, id: i64) -> Result<Option<String>, StoreError> {
    let outcome: Option<String> = conn
        .query_row(
            "DELETE FROM rollout_inbox WHERE id = ?1 AND outcome IS NOT NULL RETURNING outcome",
            params![id],
            |row| row.get(0),
        )
        .optional()?;
    Ok(outcome)
}
