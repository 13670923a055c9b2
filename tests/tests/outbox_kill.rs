//! SIGKILL at random moments while the outbox appends and drains: every
//! record reported durable is still there or was acknowledged, nothing
//! acknowledged comes back, and the database opens cleanly every time.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use edgefleet_agent::outbox::{Outbox, StreamPolicy};

/// A small deterministic-per-run pseudo-random source (no RNG crate).
fn next_rand(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn sigkill_never_loses_a_durable_record() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rand = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    let seed = rand;
    let mut stored = BTreeSet::new();
    // Deletions begun (maybe done) and deletions known done.
    let mut acking = BTreeSet::new();
    let mut acked = BTreeSet::new();
    for trial in 0..24 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_outbox-torture"))
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            // Only complete lines count: a line cut by the kill was never
            // reported.
            while r.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                if buf.ends_with(b"\n") {
                    lines.push(String::from_utf8_lossy(&buf).trim().to_string());
                    let _ = started_tx.send(());
                }
                buf.clear();
            }
            lines
        });
        // Kill at a random moment once it is working (start-up time varies
        // with the machine's load).
        started_rx.recv_timeout(Duration::from_secs(30))?;
        let wait = next_rand(&mut rand) % 250;
        std::thread::sleep(Duration::from_millis(wait));
        child.kill()?;
        child.wait()?;
        let lines = reader.join().unwrap();
        assert!(
            !lines.is_empty(),
            "trial {trial}: the torture binary did not run"
        );
        let mut pending: Vec<u64> = Vec::new();
        for line in &lines {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("stored") => {
                    let a: u64 = words.next().unwrap().parse()?;
                    let b: u64 = words.next().unwrap().parse()?;
                    stored.extend(a..=b);
                }
                Some("acking") => {
                    pending = words.map(|w| w.parse::<u64>()).collect::<Result<_, _>>()?;
                    acking.extend(pending.iter().copied());
                }
                Some("acked") => acked.extend(pending.drain(..)),
                _ => panic!("unexpected line {line:?}"),
            }
        }
        let keep_all = StreamPolicy::keep_all();
        let outbox = Outbox::open(&dir.path().join("outbox.db"), [keep_all; 4], 1 << 30)?;
        assert_eq!(outbox.salvaged, None, "trial {trial}: the file was damaged");
        assert_eq!(outbox.integrity_check()?, "ok", "trial {trial}");
        let on_disk: BTreeSet<u64> = outbox
            .next_batch(10_000_000, &Default::default())?
            .into_iter()
            .map(|r| r.seq)
            .collect();
        let lost: Vec<&u64> = stored
            .iter()
            .filter(|s| !on_disk.contains(s) && !acking.contains(s))
            .take(10)
            .collect();
        assert!(
            lost.is_empty(),
            "trial {trial} (seed {seed}, killed after {wait} ms): durable records lost: {lost:?}"
        );
        let back: Vec<&u64> = acked.intersection(&on_disk).take(10).collect();
        assert!(
            back.is_empty(),
            "trial {trial}: acknowledged records came back: {back:?}"
        );
    }
    assert!(
        stored.len() > 1000,
        "too little work to mean anything: {}",
        stored.len()
    );
    assert!(!acked.is_empty());
    Ok(())
}
