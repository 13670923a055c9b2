//! Batching outbox records into publishes: telemetry and results records
//! next to each other share one publish as a JSON array; events and
//! status go one per publish.

use crate::outbox::Record;

/// Most bytes of records batched into one publish.
pub const MAX_PUBLISH_BYTES: usize = 256 * 1024;

/// Splits a drain batch into publishes: telemetry and results records next
/// to each other on the same stream share one publish (a JSON array), up
/// to `max_records` and [`MAX_PUBLISH_BYTES`]; events and status go one
/// per publish. Returns index ranges into `records`.
pub fn group(records: &[Record], max_records: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < records.len() {
        let stream = records[start].stream;
        let mut end = start + 1;
        let mut bytes = records[start].payload.len();
        if stream.batched() {
            while end < records.len()
                && end - start < max_records
                && records[end].stream == stream
                && bytes + records[end].payload.len() < MAX_PUBLISH_BYTES
            {
                bytes += records[end].payload.len() + 1;
                end += 1;
            }
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// The payload of one publish: the record itself, or a JSON array of them.
pub fn publish_payload(records: &mut [Record]) -> Vec<u8> {
    if let [one] = records {
        return std::mem::take(&mut one.payload);
    }
    let size = records.iter().map(|r| r.payload.len() + 1).sum::<usize>() + 1;
    let mut out = Vec::with_capacity(size);
    out.push(b'[');
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&r.payload);
    }
    out.push(b']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Stream;

    fn record(seq: u64, stream: Stream, bytes: usize) -> Record {
        Record {
            id: seq as i64,
            stream,
            seq,
            created_at: 0,
            payload: vec![b'x'; bytes],
        }
    }

    #[test]
    fn batches_group_neighbours_of_one_stream_within_the_limits() {
        use Stream::*;
        let records: Vec<_> = [Events, Events, Status, Telemetry, Telemetry, Telemetry]
            .into_iter()
            .chain([Results; 5])
            .enumerate()
            .map(|(i, s)| record(i as u64 + 1, s, 10))
            .collect();
        let groups = group(&records, 2);
        assert_eq!(
            groups,
            vec![0..1, 1..2, 2..3, 3..5, 5..6, 6..8, 8..10, 10..11]
        );
        assert_eq!(group(&records, 1).len(), records.len());
        // The byte limit splits a batch too.
        let big: Vec<_> = (1..=3)
            .map(|i| record(i, Results, MAX_PUBLISH_BYTES / 2))
            .collect();
        assert_eq!(group(&big, 32), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn a_batch_is_a_json_array_of_the_records() {
        let mut one = vec![record(1, Stream::Results, 0)];
        one[0].payload = br#"{"a":1}"#.to_vec();
        assert_eq!(publish_payload(&mut one), br#"{"a":1}"#);
        let mut two = vec![one[0].clone(), one[0].clone()];
        two[0].payload = br#"{"a":1}"#.to_vec();
        two[1].payload = br#"{"b":2}"#.to_vec();
        let v: serde_json::Value = serde_json::from_slice(&publish_payload(&mut two)).unwrap();
        assert_eq!(v, serde_json::json!([{"a": 1}, {"b": 2}]));
    }
}
