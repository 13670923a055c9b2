//! The outbox's SQLite file (WAL): appends in one transaction per batch,
//! applying each stream's overflow policy; reads the next records to send;
//! deletes what the broker acknowledged. A corrupt file is moved aside and
//! what can still be read from it is carried over to a fresh one.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension};

use super::policy::{plan_overflow, Overflow, OverflowPlan, Stream, StreamPolicy, Usage};

/// A record waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub id: i64,
    pub stream: Stream,
    pub seq: u64,
    pub created_at: u64,
    pub payload: Vec<u8>,
}

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    pub stream: Stream,
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What happened to one appended record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    Stored { dropped: u64 },
    Downsampled { dropped: u64 },
    Rejected,
}

impl Appended {
    /// Records lost by this append (older ones dropped, or this one).
    pub fn lost(self) -> u64 {
        match self {
            Self::Stored { dropped } | Self::Downsampled { dropped } => dropped,
            Self::Rejected => 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("outbox database {path}: {message}")]
    File { path: PathBuf, message: String },
}

impl OutboxError {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Sqlite(e) => e.sqlite_error_code(),
            Self::File { .. } => None,
        }
    }

    /// The disk (or the configured database size cap) is full.
    pub fn is_disk_full(&self) -> bool {
        self.code() == Some(ErrorCode::DiskFull)
    }

    /// The file is damaged: it has to be moved aside and rebuilt.
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        )
    }

    /// A short description for telemetry.
    pub fn condition(&self) -> String {
        if self.is_disk_full() {
            "disk full".into()
        } else if self.is_corrupt() {
            "database corrupt".into()
        } else {
            format!("database error: {self}")
        }
    }
}

/// Totals over every stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    pub rows: u64,
    pub bytes: u64,
    /// Creation time of the oldest record, unix seconds.
    pub oldest: Option<u64>,
}

/// Size of the database page; `max_db_bytes` is rounded down to it.
const PAGE_SIZE: u64 = 4096;

/// The SQLite-backed outbox.
pub struct Outbox {
    conn: Connection,
    path: PathBuf,
    policies: [StreamPolicy; 4],
    max_db_bytes: u64,
    /// Rows and bytes per stream, kept in step with the file (this
    /// connection is its only writer) so an append never scans the table.
    usage: [Usage; 4],
    /// Records carried over from a corrupt file at open, if that happened.
    pub salvaged: Option<u64>,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS records (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        priority INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        size INTEGER NOT NULL,
        payload BLOB NOT NULL
    );
    CREATE INDEX IF NOT EXISTS records_by_priority ON records (priority, id);
    CREATE INDEX IF NOT EXISTS records_by_seq ON records (seq);";

fn connect(path: &Path, max_db_bytes: u64) -> Result<Connection, OutboxError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "page_size", PAGE_SIZE as i64)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: an append that returned survives power loss, not just a crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // 512 KiB of page cache instead of SQLite's 2 MiB: the agent's budget
    // is a 32 MB-class board, and the outbox is read front to back.
    conn.pragma_update(None, "cache_size", -512)?;
    conn.execute_batch(SCHEMA)?;
    let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if ok != "ok" {
        return Err(OutboxError::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(ok),
        )));
    }
    // The size cap: beyond it SQLite answers SQLITE_FULL, handled exactly
    // like a full disk.
    let pages = (max_db_bytes / PAGE_SIZE).max(8) as i64;
    conn.query_row(&format!("PRAGMA max_page_count = {pages}"), [], |_| Ok(()))?;
    Ok(conn)
}

/// Rows and bytes of every stream, read from the file (once, at open).
fn read_usage(conn: &Connection) -> rusqlite::Result<[Usage; 4]> {
    let mut usage = [Usage::default(); 4];
    let mut stmt = conn.prepare(
        "SELECT priority, COUNT(*), COALESCE(SUM(size), 0) FROM records GROUP BY priority",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, i64>(2)? as u64,
        ))
    })?;
    for row in rows {
        let (p, rows, bytes) = row?;
        if let Some(u) = usage.get_mut(p as usize) {
            *u = Usage { rows, bytes };
        }
    }
    Ok(usage)
}

/// Runs a `DELETE ... RETURNING priority, size` and takes what it removed
/// off `usage`. Returns how many rows went.
fn delete_counted(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
    usage: &mut [Usage; 4],
) -> rusqlite::Result<u64> {
    let mut rows = stmt.query(params)?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let (p, size) = (r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as u64);
        if let Some(u) = usage.get_mut(p) {
            u.rows = u.rows.saturating_sub(1);
            u.bytes = u.bytes.saturating_sub(size);
        }
        n += 1;
    }
    Ok(n)
}

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let priority = r.get::<_, i64>(1)?;
    Ok(Record {
        id: r.get(0)?,
        stream: Stream::ALL
            .get(priority as usize)
            .copied()
            .unwrap_or(Stream::Results),
        seq: r.get::<_, i64>(2)? as u64,
        created_at: r.get::<_, i64>(3)? as u64,
        payload: r.get(4)?,
    })
}

impl Outbox {
    /// Opens (or creates) the outbox at `path`. A damaged file is renamed
    /// to `<path>.corrupt-<unix time>` and every record still readable in
    /// it is copied into a fresh file; `salvaged` says how many.
    pub fn open(
        path: &Path,
        policies: [StreamPolicy; 4],
        max_db_bytes: u64,
    ) -> Result<Self, OutboxError> {
        match connect(path, max_db_bytes) {
            Ok(conn) => Ok(Self {
                usage: read_usage(&conn)?,
                conn,
                path: path.to_path_buf(),
                policies,
                max_db_bytes,
                salvaged: None,
            }),
            Err(e) if e.is_corrupt() => {
                tracing::error!(path = %path.display(), error = %e, "outbox database is corrupt; moving it aside and salvaging what it holds");
                let salvaged = Self::salvage(path)?;
                let conn = connect(path, max_db_bytes)?;
                let mut outbox = Self {
                    usage: read_usage(&conn)?,
                    conn,
                    path: path.to_path_buf(),
                    policies,
                    max_db_bytes,
                    salvaged: Some(0),
                };
                let n = outbox.insert_salvaged(&salvaged)?;
                outbox.salvaged = Some(n);
                Ok(outbox)
            }
            Err(e) => Err(e),
        }
    }

    /// Moves a damaged file (and its WAL) aside and reads what it can.
    fn salvage(path: &Path) -> Result<Vec<Record>, OutboxError> {
        let stamp = edgefleet_shared::unix_now();
        let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
        for suffix in ["", "-wal", "-shm"] {
            let from = PathBuf::from(format!("{}{suffix}", path.display()));
            let to = PathBuf::from(format!("{}{suffix}", aside.display()));
            if from.exists() {
                std::fs::rename(&from, &to).map_err(|e| OutboxError::File {
                    path: from.clone(),
                    message: format!("cannot move the corrupt file aside: {e}"),
                })?;
            }
        }
        let Ok(old) =
            Connection::open_with_flags(&aside, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        // Row by row, so one bad page costs the rows on it, not the rest.
        let Ok(mut stmt) =
            old.prepare("SELECT id, priority, seq, created_at, payload FROM records ORDER BY id")
        else {
            return Ok(out);
        };
        let Ok(mut rows) = stmt.query([]) else {
            return Ok(out);
        };
        while let Ok(Some(row)) = rows.next() {
            if let Ok(record) = record_from_row(row) {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn insert_salvaged(&mut self, records: &[Record]) -> Result<u64, OutboxError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO records (priority, seq, created_at, size, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for r in records {
                stmt.execute(params![
                    r.stream.priority(),
                    r.seq as i64,
                    r.created_at as i64,
                    r.payload.len() as i64,
                    r.payload
                ])?;
            }
        }
        tx.commit()?;
        self.usage = read_usage(&self.conn)?;
        Ok(records.len() as u64)
    }

    /// Replaces a connection whose file went bad while running.
    pub fn recover(&mut self) -> Result<u64, OutboxError> {
        let records = Self::salvage(&self.path)?;
        self.conn = connect(&self.path, self.max_db_bytes)?;
        let n = self.insert_salvaged(&records)?;
        self.salvaged = Some(n);
        Ok(n)
    }

    pub fn usage(&self, stream: Stream) -> Result<Usage, OutboxError> {
        Ok(self.usage[stream.priority() as usize])
    }

    /// Appends a batch in one transaction, applying each stream's policy.
    /// Either the whole batch is stored or, on error, none of it.
    pub fn append(&mut self, batch: &[NewRecord], now: u64) -> Result<Vec<Appended>, OutboxError> {
        let policies = self.policies;
        // Changed on a copy, kept only if the transaction commits.
        let mut usage = self.usage;
        let tx = self.conn.transaction()?;
        let mut outcomes = Vec::with_capacity(batch.len());
        for record in batch {
            let p = record.stream.priority();
            let size = record.payload.len() as u64;
            let policy = policies[p as usize];
            let used = usage[p as usize];
            let oldest: Vec<u64> = if policy.overflow == Overflow::DropOldest
                && (used.rows >= policy.max_rows
                    || used.bytes.saturating_add(size) > policy.max_bytes)
            {
                // Enough of the oldest to make room for any sane record;
                // one that needs more is refused.
                let mut stmt = tx.prepare_cached(
                    "SELECT size FROM records WHERE priority = ?1 ORDER BY id LIMIT 4096",
                )?;
                let sizes = stmt.query_map([p], |r| r.get::<_, i64>(0).map(|s| s as u64))?;
                sizes.collect::<Result<_, _>>()?
            } else {
                Vec::new()
            };
            let outcome = match plan_overflow(&policy, used, size, oldest) {
                OverflowPlan::Reject => {
                    outcomes.push(Appended::Rejected);
                    continue;
                }
                OverflowPlan::Append => Appended::Stored { dropped: 0 },
                OverflowPlan::DropOldest(n) => {
                    let mut stmt = tx.prepare_cached(
                        "DELETE FROM records WHERE id IN (SELECT id FROM records WHERE priority = ?1 ORDER BY id LIMIT ?2)
                         RETURNING priority, size",
                    )?;
                    let dropped = delete_counted(&mut stmt, params![p, n as i64], &mut usage)?;
                    Appended::Stored { dropped }
                }
                OverflowPlan::Downsample => {
                    let half = (used.rows / 2).max(1) as i64;
                    let mut stmt = tx.prepare_cached(
                        "DELETE FROM records WHERE id IN (
                            SELECT id FROM (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n
                                            FROM records WHERE priority = ?1 ORDER BY id LIMIT ?2)
                            WHERE n % 2 = 0)
                         RETURNING priority, size",
                    )?;
                    let dropped = delete_counted(&mut stmt, params![p, half], &mut usage)?;
                    Appended::Downsampled { dropped }
                }
            };
            tx.prepare_cached(
                "INSERT INTO records (priority, seq, created_at, size, payload) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![p, record.seq as i64, now as i64, size as i64, record.payload])?;
            usage[p as usize].rows += 1;
            usage[p as usize].bytes += size;
            outcomes.push(outcome);
        }
        tx.commit()?;
        self.usage = usage;
        Ok(outcomes)
    }

    /// Up to `limit` records to send next, skipping the sequence numbers in
    /// `exclude` (already in flight). Most of a batch is the backlog, highest
    /// priority first and oldest first within it; a quarter is reserved
    /// for the newest records, so a long backlog never starves live data.
    pub fn next_batch(
        &self,
        limit: usize,
        exclude: &HashSet<u64>,
    ) -> Result<Vec<Record>, OutboxError> {
        let live_share = limit / 4;
        let mut out = Vec::with_capacity(limit);
        let mut seen = HashSet::new();
        let mut take = |sql: &str, want: usize, out: &mut Vec<Record>| -> Result<(), OutboxError> {
            if want == 0 {
                return Ok(());
            }
            let mut stmt = self.conn.prepare_cached(sql)?;
            let rows = stmt.query_map([(want + exclude.len()) as i64], record_from_row)?;
            let mut added = 0;
            for row in rows {
                let r = row?;
                if added == want {
                    break;
                }
                if exclude.contains(&r.seq) || !seen.insert(r.id) {
                    continue;
                }
                out.push(r);
                added += 1;
            }
            Ok(())
        };
        take(
            "SELECT id, priority, seq, created_at, payload FROM records ORDER BY id DESC LIMIT ?1",
            live_share,
            &mut out,
        )?;
        let live = out.len();
        take(
            "SELECT id, priority, seq, created_at, payload FROM records ORDER BY priority, id LIMIT ?1",
            limit - live,
            &mut out,
        )?;
        // A batch goes out at once; within it, priority then age.
        out.sort_by_key(|r| (r.stream.priority(), r.id));
        Ok(out)
    }

    /// Deletes records the broker acknowledged, in one transaction.
    pub fn ack(&mut self, ids: &[i64]) -> Result<(), OutboxError> {
        let mut usage = self.usage;
        let tx = self.conn.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("DELETE FROM records WHERE id = ?1 RETURNING priority, size")?;
            for id in ids {
                delete_counted(&mut stmt, [id], &mut usage)?;
            }
        }
        tx.commit()?;
        self.usage = usage;
        Ok(())
    }

    /// Deletes the records with these sequence numbers (the server's
    /// receipt), in one transaction. Unknown numbers are ignored.
    pub fn ack_seqs(&mut self, seqs: &[u64]) -> Result<(), OutboxError> {
        // A delete lost to a power cut only means the records are sent
        // again (and de-duplicated), so it need not wait for the disk.
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let result = self.delete_seqs(seqs);
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        result
    }

    fn delete_seqs(&mut self, seqs: &[u64]) -> Result<(), OutboxError> {
        let mut usage = self.usage;
        let tx = self.conn.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("DELETE FROM records WHERE seq = ?1 RETURNING priority, size")?;
            for seq in seqs {
                delete_counted(&mut stmt, [*seq as i64], &mut usage)?;
            }
        }
        tx.commit()?;
        self.usage = usage;
        Ok(())
    }

    /// Rows, bytes and the oldest record over every stream.
    pub fn depth(&self) -> Result<Depth, OutboxError> {
        // Records are appended in time order, so the lowest id is the
        // oldest: one index lookup, not a scan.
        let oldest = self
            .conn
            .query_row(
                "SELECT created_at FROM records ORDER BY id LIMIT 1",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
            .map(|v| v as u64);
        Ok(Depth {
            rows: self.usage.iter().map(|u| u.rows).sum(),
            bytes: self.usage.iter().map(|u| u.bytes).sum(),
            oldest,
        })
    }

    /// `PRAGMA integrity_check` (for tests and diagnostics).
    pub fn integrity_check(&self) -> Result<String, OutboxError> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::policy::tests::policy;
    use super::*;

    fn rec(stream: Stream, seq: u64, payload: &[u8]) -> NewRecord {
        NewRecord {
            stream,
            seq,
            payload: payload.to_vec(),
        }
    }

    fn open_with(dir: &Path, telemetry: StreamPolicy, max_db_bytes: u64) -> Outbox {
        let mut policies = Stream::ALL.map(StreamPolicy::default_for);
        policies[Stream::Telemetry as usize] = telemetry;
        Outbox::open(&dir.join("outbox.db"), policies, max_db_bytes).unwrap()
    }

    fn open(dir: &Path, telemetry: StreamPolicy) -> Outbox {
        open_with(dir, telemetry, 1 << 30)
    }

    fn payloads(records: &[Record]) -> Vec<Vec<u8>> {
        records.iter().map(|r| r.payload.clone()).collect()
    }

    #[test]
    fn drains_by_priority_then_age_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open(dir.path(), StreamPolicy::default_for(Stream::Telemetry));
        outbox
            .append(
                &[
                    rec(Stream::Telemetry, 1, b"t1"),
                    rec(Stream::Events, 2, b"e1"),
                    rec(Stream::Telemetry, 3, b"t2"),
                    rec(Stream::Events, 4, b"e2"),
                ],
                7,
            )
            .unwrap();
        drop(outbox);
        let mut outbox = open(dir.path(), StreamPolicy::default_for(Stream::Telemetry));
        let none = HashSet::new();
        // Small batches are all backlog.
        let batch = outbox.next_batch(3, &none).unwrap();
        assert_eq!(
            payloads(&batch),
            vec![b"e1".to_vec(), b"e2".to_vec(), b"t1".to_vec()]
        );
        assert_eq!(batch[0].seq, 2);
        assert_eq!(
            outbox.depth().unwrap(),
            Depth {
                rows: 4,
                bytes: 8,
                oldest: Some(7)
            }
        );
        outbox.ack(&[batch[0].id]).unwrap();
        outbox.ack_seqs(&[batch[2].seq, 12345]).unwrap();
        let left = outbox.next_batch(10, &none).unwrap();
        assert_eq!(payloads(&left), vec![b"e2".to_vec(), b"t2".to_vec()]);
        // In-flight records are skipped.
        let exclude: HashSet<u64> = [left[0].seq].into();
        assert_eq!(
            payloads(&outbox.next_batch(10, &exclude).unwrap()),
            vec![b"t2".to_vec()]
        );
    }

    #[test]
    fn a_long_backlog_does_not_starve_the_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open(dir.path(), StreamPolicy::default_for(Stream::Telemetry));
        let batch: Vec<NewRecord> = (0..100u64)
            .map(|i| rec(Stream::Telemetry, i, &i.to_le_bytes()))
            .collect();
        outbox.append(&batch, 0).unwrap();
        let next = outbox.next_batch(8, &HashSet::new()).unwrap();
        let seqs: Vec<u64> = next.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5, 98, 99]);
    }

    #[test]
    fn overflow_policies_apply_per_stream_and_events_are_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open(dir.path(), policy(10, u64::MAX, Overflow::Downsample));
        for i in 0..25u32 {
            outbox
                .append(
                    &[
                        rec(Stream::Telemetry, 2 * i as u64, &i.to_le_bytes()),
                        rec(Stream::Events, 2 * i as u64 + 1, &[0; 100]),
                    ],
                    0,
                )
                .unwrap();
        }
        let telemetry = outbox.usage(Stream::Telemetry).unwrap();
        assert!(telemetry.rows <= 10, "{telemetry:?}");
        assert_eq!(outbox.usage(Stream::Events).unwrap().rows, 25);
        // Downsampling keeps the newest record and the span of the history.
        let kept: Vec<u32> = outbox
            .next_batch(1000, &HashSet::new())
            .unwrap()
            .into_iter()
            .filter(|r| r.stream == Stream::Telemetry)
            .map(|r| u32::from_le_bytes(r.payload.try_into().unwrap()))
            .collect();
        let mut sorted = kept.clone();
        sorted.sort();
        assert_eq!(*sorted.last().unwrap(), 24);
        assert_eq!(sorted[0], 0);

        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open(dir.path(), policy(3, u64::MAX, Overflow::RejectNew));
        let batch: Vec<NewRecord> = (0..5u8)
            .map(|i| rec(Stream::Telemetry, i as u64, &[i]))
            .collect();
        let out = outbox.append(&batch, 0).unwrap();
        assert_eq!(out.iter().filter(|o| **o == Appended::Rejected).count(), 2);
        assert_eq!(
            payloads(&outbox.next_batch(2, &HashSet::new()).unwrap()),
            vec![vec![0], vec![1]]
        );

        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open(dir.path(), policy(3, u64::MAX, Overflow::DropOldest));
        let out = outbox.append(&batch, 0).unwrap();
        assert_eq!(out.iter().map(|o| o.lost()).sum::<u64>(), 2);
        // The usage kept in memory matches the file after drops and acks.
        let first = outbox.next_batch(1, &HashSet::new()).unwrap();
        outbox.ack(&[first[0].id]).unwrap();
        outbox.ack_seqs(&[4]).unwrap();
        assert_eq!(outbox.usage, read_usage(&outbox.conn).unwrap());
        assert_eq!(outbox.usage(Stream::Telemetry).unwrap().rows, 1);
    }

    #[test]
    fn a_full_database_refuses_the_whole_batch_and_recovers_after_acks() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = open_with(
            dir.path(),
            policy(u64::MAX, u64::MAX, Overflow::DropOldest),
            64 * 1024,
        );
        let mut stored = 0u64;
        let err = loop {
            let batch: Vec<NewRecord> = (0..10)
                .map(|i| rec(Stream::Telemetry, stored + i, &[7; 500]))
                .collect();
            match outbox.append(&batch, 0) {
                Ok(_) => stored += 10,
                Err(e) => break e,
            }
            assert!(stored < 10_000, "the size cap never hit");
        };
        assert!(err.is_disk_full(), "{err}");
        assert_eq!(err.condition(), "disk full");
        // The failed batch left nothing behind.
        assert_eq!(outbox.depth().unwrap().rows, stored);
        // Draining frees pages for new records.
        let sent = outbox.next_batch(100, &HashSet::new()).unwrap();
        outbox
            .ack(&sent.iter().map(|r| r.id).collect::<Vec<_>>())
            .unwrap();
        outbox
            .append(&[rec(Stream::Telemetry, 99_999, &[7; 500])], 0)
            .unwrap();
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_a_garbage_file_recovers_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        std::fs::write(&path, vec![0xAB; 64 * 1024]).unwrap();
        let outbox =
            Outbox::open(&path, Stream::ALL.map(StreamPolicy::default_for), 1 << 30).unwrap();
        assert_eq!(outbox.salvaged, Some(0));
        assert_eq!(outbox.integrity_check().unwrap(), "ok");
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged file is kept for inspection");
    }

    #[test]
    fn records_survive_a_damaged_page_elsewhere_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.db");
        {
            let mut outbox = open(dir.path(), StreamPolicy::default_for(Stream::Telemetry));
            let batch: Vec<NewRecord> = (0..50u64)
                .map(|i| rec(Stream::Events, i, &[i as u8; 100]))
                .collect();
            outbox.append(&batch, 0).unwrap();
            outbox
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        // Damage the index's last page (the table's rows are intact).
        let mut bytes = std::fs::read(&path).unwrap();
        let pages = bytes.len() / PAGE_SIZE as usize;
        let index_root: usize = {
            let conn = Connection::open(&path).unwrap();
            conn.query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = 'records_by_priority'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .unwrap() as usize
        };
        assert!(index_root <= pages);
        let start = (index_root - 1) * PAGE_SIZE as usize;
        bytes[start..start + PAGE_SIZE as usize].fill(0xFF);
        std::fs::write(&path, bytes).unwrap();
        let outbox =
            Outbox::open(&path, Stream::ALL.map(StreamPolicy::default_for), 1 << 30).unwrap();
        assert_eq!(outbox.salvaged, Some(50));
        assert_eq!(outbox.depth().unwrap().rows, 50);
    }
}
