//! Counters of what the gateway did, shared by every component as `Arc<Metrics>`.
//!
//! Plain atomics updated once per batch or per link event (never per reading), read by the
//! periodic summary log and by tests. No device id is ever a label here.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use proto::v1::ErrorCode;

/// Number of `ErrorCode` values counted (codes at or above this are counted as
/// `Unspecified`).
const ERROR_CODES: usize = 16;

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// TCP connections accepted.
    pub connections_accepted: AtomicU64,
    /// Links that completed Hello and are open now.
    pub sessions_active: AtomicI64,
    /// Data frames committed for the first time.
    pub frames_stored: AtomicU64,
    /// Data frames acknowledged again without storing (resends of stored frames).
    pub frames_duplicate: AtomicU64,
    /// Readings committed.
    pub readings_stored: AtomicU64,
    /// Transactions committed by the writer.
    pub batches_committed: AtomicU64,
    /// Transactions that failed (their links were closed unacknowledged).
    pub commit_failures: AtomicU64,
    /// Outbox rows the broker acknowledged (and the cursor passed).
    pub uplink_published: AtomicU64,
    /// Unpublished bytes in the outbox (gauge).
    pub uplink_backlog_bytes: AtomicI64,
    /// 1 while the backlog is at its budget and its policy applies (gauge).
    pub uplink_backlog_full: AtomicI64,
    /// Unpublished frames dropped by the `drop-oldest` policy (they stay in the store).
    pub uplink_dropped: AtomicU64,
    /// Outbox rows that did not decode and were skipped.
    pub uplink_skipped: AtomicU64,
    /// 1 while connected to the MQTT broker.
    pub mqtt_connected: AtomicI64,
    /// Successful MQTT connections (ConnAck).
    pub mqtt_connects: AtomicU64,
    /// Command requests received from the broker.
    pub commands_received: AtomicU64,
    /// Command requests dropped because the command queue was full.
    pub commands_dropped: AtomicU64,
    /// Serial frames dropped for bad COBS, bad CRC, size or decoding (not acknowledged).
    pub serial_bad_frames: AtomicU64,
    /// Serial frames skipped because an earlier frame was lost (not acknowledged).
    pub serial_frames_skipped: AtomicU64,
    /// Links closed with an error frame, by `ErrorCode`.
    link_errors: [AtomicU64; ERROR_CODES],
}

impl Metrics {
    /// Adds one to a counter.
    pub fn inc(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one committed batch of `frames`, of which `stored` were new, holding
    /// `readings` new readings.
    pub fn record_batch(&self, frames: u64, stored: u64, readings: u64) {
        self.batches_committed.fetch_add(1, Ordering::Relaxed);
        self.frames_stored.fetch_add(stored, Ordering::Relaxed);
        self.frames_duplicate
            .fetch_add(frames - stored, Ordering::Relaxed);
        self.readings_stored.fetch_add(readings, Ordering::Relaxed);
    }

    /// Records a link closed with `code`.
    pub fn record_link_error(&self, code: ErrorCode) {
        let i = (code as usize).min(ERROR_CODES - 1);
        let i = if i == ERROR_CODES - 1 { 0 } else { i };
        self.link_errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// How many links were closed with `code`.
    pub fn link_errors(&self, code: ErrorCode) -> u64 {
        self.link_errors
            .get(code as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Link errors by code name, leaving out zeros.
    pub fn link_error_summary(&self) -> Vec<(&'static str, u64)> {
        (0..ERROR_CODES as i32)
            .filter_map(|i| {
                let code = ErrorCode::try_from(i).ok()?;
                let n = self.link_errors(code);
                (n > 0).then(|| (code.as_str_name(), n))
            })
            .collect()
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
