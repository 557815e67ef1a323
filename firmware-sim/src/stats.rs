//! Counters every device of a fleet updates as it goes (sent, acked, resent, reconnects,
//! pacing, errors, ack latency). The device model writes them; reports and the progress line
//! above it read them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use proto::v1::ErrorCode;

/// Counters shared by all devices of a fleet.
pub struct FleetStats {
    /// Links that got their HelloAck (live; for connect-storm timing).
    pub hello_acks: AtomicU64,
    /// Data frames acknowledged so far (live).
    pub frames_acked: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) frames_resent: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) config_updates: AtomicU64,
    pub(crate) errors: Mutex<BTreeMap<String, u64>>,
    /// Ack latency in microseconds, from a frame's first send to its ack.
    pub(crate) latency_us: Mutex<Histogram<u64>>,
}

impl Default for FleetStats {
    fn default() -> Self {
        Self {
            hello_acks: AtomicU64::new(0),
            frames_acked: AtomicU64::new(0),
            frames_sent: AtomicU64::new(0),
            frames_resent: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            config_updates: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            // 1 µs to 1 hour at 3 significant digits; the bounds are constants, so this
            // cannot fail.
            latency_us: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!()),
            ),
        }
    }
}

impl FleetStats {
    pub(crate) fn add_sent(&self, n: u64) {
        self.frames_sent.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn add_resent(&self, n: u64) {
        self.frames_resent.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn inc_reconnects(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn inc_config_updates(&self) {
        self.config_updates.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn record_error(&self, code: ErrorCode) {
        self.count_error(code.as_str_name());
    }
    /// A TLS handshake with the gateway failed (counted as `TLS_HANDSHAKE_FAILED`).
    pub(crate) fn record_tls_failure(&self) {
        self.count_error("TLS_HANDSHAKE_FAILED");
    }
    fn count_error(&self, name: &str) {
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *errors.entry(name.to_owned()).or_default() += 1;
    }
    pub(crate) fn record_acks(&self, latencies: &[Duration]) {
        if latencies.is_empty() {
            return;
        }
        self.frames_acked
            .fetch_add(latencies.len() as u64, Ordering::Relaxed);
        let mut h = self.latency_us.lock().unwrap_or_else(|e| e.into_inner());
        for l in latencies {
            h.saturating_record(l.as_micros().clamp(1, u64::MAX as u128) as u64);
        }
    }
}
