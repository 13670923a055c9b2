//! Appends to and drains an outbox as fast as it can, printing what is
//! durable, until it is killed. `tests/tests/outbox_kill.rs` kills it with
//! SIGKILL at random moments and checks nothing it reported is lost.
//!
//! Output lines: `stored FIRST LAST` after a batch of records with
//! sequence numbers FIRST..=LAST committed; `acking SEQ...` before and
//! `acked` after those records are deleted as if they had been delivered
//! (a kill in between may or may not have deleted them).

use std::io::Write;
use std::path::PathBuf;

use edgefleet_agent::outbox::{NewRecord, Outbox, Sequence, Stream, StreamPolicy};

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: outbox-torture DIR"));
    let seq = Sequence::persistent(&dir.join("seq"))?;
    let keep_all = StreamPolicy::keep_all();
    let mut outbox = Outbox::open(&dir.join("outbox.db"), [keep_all; 4], 1 << 30)?;
    let mut out = std::io::stdout().lock();
    for round in 0u64.. {
        let n = 1 + (round * 7919 % 64);
        let batch: Vec<NewRecord> = (0..n)
            .map(|_| {
                let s = seq.next();
                NewRecord {
                    stream: if s % 3 == 0 {
                        Stream::Events
                    } else {
                        Stream::Telemetry
                    },
                    seq: s,
                    payload: s.to_string().into_bytes(),
                }
            })
            .collect();
        outbox.append(&batch, edgefleet_shared::unix_now())?;
        writeln!(
            out,
            "stored {} {}",
            batch[0].seq,
            batch[batch.len() - 1].seq
        )?;
        out.flush()?;
        if round % 3 == 2 {
            let sent = outbox.next_batch(40, &Default::default())?;
            let seqs: Vec<String> = sent.iter().map(|r| r.seq.to_string()).collect();
            writeln!(out, "acking {}", seqs.join(" "))?;
            out.flush()?;
            outbox.ack(&sent.iter().map(|r| r.id).collect::<Vec<_>>())?;
            writeln!(out, "acked")?;
            out.flush()?;
        }
    }
    Ok(())
}
