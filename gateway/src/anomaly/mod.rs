//! Streaming anomaly detection at the edge.
//!
//! The detector runs beside ingest, fed by the writer's **committed** batches through the live
//! hub (a bounded broadcast): it never delays an ack, and when it falls behind the hub drops
//! its oldest batches for it, which it counts (`gateway_anomaly_skipped_batches_total`).
//!
//! - [`series`]: per (device, sensor) detectors on the readings' own timestamps: `spike`,
//!   `drift` (level shifts and slope changes) and `stuck`.
//! - [`cadence`]: per device, `dropout`: silence far longer than its usual interval, on the
//!   gateway's clock for a live device and as a gap in timestamps for replayed data.
//! - [`traffic`]: the gateway's own view of its links: a device's frame rate far above its
//!   usual (`traffic`), and a source address with a burst of failed Hellos or bad frames
//!   (`security`, which also slows that source's next Hellos).
//! - [`task`]: the task that owns all of that state and hands findings to the store writer
//!   (the `anomalies` table and the MQTT outbox), the live feed and `/metrics`.
//! - [`config`]: the `[anomaly]` section.

pub mod cadence;
pub mod config;
pub mod series;
pub mod task;
pub mod traffic;

use serde::Serialize;

/// What kind of anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A value far outside the series' recent behaviour, for a few readings.
    Spike,
    /// A sustained change of level or slope.
    Drift,
    /// One value repeated far longer than the series usually repeats one.
    Stuck,
    /// A device silent far longer than its usual interval.
    Dropout,
    /// A device sending far above its usual frame rate.
    Traffic,
    /// A source address with a burst of failed Hellos or bad frames.
    Security,
}

impl Kind {
    /// Every kind, in a fixed order.
    pub const ALL: [Kind; 6] = [
        Kind::Spike,
        Kind::Drift,
        Kind::Stuck,
        Kind::Dropout,
        Kind::Traffic,
        Kind::Security,
    ];

    /// Its name in the store, on MQTT, in the API and in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Spike => "spike",
            Kind::Drift => "drift",
            Kind::Stuck => "stuck",
            Kind::Dropout => "dropout",
            Kind::Traffic => "traffic",
            Kind::Security => "security",
        }
    }

    /// The kind named `s` (`level-shift` is a drift).
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "level-shift" | "level_shift" => Some(Kind::Drift),
            _ => Kind::ALL.into_iter().find(|k| k.name() == s),
        }
    }
}

/// One decision of a detector, before the task gives it an id and a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// What kind.
    pub kind: Kind,
    /// Which detector decided (`robust-z`, `level-shift`, `cusum-slope`, `repeat`, ...).
    pub detector: &'static str,
    /// 0..1: 0.5 at the detector's threshold, towards 1 far beyond.
    pub score: f64,
    /// Timestamp of the first anomalous reading (possibly placed in hindsight).
    pub ts_ms: i64,
    /// Timestamp of the last one (equal for a point; moves when an ongoing one ends).
    pub to_ms: i64,
    /// Timestamp of the reading at which the detector decided.
    pub raised_ts_ms: i64,
    /// The reading's value, where one applies.
    pub value: Option<f64>,
    /// A sentence for people.
    pub detail: String,
    /// Still under way: an end with the same kind and `ts_ms` follows.
    pub ongoing: bool,
}

impl Finding {
    /// A finding decided at `raised`, spanning `from` to `from`.
    pub fn point(
        kind: Kind,
        detector: &'static str,
        score: f64,
        from: i64,
        raised: i64,
        value: f64,
        detail: String,
    ) -> Self {
        Finding {
            kind,
            detector,
            score,
            ts_ms: from,
            to_ms: from,
            raised_ts_ms: raised,
            value: Some(value),
            detail,
            ongoing: false,
        }
    }

    /// The end of the ongoing finding of `kind` that began at `from`: it lasted to `to`.
    pub fn end(kind: Kind, from: i64, to: i64) -> Self {
        Finding {
            kind,
            detector: "",
            score: 0.0,
            ts_ms: from,
            to_ms: to,
            raised_ts_ms: to,
            value: None,
            detail: String::new(),
            ongoing: false,
        }
    }

    /// Whether this closes an ongoing finding rather than raising one.
    pub fn is_end(&self) -> bool {
        self.detector.is_empty()
    }
}
