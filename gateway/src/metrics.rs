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
    /// Readings, events and finished commands deleted by `store.retention`.
    pub rows_pruned: AtomicU64,
    /// TLS handshakes on the device listener that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// WARN lines for link closes, by `ErrorCode`.
    link_error_log: [Throttle; ERROR_CODES],
    /// WARN lines for failed TLS handshakes.
    pub tls_failure_log: Throttle,
}

/// At most one WARN line of a kind (a link error code, a failed TLS handshake) in this
/// window; the rest are counted (and logged at DEBUG), so a storm of bad devices costs a line
/// a minute, not a line a link.
pub const WARN_WINDOW_MS: u64 = 60_000;

/// One kind of WARN line, at most once per [`WARN_WINDOW_MS`].
#[derive(Debug, Default)]
pub struct Throttle {
    /// When it was last logged (Unix ms, 0: never).
    logged_ms: AtomicU64,
    /// Occurrences not logged since.
    unlogged: AtomicU64,
}

impl Throttle {
    /// Whether an occurrence at `now_ms` should be logged: `Some(n)` with the occurrences
    /// not logged since the last line, or `None` (counted) within the window of it.
    pub fn check(&self, now_ms: u64) -> Option<u64> {
        let previous = self.logged_ms.load(Ordering::Relaxed);
        let due = previous == 0 || now_ms.saturating_sub(previous) >= WARN_WINDOW_MS;
        // Of occurrences at once, the one that moves the stamp logs.
        if due
            && self
                .logged_ms
                .compare_exchange(
                    previous,
                    now_ms.max(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.unlogged.swap(0, Ordering::Relaxed));
        }
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        None
    }
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
        self.link_errors[Self::code_index(code)].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a link closed with `code` at `now_ms` should be logged at WARN: `Some(n)`
    /// with the closes of that code not logged since the last WARN, or `None` (counted)
    /// within [`WARN_WINDOW_MS`] of it.
    pub fn link_error_to_log(&self, code: ErrorCode, now_ms: u64) -> Option<u64> {
        self.link_error_log[Self::code_index(code)].check(now_ms)
    }

    fn code_index(code: ErrorCode) -> usize {
        let i = code as usize;
        if i < ERROR_CODES {
            i
        } else {
            0
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warn_per_code_per_window_and_the_rest_are_counted() {
        let m = Metrics::default();
        let t0 = 1_700_000_000_000;
        assert_eq!(m.link_error_to_log(ErrorCode::AuthFailed, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(
                m.link_error_to_log(ErrorCode::AuthFailed, t0 + i * 1000),
                None
            );
        }
        // Another code has its own window.
        assert_eq!(
            m.link_error_to_log(ErrorCode::BadFraming, t0 + 2000),
            Some(0)
        );
        // After the window the next close logs, saying how many were not.
        assert_eq!(
            m.link_error_to_log(ErrorCode::AuthFailed, t0 + WARN_WINDOW_MS),
            Some(5)
        );
        assert_eq!(
            m.link_error_to_log(ErrorCode::AuthFailed, t0 + WARN_WINDOW_MS + 1),
            None
        );
    }
}
