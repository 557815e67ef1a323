//! A scenario's timeline: faults devices commit at set times (`[[fault]]`) and labelled
//! anomalies in their sensor values (`[[anomaly]]`), resolved into a schedule per device.
//!
//! Faults run on the wall clock from the start of the scenario, so "half the fleet drops at
//! 5 s" happens at once across devices. Anomalies run on each device's own clock (the one its
//! waveforms use: virtual when seeded), so a seeded run puts them in the same frames every
//! time. Which devices a fault or anomaly picks is drawn from the seed too.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// What a `[[fault]]` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// The picked devices drop their links at once, stay off for `down`, and all reconnect
    /// together.
    Storm,
    /// The picked devices reboot: unacknowledged frames are lost on the device (it has no
    /// flash), and it comes back with a new epoch and seq 1.
    Reboot,
    /// The picked devices send a frame of garbage (the gateway answers MALFORMED_MESSAGE and
    /// closes the link); they reconnect and resend.
    Corrupt,
    /// The picked devices announce a frame larger than any gateway accepts
    /// (FRAME_TOO_LARGE); they reconnect and resend.
    Oversize,
    /// The picked devices reconnect presenting a wrong token once (AUTH_FAILED), then the
    /// right one.
    WrongToken,
    /// The picked devices stop reading from their link for `for` (acks pile up unread).
    SlowReader,
    /// The picked devices' clocks jump by `skew` (negative: back in time).
    ClockSkew,
    /// The picked devices send `frames` frames at once, as fast as their window allows.
    Burst,
    /// The gateway's broker link is cut for `for` (needs `--broker-gate`).
    BrokerOutage,
}

impl FaultKind {
    /// Its name in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            Self::Storm => "storm",
            Self::Reboot => "reboot",
            Self::Corrupt => "corrupt",
            Self::Oversize => "oversize",
            Self::WrongToken => "wrong-token",
            Self::SlowReader => "slow-reader",
            Self::ClockSkew => "clock-skew",
            Self::Burst => "burst",
            Self::BrokerOutage => "broker-outage",
        }
    }
}

/// One `[[fault]]` entry of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// What happens.
    pub kind: FaultKind,
    /// When, from the start of the scenario.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// Share of the devices it hits (0 to 1). Default 1.
    #[serde(default = "one")]
    pub share: f64,
    /// Only devices of this profile. Default: every TCP profile.
    pub profile: Option<String>,
    /// `storm`: how long devices stay off. Default 0 (reconnect at once).
    #[serde(default, with = "humantime_serde::option")]
    pub down: Option<Duration>,
    /// `slow-reader`, `broker-outage`: how long it lasts.
    #[serde(default, rename = "for", with = "humantime_serde::option")]
    pub length: Option<Duration>,
    /// `clock-skew`: how far the clock jumps, such as "90s" or "-1h".
    pub skew: Option<String>,
    /// `burst`: how many frames.
    pub frames: Option<u64>,
}

fn one() -> f64 {
    1.0
}

/// What an `[[anomaly]]` does to a sensor's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnomalyKind {
    /// `magnitude` is added to the value (one frame when `for` is 0).
    Spike,
    /// A ramp from 0 to `magnitude` is added over `for`.
    Drift,
    /// The value freezes at what it was when the anomaly began.
    Stuck,
    /// The device sends no telemetry at all for `for` (it stays connected).
    Dropout,
}

/// One `[[anomaly]]` entry of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnomalySpec {
    /// What happens.
    pub kind: AnomalyKind,
    /// The sensor it affects (every sensor for `dropout`).
    pub sensor: Option<String>,
    /// Only devices of this profile. Default: every profile with that sensor.
    pub profile: Option<String>,
    /// Share of those devices (0 to 1). Default 1.
    #[serde(default = "one")]
    pub share: f64,
    /// When, on each device's clock (time since it started reporting).
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// How long. Default 0: one frame.
    #[serde(default, rename = "for", with = "humantime_serde")]
    pub length: Duration,
    /// `spike`, `drift`: how far the value moves.
    pub magnitude: Option<f64>,
}

/// A fault as one device carries it out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Drop the link; reconnect after this long.
    Storm(Duration),
    /// Reboot into a new epoch.
    Reboot,
    /// Send a garbage frame.
    Corrupt,
    /// Announce an oversize frame.
    Oversize,
    /// Reconnect with a wrong token once.
    WrongToken,
    /// Stop reading for this long.
    SlowReader(Duration),
    /// Move the clock by this many milliseconds.
    ClockSkew(i64),
    /// Send this many frames at once.
    Burst(u64),
}

/// An anomaly as one device applies it, to sensor index `sensor` (`None`: all).
#[derive(Debug, Clone, Copy)]
pub struct DeviceAnomaly {
    /// Which kind.
    pub kind: AnomalyKind,
    /// Index of the sensor in the profile; `None` for dropout.
    pub sensor: Option<usize>,
    /// Start, seconds on the device's clock.
    pub from_s: f64,
    /// End (exclusive), seconds; equal to `from_s` means one frame.
    pub to_s: f64,
    /// `spike`/`drift` magnitude.
    pub magnitude: f64,
}

impl DeviceAnomaly {
    /// Whether it applies at `t` seconds (a zero-length anomaly applies once, from `from_s`;
    /// the device marks it spent).
    pub fn active(&self, t: f64) -> bool {
        t >= self.from_s && (t < self.to_s || self.from_s == self.to_s)
    }
}

/// One labelled anomaly, as written to `--labels`: where a detector should find it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Label {
    /// The device.
    pub device_id: String,
    /// Its epoch when the anomaly began.
    pub epoch: u64,
    /// The sensor ("*" for a dropout: every sensor).
    pub sensor: String,
    /// What kind.
    pub kind: AnomalyKind,
    /// Reading timestamp of the first affected reading (for a dropout: the first missing).
    pub from_ms: u64,
    /// Reading timestamp of the last affected reading.
    pub to_ms: u64,
    /// Frames (or, for a dropout, frame slots) affected.
    pub frames: u64,
}

/// Parses a signed duration such as "90s", "+1h" or "-250ms" into milliseconds.
pub fn parse_skew(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let (sign, rest) = match s.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, s.strip_prefix('+').unwrap_or(s)),
    };
    let d = humantime::parse_duration(rest.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    i64::try_from(d.as_millis())
        .map(|ms| sign * ms)
        .map_err(|_| format!("{s:?} is too large"))
}

/// Picks `round(share * count)` of `count` devices, the same ones for the same `seed`.
pub fn pick(count: usize, share: f64, seed: Option<u64>) -> Vec<bool> {
    let n = ((share.clamp(0.0, 1.0) * count as f64).round() as usize).min(count);
    let mut order: Vec<usize> = (0..count).collect();
    let mut rng = match seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_rng(&mut rand::rng()),
    };
    order.shuffle(&mut rng);
    let mut picked = vec![false; count];
    for &i in &order[..n] {
        picked[i] = true;
    }
    picked
}

/// The faults and anomalies of one profile, with the devices each one picked.
#[derive(Debug, Clone, Default)]
pub struct ProfileTimeline {
    /// (when, what, which devices).
    pub faults: Vec<(Duration, Action, Vec<bool>)>,
    /// (what, which devices).
    pub anomalies: Vec<(DeviceAnomaly, Vec<bool>)>,
}

impl ProfileTimeline {
    /// Device `i`'s faults, in time order, and its anomalies.
    pub fn for_device(&self, i: usize) -> (Vec<(Duration, Action)>, Vec<DeviceAnomaly>) {
        let mut faults: Vec<(Duration, Action)> = self
            .faults
            .iter()
            .filter(|(_, _, picked)| picked.get(i).copied().unwrap_or(false))
            .map(|(at, action, _)| (*at, *action))
            .collect();
        faults.sort_by_key(|(at, _)| *at);
        let anomalies = self
            .anomalies
            .iter()
            .filter(|(_, picked)| picked.get(i).copied().unwrap_or(false))
            .map(|(a, _)| *a)
            .collect();
        (faults, anomalies)
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.faults.is_empty() && self.anomalies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skews_parse_with_a_sign() {
        assert_eq!(parse_skew("90s"), Ok(90_000));
        assert_eq!(parse_skew("-1h"), Ok(-3_600_000));
        assert_eq!(parse_skew("+250ms"), Ok(250));
        assert!(parse_skew("soon").is_err());
    }

    #[test]
    fn picking_takes_the_share_and_repeats_with_the_seed() {
        let a = pick(10, 0.3, Some(5));
        assert_eq!(a.iter().filter(|p| **p).count(), 3);
        assert_eq!(a, pick(10, 0.3, Some(5)));
        assert_eq!(pick(4, 1.0, None), vec![true; 4]);
        assert_eq!(pick(4, 0.0, None), vec![false; 4]);
    }

    #[test]
    fn a_zero_length_anomaly_is_active_from_its_start() {
        let a = DeviceAnomaly {
            kind: AnomalyKind::Spike,
            sensor: Some(0),
            from_s: 2.0,
            to_s: 2.0,
            magnitude: 1.0,
        };
        assert!(!a.active(1.9));
        assert!(a.active(2.1));
        let b = DeviceAnomaly { to_s: 3.0, ..a };
        assert!(b.active(2.5) && !b.active(3.0));
    }
}
