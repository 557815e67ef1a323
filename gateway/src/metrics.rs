//! The gateway's metrics: one `prometheus-client` registry, shared by every component as
//! `Arc<Metrics>` and exposed at `GET /metrics`.
//!
//! Each field is a handle into the registry, updated where the event happens (once per batch
//! or per link event, never per reading); the summary log line and the tests read the same
//! handles, so there is one set of numbers. Names follow Prometheus conventions (the library
//! appends `_total` to counters and the unit to united metrics); no device id is ever a
//! label. Gauges that describe a state rather than an event (queue fill, backlog rows, store
//! size) are set by [`crate::stats`] once a second and again at each scrape.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use proto::v1::ErrorCode;

/// Number of `ErrorCode` values counted (codes at or above this are counted as
/// `Unspecified`).
const ERROR_CODES: usize = 16;

/// Link kinds, as the `link` label of connection counts.
pub const LINK_KINDS: [&str; 3] = ["tcp", "tls", "serial"];

/// Command outcomes, as the `outcome` label.
pub const OUTCOMES: [&str; 6] = ["ok", "error", "rejected", "timeout", "expired", "cancelled"];

type Label = [(&'static str, &'static str); 1];
type F64Gauge = Gauge<f64, AtomicU64>;

/// Gateway-wide metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Device links that started a session, by link kind (`tcp`, `tls`, `serial`).
    connections: [Counter; 3],
    /// Links that completed Hello and are open now.
    pub sessions_active: Gauge,
    /// Data frames committed for the first time.
    pub frames_stored: Counter,
    /// Data frames acknowledged again without storing (resends of stored frames).
    pub frames_duplicate: Counter,
    /// Readings committed.
    pub readings_stored: Counter,
    /// Transactions committed by the writer.
    pub batches_committed: Counter,
    /// Transactions that failed (their links were closed unacknowledged).
    pub commit_failures: Counter,
    /// 1 while the store is full (the disk, or `store.max_bytes`): nothing is acknowledged
    /// until a commit succeeds again.
    pub store_full: Gauge,
    /// Frames per committed batch.
    pub batch_frames: Histogram,
    /// Time one batch commit took.
    pub commit_seconds: Histogram,
    /// WAL checkpoints run (on their own thread, never in a commit).
    pub checkpoints: Counter,
    /// Checkpoints the writer finished itself between batches (the WAL had outgrown its
    /// soft bound under a sustained load).
    pub writer_checkpoints: Counter,
    /// Time one WAL checkpoint took.
    pub checkpoint_seconds: Histogram,
    /// Pages in the WAL at the last checkpoint.
    pub wal_frames: Gauge,
    /// From a frame's arrival to the Ack that covers it (the oldest frame of each Ack).
    pub ack_latency: Histogram,
    /// How full the store writer's queue is, 0 to 1.
    pub store_queue_fill: F64Gauge,
    /// Frames that found the store queue full (their session waited: backpressure).
    pub store_queue_full: Counter,
    /// Size of the SQLite files (database and WAL).
    pub store_bytes: Gauge,
    /// Outbox rows the broker acknowledged (and the cursor passed).
    pub uplink_published: Counter,
    /// Unpublished bytes in the outbox.
    pub uplink_backlog_bytes: Gauge,
    /// Unpublished rows in the outbox.
    pub uplink_backlog_rows: Gauge,
    /// 1 while the backlog is at its budget and its policy applies.
    pub uplink_backlog_full: Gauge,
    /// Unpublished frames dropped by the `drop-oldest` policy (they stay in the store).
    pub uplink_dropped: Counter,
    /// Outbox rows that did not decode and were skipped.
    pub uplink_skipped: Counter,
    /// 1 while connected to the MQTT broker.
    pub mqtt_connected: Gauge,
    /// Successful MQTT connections (ConnAck).
    pub mqtt_connects: Counter,
    /// Command requests received (MQTT and HTTP).
    pub commands_received: Counter,
    /// Command requests dropped because the command queue was full.
    pub commands_dropped: Counter,
    /// Commands that reached an outcome, by outcome.
    command_outcomes: [Counter; 6],
    /// Serial frames dropped for bad COBS, bad CRC, size or decoding (not acknowledged).
    pub serial_bad_frames: Counter,
    /// Serial frames skipped because an earlier frame was lost (not acknowledged).
    pub serial_frames_skipped: Counter,
    /// Links closed with an error frame, by `ErrorCode`.
    link_errors: [Counter; ERROR_CODES],
    /// Readings, events and finished commands deleted by `store.retention`.
    pub rows_pruned: Counter,
    /// TLS handshakes on the device listener that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// The report interval paced devices are asked to keep now (0: no limit), seconds.
    pub pacing_interval: F64Gauge,
    /// Devices paced now.
    pub pacing_devices: Gauge,
    /// The pacer's pressure (1: at a target: queue fill, commit wait or MQTT backlog).
    pub pacing_pressure: F64Gauge,
    /// The store queue fill the pacer holds to (`pacing.target_queue_fill`).
    pub pacing_target_fill: F64Gauge,
    /// Times pacing began.
    pub pacing_episodes: Counter,
    /// WebSocket clients of the live feed now.
    pub live_clients: Gauge,
    /// Live messages a slow WebSocket client missed (it was told, and went on from live).
    pub live_lagged: Counter,
    /// HTTP requests refused for a missing or wrong token.
    pub http_unauthorized: Counter,
    /// Anomalies raised, by kind.
    anomalies: [Counter; 6],
    /// Anomaly findings dropped (the writer's anomaly queue was full, or storing failed).
    pub anomalies_dropped: Counter,
    /// Committed batches the detector skipped because it fell behind.
    pub anomaly_skipped_batches: Counter,
    /// Readings the detector judged.
    pub anomaly_readings: Counter,
    /// Readings the detector did not judge: late (older than their series' newest), NaN, or
    /// past `anomaly.max_series`.
    pub anomaly_readings_skipped: Counter,
    /// Series the detector tracks.
    pub anomaly_series: Gauge,
    /// Time the detector spent judging (its share of a core is the rate of this).
    pub anomaly_busy_seconds: Counter<f64, AtomicU64>,
    /// Links refused at connect because their address had a burst of failures.
    pub security_refused: Counter,
    /// Times each `[limits]` setting was hit, in the order of [`crate::limits::LIMITS`].
    pub limits_hit: [Counter; crate::limits::LIMITS.len()],
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

/// Registers a family with one label and returns a handle per label value, so the hot
/// path increments a counter without looking the label up.
fn labelled<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    let family = Family::<Label, Counter>::default();
    registry.register(name, help, family.clone());
    values.map(|v| family.get_or_create(&[(label, v)]).clone())
}

fn counter(registry: &mut Registry, name: &str, help: &str) -> Counter {
    let c = Counter::default();
    registry.register(name, help, c.clone());
    c
}

fn gauge(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Gauge {
    let g = Gauge::default();
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, g.clone()),
        None => registry.register(name, help, g.clone()),
    }
    g
}

fn histogram(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    buckets: impl Iterator<Item = f64>,
) -> Histogram {
    let h = Histogram::new(buckets);
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, h.clone()),
        None => registry.register(name, help, h.clone()),
    }
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let r = &mut Registry::with_prefix("gateway");
        let code_names: [&'static str; ERROR_CODES] = std::array::from_fn(|i| {
            ErrorCode::try_from(i as i32)
                .map(|c| c.as_str_name().trim_start_matches("ERROR_CODE_"))
                .unwrap_or("UNSPECIFIED")
        });
        let queue_fill = F64Gauge::default();
        r.register(
            "store_queue_fill_ratio",
            "How full the store writer's queue is (0 to 1)",
            queue_fill.clone(),
        );
        let pacing = F64Gauge::default();
        r.register_with_unit(
            "pacing_report_interval",
            "Report interval paced devices are asked to keep now (0: no limit)",
            Unit::Seconds,
            pacing.clone(),
        );
        let pressure = F64Gauge::default();
        r.register(
            "pacing_pressure",
            "The pacer's pressure: 1 at a target (queue fill, commit wait, MQTT backlog)",
            pressure.clone(),
        );
        let target_fill = F64Gauge::default();
        r.register(
            "pacing_target_queue_fill",
            "The store queue fill the pacer holds to",
            target_fill.clone(),
        );
        Self {
            connections: labelled(
                r,
                "connections",
                "Device links that started a session, by link kind",
                "link",
                LINK_KINDS,
            ),
            sessions_active: gauge(r, "sessions_active", "Devices with an open session", None),
            frames_stored: counter(r, "frames_stored", "Data frames committed to the store"),
            frames_duplicate: counter(
                r,
                "frames_duplicate",
                "Resent frames acknowledged again without storing",
            ),
            readings_stored: counter(r, "readings_stored", "Readings committed to the store"),
            batches_committed: counter(r, "store_batches", "Store transactions committed"),
            commit_failures: counter(
                r,
                "store_commit_failures",
                "Store transactions that failed (their links closed unacknowledged)",
            ),
            store_full: gauge(
                r,
                "store_full",
                "1 while the store is full (disk full or store.max_bytes): devices are held back and nothing is acknowledged",
                None,
            ),
            batch_frames: histogram(
                r,
                "store_batch_frames",
                "Frames per committed batch",
                None,
                exponential_buckets(1.0, 2.0, 13),
            ),
            commit_seconds: histogram(
                r,
                "store_commit",
                "Time one batch commit took",
                Some(Unit::Seconds),
                exponential_buckets(0.0001, 2.0, 16),
            ),
            checkpoints: counter(
                r,
                "store_checkpoints",
                "WAL checkpoints run (on their own thread, never inside a commit)",
            ),
            writer_checkpoints: counter(
                r,
                "store_writer_checkpoints",
                "WAL checkpoints the writer finished between batches (WAL over its soft bound)",
            ),
            checkpoint_seconds: histogram(
                r,
                "store_checkpoint",
                "Time one WAL checkpoint took",
                Some(Unit::Seconds),
                exponential_buckets(0.0001, 2.0, 16),
            ),
            wal_frames: gauge(
                r,
                "store_wal_pages",
                "Pages in the WAL at the last checkpoint",
                None,
            ),
            ack_latency: histogram(
                r,
                "device_ack_latency",
                "From a frame's arrival to the Ack covering it (oldest frame of each Ack)",
                Some(Unit::Seconds),
                exponential_buckets(0.0001, 2.0, 16),
            ),
            store_queue_fill: queue_fill,
            store_queue_full: counter(
                r,
                "store_queue_full",
                "Frames that found the store queue full (their link waited: backpressure)",
            ),
            store_bytes: gauge(
                r,
                "store_size",
                "Size of the SQLite database and WAL files",
                Some(Unit::Bytes),
            ),
            uplink_published: counter(
                r,
                "mqtt_published",
                "Stored frames the MQTT broker acknowledged",
            ),
            uplink_backlog_bytes: gauge(
                r,
                "mqtt_backlog",
                "Unpublished frames kept for the broker",
                Some(Unit::Bytes),
            ),
            uplink_backlog_rows: gauge(
                r,
                "mqtt_backlog_rows",
                "Unpublished outbox rows kept for the broker",
                None,
            ),
            uplink_backlog_full: gauge(
                r,
                "mqtt_backlog_full",
                "1 while the MQTT backlog is at its budget",
                None,
            ),
            uplink_dropped: counter(
                r,
                "mqtt_dropped",
                "Unpublished frames dropped by drop-oldest (they stay in the store)",
            ),
            uplink_skipped: counter(r, "mqtt_skipped", "Outbox rows that did not decode"),
            mqtt_connected: gauge(
                r,
                "mqtt_connected",
                "1 while connected to the MQTT broker",
                None,
            ),
            mqtt_connects: counter(r, "mqtt_connects", "Successful MQTT connections"),
            commands_received: counter(
                r,
                "commands_received",
                "Command requests received (MQTT and HTTP)",
            ),
            commands_dropped: counter(
                r,
                "commands_dropped",
                "Command requests dropped because the command queue was full",
            ),
            command_outcomes: labelled(
                r,
                "commands_completed",
                "Commands that reached an outcome, by outcome",
                "outcome",
                OUTCOMES,
            ),
            serial_bad_frames: counter(
                r,
                "serial_bad_frames",
                "Serial frames dropped for bad COBS, CRC, size or decoding",
            ),
            serial_frames_skipped: counter(
                r,
                "serial_frames_skipped",
                "Serial frames skipped after a lost frame",
            ),
            link_errors: labelled(
                r,
                "link_errors",
                "Device links closed with an error frame, by code",
                "code",
                code_names,
            ),
            rows_pruned: counter(
                r,
                "retention_rows_pruned",
                "Readings, events and finished commands deleted by retention",
            ),
            tls_handshake_failures: counter(
                r,
                "tls_handshake_failures",
                "Device TLS handshakes that failed or timed out",
            ),
            pacing_interval: pacing,
            pacing_devices: gauge(r, "pacing_devices", "Devices paced now", None),
            pacing_pressure: pressure,
            pacing_target_fill: target_fill,
            pacing_episodes: counter(r, "pacing_episodes", "Times pacing began"),
            live_clients: gauge(
                r,
                "live_clients",
                "WebSocket clients of the live feed",
                None,
            ),
            live_lagged: counter(
                r,
                "live_lagged_messages",
                "Live messages slow WebSocket clients missed",
            ),
            http_unauthorized: counter(
                r,
                "http_unauthorized",
                "HTTP requests refused for a missing or wrong token",
            ),
            anomalies: labelled(
                r,
                "anomalies",
                "Anomalies the detector raised, by kind",
                "kind",
                crate::anomaly::Kind::ALL.map(crate::anomaly::Kind::name),
            ),
            anomalies_dropped: counter(
                r,
                "anomalies_dropped",
                "Anomalies dropped because the store's anomaly queue was full",
            ),
            anomaly_skipped_batches: counter(
                r,
                "anomaly_skipped_batches",
                "Committed batches the anomaly detector skipped because it fell behind",
            ),
            anomaly_readings: counter(
                r,
                "anomaly_readings",
                "Readings the anomaly detector judged",
            ),
            anomaly_readings_skipped: counter(
                r,
                "anomaly_readings_skipped",
                "Readings the detector did not judge (late, NaN, or past max_series)",
            ),
            anomaly_series: gauge(r, "anomaly_series", "Series the detector tracks", None),
            anomaly_busy_seconds: {
                let c = Counter::<f64, AtomicU64>::default();
                r.register_with_unit(
                    "anomaly_busy",
                    "Time the anomaly detector spent judging",
                    Unit::Seconds,
                    c.clone(),
                );
                c
            },
            security_refused: counter(
                r,
                "security_refused",
                "Links refused at connect after a burst of failures from their address",
            ),
            limits_hit: labelled(
                r,
                "limits_hit",
                "Times a [limits] setting refused a link or frame, or slowed one, by limit",
                "limit",
                crate::limits::LIMITS,
            ),
            link_error_log: Default::default(),
            tls_failure_log: Throttle::default(),
            registry: std::mem::take(r),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Records an anomaly raised, of `kind`.
    pub fn record_anomaly(&self, kind: crate::anomaly::Kind) {
        self.anomalies[kind as usize].inc();
    }

    /// Anomalies raised of `kind`.
    pub fn anomalies(&self, kind: crate::anomaly::Kind) -> u64 {
        self.anomalies[kind as usize].get()
    }

    /// Records a link that started a session, of kind `link` (`tcp`, `tls`, `serial`).
    pub fn record_connection(&self, link: &str) {
        let i = LINK_KINDS.iter().position(|k| *k == link).unwrap_or(0);
        self.connections[i].inc();
    }

    /// Links that started a session, all kinds.
    pub fn connections_total(&self) -> u64 {
        self.connections.iter().map(Counter::get).sum()
    }

    /// Records a command outcome (`ok`, `error`, `rejected`, `timeout`, `expired`).
    pub fn record_outcome(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.command_outcomes[i].inc();
        }
    }

    /// Commands that reached `outcome`.
    pub fn outcomes(&self, outcome: &str) -> u64 {
        OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.command_outcomes[i].get())
    }

    /// Records one committed batch of `frames`, of which `stored` were new, holding
    /// `readings` new readings, committed in `seconds`.
    pub fn record_batch(&self, frames: u64, stored: u64, readings: u64, seconds: f64) {
        self.batches_committed.inc();
        self.frames_stored.inc_by(stored);
        self.frames_duplicate.inc_by(frames - stored);
        self.readings_stored.inc_by(readings);
        self.batch_frames.observe(frames as f64);
        self.commit_seconds.observe(seconds);
    }

    /// Records a link closed with `code`.
    pub fn record_link_error(&self, code: ErrorCode) {
        self.link_errors[Self::code_index(code)].inc();
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
        self.link_errors[Self::code_index(code)].get()
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

    #[test]
    fn the_exposition_names_follow_prometheus_conventions_and_count_by_code() {
        let m = Metrics::default();
        m.record_link_error(ErrorCode::AuthFailed);
        m.record_link_error(ErrorCode::AuthFailed);
        m.record_connection("tls");
        m.record_batch(10, 8, 64, 0.002);
        let text = m.encode();
        assert!(text.contains("gateway_link_errors_total{code=\"AUTH_FAILED\"} 2"));
        assert!(text.contains("gateway_connections_total{link=\"tls\"} 1"));
        assert!(text.contains("gateway_frames_stored_total 8"));
        assert!(text.contains("gateway_frames_duplicate_total 2"));
        assert!(text.contains("gateway_store_commit_seconds_count 1"));
        assert!(text.contains("gateway_mqtt_backlog_bytes 0"));
        assert!(text.ends_with("# EOF\n"));
    }
}
