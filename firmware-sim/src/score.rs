//! `firmware-sim score`: an anomaly detector's decisions (the gateway's `anomalies` view)
//! against the labels `scenario --labels` wrote.
//!
//! The rules, chosen so the score counts what the detector knew when it decided:
//! - A detection **matches** a label of its kind (same device; same sensor unless either is
//!   device-level) when its decision, `raised_ts_ms`, falls inside the labelled span or within
//!   the tolerance after its end. Where it placed `ts_ms` in hindsight does not count.
//! - Each label is found at most once (its earliest matching decision); further matches of
//!   a found label are neither true nor false positives.
//! - A detection that matches no label of its kind but does match a label of another kind
//!   counts as `other_kind` for its kind (the detector saw something real, but named it
//!   differently); in the overall score, where kinds are ignored, it is a match.
//! - Every other detection is a false positive. The delay of a found label is
//!   `raised_ts_ms - from_ms`, also in the device's usual reading intervals.
//! - `traffic` and `security` anomalies are not labelled by scenarios and are left out.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Kinds a scenario labels.
pub const KINDS: [&str; 4] = ["spike", "drift", "stuck", "dropout"];

/// One label line.
#[derive(Debug, Clone, Deserialize)]
pub struct LabelLine {
    /// The device.
    pub device_id: String,
    /// The sensor, or "*".
    pub sensor: String,
    /// Its kind (`level-shift` counts as `drift`).
    pub kind: String,
    /// First affected reading.
    pub from_ms: i64,
    /// Last affected reading.
    pub to_ms: i64,
}

/// One detection read from the store.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The device.
    pub device_id: String,
    /// The sensor, if not device-level.
    pub sensor: Option<String>,
    /// Its kind.
    pub kind: String,
    /// When it decided (reading timestamp).
    pub raised_ts_ms: i64,
}

/// Scores of one kind (or of all kinds).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct KindScore {
    /// Labels.
    pub labels: u64,
    /// Labels found.
    pub found: u64,
    /// Detections that matched no label.
    pub false_positives: u64,
    /// Detections that matched a label of another kind only.
    pub other_kind: u64,
    /// found / (found + false positives); 1 with no detections.
    pub precision: f64,
    /// found / labels; 1 with no labels.
    pub recall: f64,
    /// Harmonic mean of the two.
    pub f1: f64,
    /// Median delay of the found labels, ms (device clock).
    pub median_delay_ms: Option<f64>,
    /// The same in the device's usual reading intervals.
    pub median_delay_intervals: Option<f64>,
}

/// The whole score.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Score {
    /// Per kind.
    pub kinds: HashMap<String, KindScore>,
    /// Every kind together, kinds ignored when matching.
    pub overall: KindScore,
    /// Device-hours of data judged (first to last reading per device).
    pub device_hours: f64,
    /// Overall false positives per device-hour.
    pub false_positives_per_device_hour: f64,
    /// The tolerance used, ms (0: per device, 5 reading intervals).
    pub tolerance_ms: i64,
}

fn normalise(kind: &str) -> &str {
    match kind {
        "level-shift" | "level_shift" => "drift",
        k => k,
    }
}

/// Reads the labels file.
pub fn read_labels(path: &Path) -> anyhow::Result<Vec<LabelLine>> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

/// What the store holds: detections, and per device its usual interval and span.
pub struct StoreView {
    /// Detections of the labelled kinds.
    pub detections: Vec<Detection>,
    /// device -> (median interval ms, first ts, last ts).
    pub devices: HashMap<String, (f64, i64, i64)>,
}

/// Reads detections and device rhythms from the gateway store at `db` (read-only).
pub fn read_store(db: &Path) -> Result<StoreView, rusqlite::Error> {
    let conn = crate::verify::open_store(db)?;
    let mut stmt = conn.prepare(
        "SELECT device_id, sensor, kind, raised_ts_ms FROM anomalies
         WHERE kind IN ('spike', 'drift', 'stuck', 'dropout') AND device_id IS NOT NULL",
    )?;
    let detections = stmt
        .query_map([], |r| {
            Ok(Detection {
                device_id: r.get(0)?,
                sensor: r.get(1)?,
                kind: r.get(2)?,
                raised_ts_ms: r.get(3)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut devices = HashMap::new();
    let mut series = conn.prepare(
        "SELECT d.device_id, MIN(se.id), d.id FROM series se JOIN devices d ON d.id = se.device
         GROUP BY d.device_id",
    )?;
    let list = series
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut ts = conn.prepare(
        "SELECT DISTINCT ts_ms FROM readings WHERE device = ?2 AND series = ?1 ORDER BY ts_ms",
    )?;
    for (device, id, row) in list {
        let stamps = ts
            .query_map([id, row], |r| r.get::<_, i64>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        let (Some(first), Some(last)) = (stamps.first(), stamps.last()) else {
            continue;
        };
        let mut gaps: Vec<i64> = stamps.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.sort_unstable();
        let median = gaps.get(gaps.len() / 2).copied().unwrap_or(1000) as f64;
        devices.insert(device, (median.max(1.0), *first, *last));
    }
    Ok(StoreView {
        detections,
        devices,
    })
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Scores `view` against `labels`; `tolerance_ms` 0 means five reading intervals of the
/// device.
pub fn score(labels: &[LabelLine], view: &StoreView, tolerance_ms: i64) -> Score {
    let interval = |device: &str| view.devices.get(device).map_or(1000.0, |d| d.0);
    let tolerance = |device: &str| {
        if tolerance_ms > 0 {
            tolerance_ms
        } else {
            (5.0 * interval(device)).round() as i64
        }
    };
    let hits = |l: &LabelLine, d: &Detection| {
        d.device_id == l.device_id
            && (l.sensor == "*" || d.sensor.as_deref().is_none_or(|s| s == l.sensor))
            && d.raised_ts_ms >= l.from_ms
            && d.raised_ts_ms <= l.to_ms + tolerance(&l.device_id)
    };
    // Kind-aware, then kind-blind (overall).
    let judge = |kind: Option<&str>| -> KindScore {
        let ls: Vec<&LabelLine> = labels
            .iter()
            .filter(|l| kind.is_none_or(|k| normalise(&l.kind) == k))
            .collect();
        let ds: Vec<&Detection> = view
            .detections
            .iter()
            .filter(|d| kind.is_none_or(|k| normalise(&d.kind) == k))
            .collect();
        let mut s = KindScore {
            labels: ls.len() as u64,
            ..KindScore::default()
        };
        let mut delays = Vec::new();
        let mut delays_n = Vec::new();
        for l in &ls {
            if let Some(first) = ds
                .iter()
                .filter(|d| hits(l, d))
                .map(|d| d.raised_ts_ms)
                .min()
            {
                s.found += 1;
                let delay = (first - l.from_ms) as f64;
                delays.push(delay);
                delays_n.push(delay / interval(&l.device_id));
            }
        }
        for d in &ds {
            if ls.iter().any(|l| hits(l, d)) {
                continue;
            }
            if labels.iter().any(|l| hits(l, d)) {
                s.other_kind += 1;
            } else {
                s.false_positives += 1;
            }
        }
        s.precision = if s.found + s.false_positives == 0 {
            1.0
        } else {
            s.found as f64 / (s.found + s.false_positives) as f64
        };
        s.recall = if s.labels == 0 {
            1.0
        } else {
            s.found as f64 / s.labels as f64
        };
        s.f1 = if s.precision + s.recall == 0.0 {
            0.0
        } else {
            2.0 * s.precision * s.recall / (s.precision + s.recall)
        };
        s.median_delay_ms = median(&mut delays);
        s.median_delay_intervals = median(&mut delays_n);
        s
    };
    let kinds = KINDS
        .iter()
        .map(|k| (k.to_string(), judge(Some(k))))
        .collect();
    let overall = judge(None);
    let device_hours: f64 = view
        .devices
        .values()
        .map(|(_, first, last)| (last - first) as f64 / 3_600_000.0)
        .sum();
    Score {
        kinds,
        false_positives_per_device_hour: if device_hours > 0.0 {
            overall.false_positives as f64 / device_hours
        } else {
            0.0
        },
        overall,
        device_hours,
        tolerance_ms,
    }
}

impl Score {
    /// The score as a table for people.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<8} {:>6} {:>6} {:>5} {:>6} {:>9} {:>7} {:>5} {:>12} {:>10}\n",
            "kind",
            "labels",
            "found",
            "FP",
            "other",
            "precision",
            "recall",
            "F1",
            "delay (ms)",
            "(intervals)"
        );
        let row = |name: &str, s: &KindScore| {
            format!(
                "{:<8} {:>6} {:>6} {:>5} {:>6} {:>9.3} {:>7.3} {:>5.3} {:>12} {:>10}\n",
                name,
                s.labels,
                s.found,
                s.false_positives,
                s.other_kind,
                s.precision,
                s.recall,
                s.f1,
                s.median_delay_ms.map_or("-".into(), |d| format!("{d:.0}")),
                s.median_delay_intervals
                    .map_or("-".into(), |d| format!("{d:.2}")),
            )
        };
        for k in KINDS {
            if let Some(s) = self.kinds.get(k) {
                out += &row(k, s);
            }
        }
        out += &row("overall", &self.overall);
        out += &format!(
            "{:.1} device-hours, {:.3} false positives per device-hour\n",
            self.device_hours, self.false_positives_per_device_hour
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(kind: &str, from: i64, to: i64) -> LabelLine {
        LabelLine {
            device_id: "d".into(),
            sensor: "t".into(),
            kind: kind.into(),
            from_ms: from,
            to_ms: to,
        }
    }

    fn det(kind: &str, raised: i64) -> Detection {
        Detection {
            device_id: "d".into(),
            sensor: Some("t".into()),
            kind: kind.into(),
            raised_ts_ms: raised,
        }
    }

    fn view(detections: Vec<Detection>) -> StoreView {
        StoreView {
            detections,
            devices: HashMap::from([("d".to_string(), (1000.0, 0, 3_600_000))]),
        }
    }

    #[test]
    fn decisions_in_the_span_or_the_tolerance_match_once() {
        let labels = [
            label("spike", 10_000, 10_000),
            label("stuck", 50_000, 60_000),
        ];
        let v = view(vec![
            det("spike", 11_000), // one interval late: found
            det("spike", 12_000), // same label again: neither
            det("spike", 30_000), // nothing there: FP
            det("spike", 61_000), // a stuck label's echo: other kind
            det("stuck", 49_000), // decided before the label began: FP
            det("stuck", 57_000), // found
        ]);
        let s = score(&labels, &v, 0);
        let spike = &s.kinds["spike"];
        assert_eq!(
            (
                spike.labels,
                spike.found,
                spike.false_positives,
                spike.other_kind
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(spike.median_delay_intervals, Some(1.0));
        let stuck = &s.kinds["stuck"];
        assert_eq!((stuck.found, stuck.false_positives), (1, 1));
        assert_eq!(stuck.median_delay_ms, Some(7000.0));
        assert_eq!((s.overall.found, s.overall.false_positives), (2, 2));
        assert!((s.false_positives_per_device_hour - 2.0).abs() < 1e-9);
        assert!((spike.precision - 0.5).abs() < 1e-9 && (spike.recall - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_dropout_label_takes_a_device_level_detection() {
        let labels = [LabelLine {
            sensor: "*".into(),
            ..label("dropout", 5_000, 9_000)
        }];
        let v = view(vec![Detection {
            sensor: None,
            ..det("dropout", 6_500)
        }]);
        let s = score(&labels, &v, 0);
        assert_eq!(s.kinds["dropout"].found, 1);
        assert_eq!(s.kinds["dropout"].f1, 1.0);
    }
}
