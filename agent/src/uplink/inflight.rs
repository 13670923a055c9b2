//! The records in flight on the MQTT session, as a plain tracker with no
//! I/O: which publish carries which records, what the broker acknowledged,
//! what awaits the fleet server's receipt, and what timed out and must be
//! sent again. The uplink's event loop feeds it; it is unit-tested here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::outbox::DeleteOn;

/// One publish on its way: the records it carries (one, or a batch of
/// telemetry or results).
#[derive(Debug, Clone)]
struct Entry {
    seqs: Vec<u64>,
    at: Instant,
}

/// The records in flight. rumqttc assigns packet ids when it writes a
/// publish, in the order publishes were queued, and reports each as
/// `Outgoing::Publish(pkid)`; PUBACKs name the pkid; receipts name
/// sequence numbers. [`Inflight::len`] counts records, not publishes.
#[derive(Debug, Default)]
pub struct Inflight {
    /// Queued to rumqttc, packet id not known yet (in queue order).
    queued: VecDeque<Entry>,
    /// Written, awaiting the broker's PUBACK. Records receipted before
    /// their PUBACK stay listed here (the packet id stays taken) but no
    /// longer count.
    by_pkid: HashMap<u16, Entry>,
    /// Acknowledged by the broker, awaiting the server's receipt.
    awaiting: HashMap<u64, Instant>,
    /// Packet ids rumqttc still holds whose records no longer count here
    /// (expired): a re-send or a late PUBACK for one changes nothing.
    stale: HashSet<u16>,
    /// Every record that counts as in flight.
    seqs: HashSet<u64>,
}

impl Inflight {
    /// Records in flight.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether no record is in flight.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The sequence numbers in flight (not to be drained again).
    pub fn seqs(&self) -> &HashSet<u64> {
        &self.seqs
    }

    /// A publish carrying `seqs` was handed to rumqttc.
    pub fn queued(&mut self, seqs: Vec<u64>, now: Instant) {
        self.seqs.extend(seqs.iter().copied());
        self.queued.push_back(Entry { seqs, at: now });
    }

    /// rumqttc could not take the last publish after all.
    pub fn unqueue_last(&mut self) {
        if let Some(e) = self.queued.pop_back() {
            for seq in &e.seqs {
                self.seqs.remove(seq);
            }
        }
    }

    /// rumqttc wrote a publish with `pkid`. A pkid already known is a
    /// re-send after a reconnect, not a new publish.
    pub fn written(&mut self, pkid: u16, now: Instant) {
        if pkid == 0 || self.by_pkid.contains_key(&pkid) || self.stale.contains(&pkid) {
            return;
        }
        if let Some(mut e) = self.queued.pop_front() {
            e.at = now;
            self.by_pkid.insert(pkid, e);
        }
    }

    /// The broker acknowledged `pkid`. With [`DeleteOn::Puback`] returns
    /// the sequence numbers it delivered; otherwise its records now wait
    /// for their receipt.
    pub fn acked(&mut self, pkid: u16, mode: DeleteOn, now: Instant) -> Vec<u64> {
        if self.stale.remove(&pkid) {
            return Vec::new();
        }
        let Some(e) = self.by_pkid.remove(&pkid) else {
            return Vec::new();
        };
        // Those receipted meanwhile are done already.
        let live = e.seqs.into_iter().filter(|s| self.seqs.contains(s));
        match mode {
            DeleteOn::Puback => {
                let done: Vec<u64> = live.collect();
                for seq in &done {
                    self.seqs.remove(seq);
                }
                done
            }
            DeleteOn::Receipt => {
                for seq in live.collect::<Vec<_>>() {
                    self.awaiting.insert(seq, now);
                }
                Vec::new()
            }
        }
    }

    /// The server stored `seq`. Returns whether it was in flight here.
    pub fn receipted(&mut self, seq: u64) -> bool {
        if self.queued.iter().any(|e| e.seqs.contains(&seq)) {
            // Not written yet: it will be written and acknowledged all
            // the same, and counted then.
            return false;
        }
        self.awaiting.remove(&seq);
        self.seqs.remove(&seq)
    }

    /// Forgets everything: the broker started a new session, and rumqttc
    /// dropped whatever it had not delivered, so all of it is sent again
    /// from the outbox.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Stops counting records written (or acknowledged) more than
    /// `timeout` ago without the next step, so the drain sends them again
    /// (the server de-duplicates). Returns how many records expired.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> usize {
        let old = |at: Instant| now.duration_since(at) > timeout;
        let pkids: Vec<u16> = self
            .by_pkid
            .iter()
            .filter(|(_, e)| old(e.at))
            .map(|(p, _)| *p)
            .collect();
        let mut expired = 0;
        for pkid in &pkids {
            if let Some(e) = self.by_pkid.remove(pkid) {
                for seq in &e.seqs {
                    expired += usize::from(self.seqs.remove(seq));
                }
                self.stale.insert(*pkid);
            }
        }
        let seqs: Vec<u64> = self
            .awaiting
            .iter()
            .filter(|(_, at)| old(**at))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &seqs {
            self.awaiting.remove(seq);
            expired += usize::from(self.seqs.remove(seq));
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> Vec<u64> {
        Vec::new()
    }

    #[test]
    fn packet_ids_map_to_records_in_queue_order_and_resends_are_ignored() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![10], t);
        f.queued(vec![11], t);
        f.queued(vec![12], t);
        f.unqueue_last(); // rumqttc's queue was full for 12
        assert_eq!(f.len(), 2);
        f.written(1, t);
        f.written(2, t);
        // A reconnect re-sends pkid 1: still record 10, nothing shifts.
        f.written(1, t);
        assert_eq!(f.acked(2, DeleteOn::Puback, t), vec![11]);
        assert_eq!(
            f.acked(2, DeleteOn::Puback, t),
            none(),
            "a duplicate PUBACK"
        );
        f.queued(vec![13], t);
        f.written(2, t); // pkid 2 is free again and now carries 13
        assert_eq!(f.acked(1, DeleteOn::Puback, t), vec![10]);
        assert_eq!(f.acked(2, DeleteOn::Puback, t), vec![13]);
        assert!(f.is_empty());
        // QoS 0 publishes (pkid 0) never take a record.
        f.queued(vec![14], t);
        f.written(0, t);
        assert_eq!(f.acked(0, DeleteOn::Puback, t), none());
        assert!(f.seqs().contains(&14));
    }

    #[test]
    fn a_batch_is_acknowledged_and_receipted_record_by_record() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![1, 2, 3], t);
        f.queued(vec![4, 5], t);
        assert_eq!(f.len(), 5);
        f.unqueue_last();
        assert_eq!(f.len(), 3, "the whole refused publish leaves");
        f.written(7, t);
        assert_eq!(f.acked(7, DeleteOn::Puback, t), vec![1, 2, 3]);
        assert!(f.is_empty());

        f.queued(vec![4, 5, 6], t);
        f.written(8, t);
        // The server stored 5 before the broker's PUBACK came back.
        assert!(f.receipted(5));
        assert_eq!(f.len(), 2);
        assert_eq!(f.acked(8, DeleteOn::Receipt, t), none());
        assert_eq!(f.len(), 2, "4 and 6 wait for their receipts");
        assert!(f.receipted(4));
        assert!(f.receipted(6));
        assert!(!f.receipted(6), "a duplicate receipt");
        assert!(f.is_empty());
    }

    #[test]
    fn with_receipts_a_puback_is_not_delivery() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![10], t);
        f.queued(vec![11], t);
        f.written(1, t);
        f.written(2, t);
        assert_eq!(f.acked(1, DeleteOn::Receipt, t), none());
        assert_eq!(f.len(), 2, "still in flight until the receipt");
        f.receipted(10);
        assert_eq!(f.len(), 1);
        // A receipt may overtake the PUBACK: the late PUBACK is ignored,
        // and pkid 2 stays reserved until it comes.
        f.receipted(11);
        assert!(f.is_empty());
        f.queued(vec![12], t);
        f.written(2, t); // rumqttc re-sending the old pkid 2
        assert_eq!(f.acked(2, DeleteOn::Receipt, t), none());
        f.written(3, t);
        assert_eq!(f.acked(3, DeleteOn::Puback, t), vec![12]);
        // Receipts for unknown numbers (an earlier run's) change nothing.
        assert!(!f.receipted(999));
        assert!(f.is_empty());
    }

    #[test]
    fn stuck_records_expire_so_they_are_sent_again() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![1], t);
        f.written(7, t);
        f.queued(vec![2], t);
        f.written(8, t);
        f.acked(8, DeleteOn::Receipt, t);
        let later = t + Duration::from_secs(61);
        f.queued(vec![3], later);
        assert_eq!(f.expire(later, Duration::from_secs(60)), 2);
        assert_eq!(f.seqs().iter().copied().collect::<Vec<_>>(), vec![3]);
        // A re-send of the expired packet does not take record 3's place.
        f.written(7, later);
        f.written(9, later);
        assert_eq!(f.acked(9, DeleteOn::Puback, later), vec![3]);
        // A late PUBACK for the expired record changes nothing.
        assert_eq!(f.acked(7, DeleteOn::Puback, later), none());
        assert!(f.is_empty());
    }

    #[test]
    fn a_new_session_starts_from_scratch() {
        let t = Instant::now();
        let mut f = Inflight::default();
        f.queued(vec![1], t);
        f.queued(vec![2], t);
        f.written(5, t);
        // The broker lost the session: rumqttc drops 1 and 2 unsent.
        f.clear();
        f.queued(vec![3], t);
        f.written(1, t);
        // pkid 1 now carries 3, not the stale 2.
        assert_eq!(f.acked(1, DeleteOn::Puback, t), vec![3]);
        assert_eq!(f.acked(5, DeleteOn::Puback, t), none());
    }
}
