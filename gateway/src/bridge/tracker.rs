//! Which outbox rows the broker has acknowledged, for one MQTT connection.
//!
//! rumqttc does not say which request a packet id belongs to, but it reports each outgoing
//! PUBLISH (`Outgoing::Publish(pkid)`) in the order the requests were made. The publisher
//! pushes a tag for every publish before handing it to the client; the event loop pops one per
//! outgoing PUBLISH and pairs it with the packet id; a PUBACK then names the outbox row. The
//! watermark is the highest id below which every row is acknowledged: the durable cursor may
//! move up to it. A pure data structure: no I/O, no awaiting, safe to use from the task that
//! polls the event loop.

use std::collections::{BTreeSet, HashMap, VecDeque};

/// Outbox ids in flight on one connection.
#[derive(Debug)]
pub struct Tracker {
    /// One entry per publish request not yet seen leaving: `Some(outbox id)`, or `None` for
    /// publishes that are not outbox rows (status messages).
    fifo: VecDeque<Option<i64>>,
    /// Packet id to outbox id, for publishes awaiting PUBACK.
    inflight: HashMap<u16, i64>,
    /// Outbox ids handed to the client and not yet acknowledged.
    outstanding: BTreeSet<i64>,
    /// The highest outbox id handed to the client (or skipped), or where this connection
    /// started.
    max_pushed: i64,
}

impl Tracker {
    /// A tracker for a connection that resumes after outbox id `start_after`.
    pub fn new(start_after: i64) -> Self {
        Self {
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            outstanding: BTreeSet::new(),
            max_pushed: start_after,
        }
    }

    /// A publish request is about to be made; `outbox_id` if it carries that row.
    pub fn push(&mut self, outbox_id: Option<i64>) {
        self.fifo.push_back(outbox_id);
        if let Some(id) = outbox_id {
            self.outstanding.insert(id);
            self.max_pushed = self.max_pushed.max(id);
        }
    }

    /// A row that will not be published (its body did not decode) counts as done. Returns
    /// the new watermark.
    pub fn skip(&mut self, outbox_id: i64) -> i64 {
        self.max_pushed = self.max_pushed.max(outbox_id);
        self.watermark()
    }

    /// rumqttc sent the next publish with `pkid`. Returns the new watermark if a QoS 0
    /// publish completed a row at once.
    pub fn on_outgoing(&mut self, pkid: u16) -> Option<i64> {
        let id = self.fifo.pop_front()??;
        if pkid == 0 {
            self.outstanding.remove(&id);
            return Some(self.watermark());
        }
        self.inflight.insert(pkid, id);
        None
    }

    /// The broker acknowledged `pkid`. Returns the new watermark if it was an outbox row.
    pub fn on_puback(&mut self, pkid: u16) -> Option<i64> {
        let id = self.inflight.remove(&pkid)?;
        self.outstanding.remove(&id);
        Some(self.watermark())
    }

    /// Every outbox id at or below this is acknowledged (or skipped).
    pub fn watermark(&self) -> i64 {
        self.outstanding
            .first()
            .map_or(self.max_pushed, |first| first - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_moves_only_over_a_contiguous_acknowledged_prefix() {
        let mut t = Tracker::new(10);
        assert_eq!(t.watermark(), 10);
        t.push(Some(11));
        t.push(None); // a status message between rows
        t.push(Some(12));
        t.push(Some(13));
        assert_eq!(t.on_outgoing(1), None);
        assert_eq!(t.on_outgoing(2), None);
        assert_eq!(t.on_outgoing(3), None);
        assert_eq!(t.on_outgoing(4), None);
        assert_eq!(t.watermark(), 10);
        // PUBACK for the status message: not an outbox row.
        assert_eq!(t.on_puback(2), None);
        // 12 acknowledged before 11: the cursor may not pass 11.
        assert_eq!(t.on_puback(3), Some(10));
        assert_eq!(t.on_puback(1), Some(12));
        assert_eq!(t.on_puback(4), Some(13));
        assert_eq!(t.on_puback(4), None, "a repeated PUBACK changes nothing");
    }

    #[test]
    fn skipped_rows_do_not_hold_the_cursor_back() {
        let mut t = Tracker::new(0);
        assert_eq!(t.skip(1), 1);
        t.push(Some(2));
        t.on_outgoing(7);
        assert_eq!(t.skip(3), 1);
        assert_eq!(t.on_puback(7), Some(3));
    }

    #[test]
    fn a_packet_id_reused_after_its_ack_maps_to_the_new_row() {
        let mut t = Tracker::new(0);
        t.push(Some(1));
        t.on_outgoing(1);
        assert_eq!(t.on_puback(1), Some(1));
        t.push(Some(2));
        t.on_outgoing(1);
        assert_eq!(t.on_puback(1), Some(2));
    }
}
