//! `[anomaly]`: streaming anomaly detection. Everything is learned per series out of the
//! box; this section only tunes or turns off detectors, for all sensors or per sensor name
//! pattern (`[[anomaly.sensor]]`, first match wins).

use std::time::Duration;

use serde::Deserialize;

use super::series::Tuning;
use super::traffic::GuardPolicy;
use crate::config::ConfigError;

/// `[anomaly]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomalyConfig {
    /// Run detection at all. Default true.
    pub enabled: bool,
    /// Readings a series learns from before it may raise anything. Default 30.
    pub warmup: u32,
    /// After a restart, readings per series read back from the store to warm up on (so a
    /// restart raises no burst of false alarms). Default 200; 0: learn afresh.
    pub warmup_from_store: u32,
    /// `spike` threshold, in mean absolute deviations from both the previous reading and
    /// the recent level. Default 9.
    pub spike_threshold: f64,
    /// Longest excursion (readings) that is a spike; a longer one is a level shift
    /// (`drift`). Default 3.
    pub spike_max_readings: u8,
    /// `drift` CUSUM threshold, in standard deviations accumulated. Default 12.
    pub drift_threshold: f64,
    /// `stuck`: a value repeated this many times longer than the series' longest usual run.
    /// Default 3.
    pub stuck_factor: f64,
    /// `stuck`: fewest repeated readings ever called stuck. Default 8.
    pub stuck_min_readings: u32,
    /// `dropout`: silence (or a gap in timestamps) this many times the device's usual
    /// interval. Default 2.5.
    pub dropout_factor: f64,
    /// `dropout`: and at least this long on the device's own clock. Default 2s.
    #[serde(with = "humantime_serde")]
    pub dropout_min: Duration,
    /// `traffic`: a frame rate this many times the device's usual, over `traffic_window`.
    /// Default 5; 0 turns it off.
    pub traffic_factor: f64,
    /// `traffic`: the window a device's frame rate is measured over. Default 10s.
    #[serde(with = "humantime_serde")]
    pub traffic_window: Duration,
    /// Series (device × sensor) tracked at most; readings of further series are not judged
    /// and are counted. Default 1000000 (about 250 MB at most).
    pub max_series: usize,
    /// Findings waiting for the store writer at most; past it they are dropped and counted.
    /// Default 4096.
    pub queue: usize,
    /// `[anomaly.security]`: bursts of failed links from one address.
    pub security: SecurityConfig,
    /// Per sensor name pattern overrides (`*` matches any run of characters).
    pub sensor: Vec<SensorOverride>,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        let t = Tuning::default();
        Self {
            enabled: true,
            warmup: t.warmup,
            warmup_from_store: 200,
            spike_threshold: t.spike_z,
            spike_max_readings: t.spike_max,
            drift_threshold: t.drift_h,
            stuck_factor: t.stuck_factor,
            stuck_min_readings: t.stuck_min,
            dropout_factor: 2.5,
            dropout_min: Duration::from_secs(2),
            traffic_factor: 5.0,
            traffic_window: Duration::from_secs(10),
            max_series: 1_000_000,
            queue: 4096,
            security: SecurityConfig::default(),
            sensor: Vec::new(),
        }
    }
}

/// `[anomaly.security]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Watch failed links per source address at all. Default true.
    pub enabled: bool,
    /// Failed Hellos or bad frames from one address within `window` that make a burst.
    /// Default 20.
    pub failures: u32,
    /// The window failures are counted over. Default 60s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long an address is refused (`LIMIT_EXCEEDED` at connect) after its first burst;
    /// doubles with each further burst. Default 30s.
    #[serde(with = "humantime_serde")]
    pub penalty: Duration,
    /// Longest refusal. Default 10m.
    #[serde(with = "humantime_serde")]
    pub max_penalty: Duration,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failures: 20,
            window: Duration::from_secs(60),
            penalty: Duration::from_secs(30),
            max_penalty: Duration::from_secs(600),
        }
    }
}

/// `[[anomaly.sensor]]`: settings for sensors whose name matches `pattern`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorOverride {
    /// Sensor name pattern, `*` for any run of characters (`temp*`, `*_raw`).
    pub pattern: String,
    /// Detectors to run, of `spike`, `drift`, `stuck`; unset: all. `[]` turns the series
    /// detectors off for these sensors.
    pub detectors: Option<Vec<String>>,
    /// Overrides `anomaly.spike_threshold`.
    pub spike_threshold: Option<f64>,
    /// Overrides `anomaly.drift_threshold`.
    pub drift_threshold: Option<f64>,
    /// Overrides `anomaly.stuck_factor`.
    pub stuck_factor: Option<f64>,
    /// Overrides `anomaly.stuck_min_readings`.
    pub stuck_min_readings: Option<u32>,
}

/// A finite number above `min` (NaN and infinities are refused).
fn above(v: f64, min: f64) -> bool {
    v.is_finite() && v > min
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
pub fn matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let Some(first) = parts.next() else {
        return true;
    };
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

impl AnomalyConfig {
    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.into(),
            })
        };
        if !above(self.spike_threshold, 0.0) {
            return invalid("anomaly.spike_threshold", "must be above 0");
        }
        if self.spike_max_readings == 0 {
            return invalid("anomaly.spike_max_readings", "must be at least 1");
        }
        if !above(self.drift_threshold, 0.0) {
            return invalid("anomaly.drift_threshold", "must be above 0");
        }
        if !(above(self.stuck_factor, 1.0) || self.stuck_factor == 1.0) {
            return invalid("anomaly.stuck_factor", "must be at least 1");
        }
        if !above(self.dropout_factor, 1.0) {
            return invalid("anomaly.dropout_factor", "must be above 1");
        }
        if !(self.traffic_factor == 0.0 || above(self.traffic_factor, 1.0)) {
            return invalid("anomaly.traffic_factor", "must be 0 (off) or above 1");
        }
        if self.traffic_window < Duration::from_secs(1) {
            return invalid("anomaly.traffic_window", "must be at least 1s");
        }
        if self.queue == 0 {
            return invalid("anomaly.queue", "must be at least 1");
        }
        if self.security.failures == 0 {
            return invalid("anomaly.security.failures", "must be at least 1");
        }
        if self.security.penalty.is_zero() || self.security.max_penalty < self.security.penalty {
            return invalid(
                "anomaly.security.penalty",
                "must be above 0 and at most anomaly.security.max_penalty",
            );
        }
        for s in &self.sensor {
            for d in s.detectors.iter().flatten() {
                if !["spike", "drift", "stuck"].contains(&d.as_str()) {
                    return invalid(
                        "anomaly.sensor.detectors",
                        "each must be one of spike, drift, stuck",
                    );
                }
            }
            if s.pattern.is_empty() {
                return invalid("anomaly.sensor.pattern", "must not be empty");
            }
            if s.spike_threshold.is_some_and(|v| !above(v, 0.0)) {
                return invalid("anomaly.sensor.spike_threshold", "must be above 0");
            }
            if s.drift_threshold.is_some_and(|v| !above(v, 0.0)) {
                return invalid("anomaly.sensor.drift_threshold", "must be above 0");
            }
            if s.stuck_factor.is_some_and(|v| !(above(v, 1.0) || v == 1.0)) {
                return invalid("anomaly.sensor.stuck_factor", "must be at least 1");
            }
        }
        Ok(())
    }

    /// The tuning for a sensor named `name`.
    pub fn tuning(&self, name: &str) -> Tuning {
        let mut t = Tuning {
            warmup: self.warmup,
            spike_z: self.spike_threshold,
            spike_max: self.spike_max_readings,
            drift_h: self.drift_threshold,
            stuck_factor: self.stuck_factor,
            stuck_min: self.stuck_min_readings,
            ..Tuning::default()
        };
        if let Some(o) = self.sensor.iter().find(|o| matches(&o.pattern, name)) {
            if let Some(d) = &o.detectors {
                t.spike = d.iter().any(|d| d == "spike");
                t.drift = d.iter().any(|d| d == "drift");
                t.stuck = d.iter().any(|d| d == "stuck");
            }
            t.spike_z = o.spike_threshold.unwrap_or(t.spike_z);
            t.drift_h = o.drift_threshold.unwrap_or(t.drift_h);
            t.stuck_factor = o.stuck_factor.unwrap_or(t.stuck_factor);
            t.stuck_min = o.stuck_min_readings.unwrap_or(t.stuck_min);
        }
        t
    }

    /// How long a silence must be to be a dropout.
    pub fn rhythm(&self) -> super::cadence::Rhythm {
        super::cadence::Rhythm {
            factor: self.dropout_factor,
            min_ms: self.dropout_min.as_secs_f64() * 1000.0,
        }
    }

    /// The guard's policy (`None` when security watching is off).
    pub fn guard_policy(&self) -> Option<GuardPolicy> {
        (self.enabled && self.security.enabled).then_some(GuardPolicy {
            failures: self.security.failures,
            window: self.security.window,
            penalty: self.security.penalty,
            max_penalty: self.security.max_penalty,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_with_stars() {
        assert!(matches("temp*", "temperature"));
        assert!(matches("*_raw", "flow_raw"));
        assert!(matches("*", "anything"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exactly"));
        assert!(!matches("temp*", "humidity"));
        assert!(!matches("a*b*c", "axxbyy"));
    }

    #[test]
    fn a_sensor_override_applies_to_matching_names_only() {
        let c: AnomalyConfig = toml::from_str(
            r#"
            [[sensor]]
            pattern = "door*"
            detectors = ["stuck"]
            stuck_min_readings = 100
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let door = c.tuning("door_open");
        assert!(!door.spike && !door.drift && door.stuck);
        assert_eq!(door.stuck_min, 100);
        assert_eq!(c.tuning("temperature"), Tuning::default());
    }

    #[test]
    fn bad_values_name_their_field() {
        let c: AnomalyConfig = toml::from_str("dropout_factor = 0.5").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("anomaly.dropout_factor"));
        let c: AnomalyConfig =
            toml::from_str("[[sensor]]\npattern = \"x\"\ndetectors = [\"magic\"]").unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("anomaly.sensor.detectors"));
    }
}
