//! Scenario files (TOML, shipped under `firmware-sim/scenarios/`): device profiles with their
//! sensors and waveforms, run together against one gateway, reported as one run.
//!
//! ```toml
//! name = "greenhouse"
//! duration = "30s"
//! [[profile]]
//! name = "climate"
//! count = 50
//! rate = 2.0          # frames per second per device
//! jitter = 0.1        # each interval varies by up to 10 %
//! [[profile.sensor]]
//! name = "temperature"
//! waveform = { kind = "sine", base = 21.0, amplitude = 4.0, period = "10m" }
//! ```
//!
//! Waveforms: `constant { value }`, `sine { base, amplitude, period }`,
//! `random-walk { start, step }`, `step { before, after, at }`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use serde::Deserialize;

use crate::report::FleetStats;
use crate::{FleetConfig, Report};

/// How a sensor's value moves over time.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Waveform {
    /// Always `value`.
    Constant {
        /// The value.
        value: f64,
    },
    /// `base + amplitude * sin(2π t / period)`.
    Sine {
        /// Centre.
        base: f64,
        /// Half the swing.
        amplitude: f64,
        /// One full cycle.
        #[serde(with = "humantime_serde")]
        period: Duration,
    },
    /// Starts at `start`, moves by up to ±`step` each frame.
    RandomWalk {
        /// First value.
        start: f64,
        /// Largest move per frame.
        step: f64,
    },
    /// `before` until `at` after the device starts, `after` from then on.
    Step {
        /// Value before the step.
        before: f64,
        /// Value after it.
        after: f64,
        /// When it happens.
        #[serde(with = "humantime_serde")]
        at: Duration,
    },
}

impl Waveform {
    /// The starting state of a random walk (the value for others is computed).
    pub fn start(&self) -> f64 {
        match self {
            Waveform::RandomWalk { start, .. } => *start,
            _ => 0.0,
        }
    }

    /// The value `t` seconds after the device started; `walk` is this sensor's walk state.
    pub fn value(&self, t: f64, walk: &mut f64, rng: &mut impl Rng) -> f64 {
        match self {
            Waveform::Constant { value } => *value,
            Waveform::Sine {
                base,
                amplitude,
                period,
            } => {
                base + amplitude
                    * (std::f64::consts::TAU * t / period.as_secs_f64().max(1e-9)).sin()
            }
            Waveform::RandomWalk { step, .. } => {
                if *step > 0.0 {
                    *walk += rng.random_range(-*step..=*step);
                }
                *walk
            }
            Waveform::Step { before, after, at } => {
                if t < at.as_secs_f64() {
                    *before
                } else {
                    *after
                }
            }
        }
    }
}

/// One sensor of a profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorSpec {
    /// Its name in readings.
    pub name: String,
    /// How it moves.
    pub waveform: Waveform,
}

/// A group of identical devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Names the profile; device ids are `<name>-00000`, `<name>-00001`, ...
    pub name: String,
    /// How many devices.
    pub count: usize,
    /// Frames per second per device.
    pub rate: f64,
    /// Share of the period by which each interval varies (0 to 1). Default 0.
    #[serde(default)]
    pub jitter: f64,
    /// Its sensors (one reading each per frame).
    #[serde(rename = "sensor")]
    pub sensors: Vec<SensorSpec>,
}

/// A scenario file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Its name, for reports.
    pub name: String,
    /// What it exercises.
    #[serde(default)]
    pub description: String,
    /// How long devices produce frames.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// How long to wait for outstanding acks afterwards. Default 10s.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain: Duration,
    /// The device groups.
    #[serde(rename = "profile")]
    pub profiles: Vec<Profile>,
}

fn default_drain() -> Duration {
    Duration::from_secs(10)
}

impl Scenario {
    /// Reads and checks a scenario file; errors name the file and the field.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let scenario: Scenario =
            toml::from_str(&text).with_context(|| format!("scenario {}", path.display()))?;
        for p in &scenario.profiles {
            anyhow::ensure!(
                p.count > 0,
                "{}: profile {:?}: count must be at least 1",
                path.display(),
                p.name
            );
            anyhow::ensure!(
                p.rate > 0.0 && p.rate.is_finite(),
                "{}: profile {:?}: rate must be above 0",
                path.display(),
                p.name
            );
            anyhow::ensure!(
                (0.0..=1.0).contains(&p.jitter),
                "{}: profile {:?}: jitter must be 0 to 1",
                path.display(),
                p.name
            );
            anyhow::ensure!(
                !p.sensors.is_empty(),
                "{}: profile {:?}: needs at least one [[profile.sensor]]",
                path.display(),
                p.name
            );
        }
        anyhow::ensure!(
            !scenario.profiles.is_empty(),
            "{}: needs at least one [[profile]]",
            path.display()
        );
        Ok(scenario)
    }
}

/// Runs every profile of `scenario` at once against the gateway in `base.gateway` (with its
/// credentials and seed) and reports them as one run.
pub async fn run_scenario(scenario: &Scenario, base: &FleetConfig) -> Report {
    let stats = Arc::new(FleetStats::default());
    let start = tokio::time::Instant::now();
    let runs: Vec<_> = scenario
        .profiles
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let config = FleetConfig {
                devices: p.count,
                rate: p.rate,
                readings: p.sensors.len(),
                duration: scenario.duration,
                drain: scenario.drain,
                prefix: format!("{}-", p.name),
                sensors: Some(Arc::new(p.sensors.clone())),
                jitter: p.jitter,
                seed: base.seed.map(|s| s.wrapping_add(i as u64 * 0x1000_0000)),
                ..base.clone()
            };
            tokio::spawn(crate::fleet::run_fleet_with(config, stats.clone()))
        })
        .collect();
    let mut outcomes = Vec::new();
    for run in runs {
        if let Ok(report) = run.await {
            outcomes.extend(report.outcomes);
        }
    }
    let ramp = base.ramp.min(scenario.duration);
    Report::new(&stats, outcomes, start.elapsed(), ramp + scenario.duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn waveforms_move_as_documented() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut w = 0.0;
        let sine = Waveform::Sine {
            base: 10.0,
            amplitude: 2.0,
            period: Duration::from_secs(4),
        };
        assert!((sine.value(1.0, &mut w, &mut rng) - 12.0).abs() < 1e-9);
        let step = Waveform::Step {
            before: 1.0,
            after: 5.0,
            at: Duration::from_secs(3),
        };
        assert_eq!(
            (
                step.value(2.9, &mut w, &mut rng),
                step.value(3.0, &mut w, &mut rng)
            ),
            (1.0, 5.0)
        );
        let walk = Waveform::RandomWalk {
            start: 100.0,
            step: 0.5,
        };
        let mut state = walk.start();
        for _ in 0..100 {
            let before = state;
            let v = walk.value(0.0, &mut state, &mut rng);
            assert!((v - before).abs() <= 0.5);
        }
        assert_eq!(
            Waveform::Constant { value: 3.0 }.value(9.0, &mut w, &mut rng),
            3.0
        );
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{e:#}"));
                n += 1;
            }
        }
        assert!(n >= 1, "scenarios ship in {}", dir.display());
    }

    #[test]
    fn a_bad_scenario_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "name = \"x\"\nduration = \"1s\"\n[[profile]]\nname = \"p\"\ncount = 1\nrate = 1.0\nsensors = []\n").unwrap();
        let err = format!("{:#}", Scenario::load(&path).unwrap_err());
        assert!(err.contains("sensors"), "{err}");
    }
}
