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
use serde::Deserialize;

use crate::gate::Gate;
pub use crate::sensor::{SensorSpec, Waveform};
use crate::stats::FleetStats;
use crate::timeline::{
    pick, Action, AnomalyKind, AnomalySpec, DeviceAnomaly, FaultKind, FaultSpec, ProfileTimeline,
};
use crate::{FleetConfig, Report};

/// How a profile's devices reach the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// One TCP connection per device to `--gateway`.
    #[default]
    Tcp,
    /// One device per serial port in `ports` (COBS + CRC framing).
    Serial,
}

/// A group of identical devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Names the profile; device ids are `<name>-00000`, `<name>-00001`, ...
    pub name: String,
    /// How many devices (for serial: at most one per port; default: one per port).
    #[serde(default)]
    pub count: usize,
    /// `tcp` (default) or `serial`.
    #[serde(default)]
    pub transport: Transport,
    /// Serial: the ports, one device each. Relative paths are taken from the directory
    /// firmware-sim runs in.
    #[serde(default)]
    pub ports: Vec<std::path::PathBuf>,
    /// Serial: line speed. Default 115200.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// Serial: share of sent bytes flipped by line noise (0 to 1).
    #[serde(default)]
    pub corrupt: f64,
    /// Serial: share of sent bytes lost (0 to 1).
    #[serde(default)]
    pub drop_bytes: f64,
    /// Readings per sensor in each frame, spread over the report period. Default 1.
    #[serde(default = "one_sample")]
    pub samples: usize,
    /// Frames per second per device.
    pub rate: f64,
    /// Device-clock time per wall-clock time, for seeded runs: 60 plays a minute of the
    /// device's life each second (its timestamps, waveforms and anomaly times move 60 times
    /// faster), so a day of minute samples fits in a short test. Default 1.
    #[serde(default = "one")]
    pub time_scale: f64,
    /// Share of the period by which each interval varies (0 to 1). Default 0.
    #[serde(default)]
    pub jitter: f64,
    /// Its sensors (one reading each per frame).
    #[serde(rename = "sensor")]
    pub sensors: Vec<SensorSpec>,
}

fn one() -> f64 {
    1.0
}

fn default_baud() -> u32 {
    115_200
}

fn one_sample() -> usize {
    1
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
    /// Seed, unless `--seed` gives one: the same seed gives the same bytes from every device.
    pub seed: Option<u64>,
    /// How long devices produce frames.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// How long to wait for outstanding acks afterwards. Default 10s.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain: Duration,
    /// The device groups.
    #[serde(rename = "profile")]
    pub profiles: Vec<Profile>,
    /// Faults, on the wall clock from the start.
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
    /// Labelled anomalies in sensor values, on each device's clock.
    #[serde(default, rename = "anomaly")]
    pub anomalies: Vec<AnomalySpec>,
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
        let mut scenario = scenario;
        for p in &mut scenario.profiles {
            if p.transport == Transport::Serial {
                anyhow::ensure!(
                    !p.ports.is_empty(),
                    "{}: profile {:?}: a serial profile needs `ports`",
                    path.display(),
                    p.name
                );
                if p.count == 0 {
                    p.count = p.ports.len();
                }
                anyhow::ensure!(
                    p.count == p.ports.len(),
                    "{}: profile {:?}: count is {} but there are {} ports (one device per port)",
                    path.display(),
                    p.name,
                    p.count,
                    p.ports.len()
                );
                for (field, v) in [("corrupt", p.corrupt), ("drop_bytes", p.drop_bytes)] {
                    anyhow::ensure!(
                        (0.0..=1.0).contains(&v),
                        "{}: profile {:?}: {field} must be 0 to 1",
                        path.display(),
                        p.name
                    );
                }
            } else {
                anyhow::ensure!(
                    p.ports.is_empty() && p.corrupt == 0.0 && p.drop_bytes == 0.0,
                    "{}: profile {:?}: ports, corrupt and drop_bytes need transport = \"serial\"",
                    path.display(),
                    p.name
                );
            }
            anyhow::ensure!(
                p.count > 0,
                "{}: profile {:?}: count must be at least 1",
                path.display(),
                p.name
            );
            anyhow::ensure!(
                p.samples >= 1,
                "{}: profile {:?}: samples must be at least 1",
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
                p.time_scale > 0.0 && p.time_scale.is_finite(),
                "{}: profile {:?}: time_scale must be above 0",
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
        for (i, f) in scenario.faults.iter().enumerate() {
            scenario.check_fault(f).map_err(|e| {
                anyhow::anyhow!(
                    "{}: fault {} ({}): {e}",
                    path.display(),
                    i + 1,
                    f.kind.name()
                )
            })?;
        }
        for (i, a) in scenario.anomalies.iter().enumerate() {
            scenario
                .check_anomaly(a)
                .map_err(|e| anyhow::anyhow!("{}: anomaly {}: {e}", path.display(), i + 1))?;
        }
        Ok(scenario)
    }

    /// Takes relative serial port paths from `dir` (firmware-sim's `--ports-dir`; default:
    /// the directory it runs in).
    pub fn resolve_ports(&mut self, dir: &Path) {
        for p in &mut self.profiles {
            for port in &mut p.ports {
                if port.is_relative() {
                    *port = dir.join(&*port);
                }
            }
        }
    }

    fn profile(&self, name: &str) -> Result<&Profile, String> {
        self.profiles
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("profile {name:?} is not defined"))
    }

    fn check_fault(&self, f: &FaultSpec) -> Result<(), String> {
        use FaultKind as K;
        if !(0.0..=1.0).contains(&f.share) {
            return Err("share must be 0 to 1".into());
        }
        if let Some(name) = &f.profile {
            self.profile(name)?;
        }
        let needs = |field: &str, present: bool| {
            if present {
                Ok(())
            } else {
                Err(format!("needs `{field}`"))
            }
        };
        let unused = |field: &str, present: bool| {
            if present {
                Err(format!("`{field}` does not apply"))
            } else {
                Ok(())
            }
        };
        unused("down", f.down.is_some() && f.kind != K::Storm)?;
        unused(
            "for",
            f.length.is_some() && !matches!(f.kind, K::SlowReader | K::BrokerOutage),
        )?;
        unused("skew", f.skew.is_some() && f.kind != K::ClockSkew)?;
        unused("frames", f.frames.is_some() && f.kind != K::Burst)?;
        match f.kind {
            K::SlowReader | K::BrokerOutage => needs("for", f.length.is_some())?,
            K::ClockSkew => {
                crate::timeline::parse_skew(f.skew.as_deref().ok_or("needs `skew`")?)
                    .map_err(|e| format!("skew {e}"))?;
            }
            K::Burst => needs("frames", f.frames.is_some())?,
            _ => {}
        }
        if f.kind == K::BrokerOutage {
            unused("profile", f.profile.is_some())?;
        }
        Ok(())
    }

    fn check_anomaly(&self, a: &AnomalySpec) -> Result<(), String> {
        if !(0.0..=1.0).contains(&a.share) {
            return Err("share must be 0 to 1".into());
        }
        let profiles: Vec<&Profile> = match &a.profile {
            Some(name) => vec![self.profile(name)?],
            None => self.profiles.iter().collect(),
        };
        match (&a.sensor, a.kind) {
            (Some(_), AnomalyKind::Dropout) => {
                return Err("a dropout silences the whole device: drop `sensor`".into())
            }
            (None, AnomalyKind::Dropout) => {}
            (None, _) => return Err("needs `sensor`".into()),
            (Some(sensor), _) => {
                if !profiles
                    .iter()
                    .any(|p| p.sensors.iter().any(|s| &s.name == sensor))
                {
                    return Err(format!("no profile has a sensor {sensor:?}"));
                }
            }
        }
        match a.kind {
            AnomalyKind::Spike | AnomalyKind::Drift if a.magnitude.is_none() => {
                Err("needs `magnitude`".into())
            }
            AnomalyKind::Stuck | AnomalyKind::Dropout if a.magnitude.is_some() => {
                Err("`magnitude` does not apply".into())
            }
            AnomalyKind::Drift | AnomalyKind::Stuck | AnomalyKind::Dropout
                if a.length.is_zero() =>
            {
                Err("needs `for` (how long it lasts)".into())
            }
            _ => Ok(()),
        }
    }

    /// Whether any fault cuts the broker link (so the run needs a broker gate).
    pub fn has_broker_outage(&self) -> bool {
        self.faults
            .iter()
            .any(|f| f.kind == FaultKind::BrokerOutage)
    }

    /// The faults and anomalies of profile `index`, each with the devices it picked (drawn
    /// from `seed`, so the same seed picks the same devices).
    pub fn timeline(&self, index: usize, seed: Option<u64>) -> ProfileTimeline {
        let mut timeline = ProfileTimeline::default();
        let Some(p) = self.profiles.get(index) else {
            return timeline;
        };
        let draw = |n: usize, salt: u64| {
            seed.map(|s| s ^ (salt << 32 | index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .map(|s| s.wrapping_add(n as u64))
        };
        for (n, f) in self.faults.iter().enumerate() {
            let applies = f.profile.as_ref().is_none_or(|name| name == &p.name);
            let action = match f.kind {
                FaultKind::Storm => Action::Storm(f.down.unwrap_or_default()),
                FaultKind::Reboot => Action::Reboot,
                FaultKind::Corrupt => Action::Corrupt,
                FaultKind::Oversize => Action::Oversize,
                FaultKind::WrongToken => Action::WrongToken,
                FaultKind::SlowReader => Action::SlowReader(f.length.unwrap_or_default()),
                FaultKind::ClockSkew => Action::ClockSkew(
                    f.skew
                        .as_deref()
                        .and_then(|s| crate::timeline::parse_skew(s).ok())
                        .unwrap_or(0),
                ),
                FaultKind::Burst => Action::Burst(f.frames.unwrap_or(0)),
                FaultKind::BrokerOutage => continue,
            };
            if applies {
                let picked = pick(p.count, f.share, draw(n, 1));
                timeline.faults.push((f.at, action, picked));
            }
        }
        for (n, a) in self.anomalies.iter().enumerate() {
            if a.profile.as_ref().is_some_and(|name| name != &p.name) {
                continue;
            }
            let sensor = match &a.sensor {
                Some(name) => match p.sensors.iter().position(|s| &s.name == name) {
                    Some(i) => Some(i),
                    None => continue,
                },
                None => None,
            };
            let from_s = a.at.as_secs_f64();
            let anomaly = DeviceAnomaly {
                kind: a.kind,
                sensor,
                from_s,
                to_s: from_s + a.length.as_secs_f64(),
                magnitude: a.magnitude.unwrap_or(0.0),
            };
            timeline
                .anomalies
                .push((anomaly, pick(p.count, a.share, draw(n, 2))));
        }
        timeline
    }
}

/// Runs every profile of `scenario` at once against the gateway in `base.gateway` (with its
/// credentials and seed; the scenario's own seed when `base` has none) and reports them as
/// one run. Broker outages close `gate`, which the gateway must reach its broker through.
pub async fn run_scenario(
    scenario: &Scenario,
    base: &FleetConfig,
    gate: Option<Arc<Gate>>,
    stats: Arc<FleetStats>,
) -> anyhow::Result<Report> {
    anyhow::ensure!(
        gate.is_some() || !scenario.has_broker_outage(),
        "scenario {:?} has a broker-outage fault: run it with --broker-gate LISTEN=BROKER and point the gateway's --mqtt at LISTEN",
        scenario.name
    );
    let start = tokio::time::Instant::now();
    let seed = base.seed.or(scenario.seed);
    let outages: Vec<_> = scenario
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::BrokerOutage)
        .filter_map(|f| {
            let gate = gate.clone()?;
            let (at, length) = (f.at, f.length.unwrap_or_default());
            Some(tokio::spawn(async move {
                tokio::time::sleep_until(start + at).await;
                tracing::info!(?length, "broker outage: closing the gate");
                gate.close();
                tokio::time::sleep(length).await;
                gate.open();
                tracing::info!("broker outage over: gate open");
            }))
        })
        .collect();
    let runs: Vec<_> = scenario
        .profiles
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let timeline = scenario.timeline(i, seed);
            let config = FleetConfig {
                devices: p.count,
                rate: p.rate,
                readings: p.sensors.len() * p.samples,
                samples: p.samples,
                time_scale: p.time_scale,
                duration: scenario.duration,
                drain: scenario.drain,
                prefix: format!("{}-", p.name),
                sensors: Some(Arc::new(p.sensors.clone())),
                jitter: p.jitter,
                seed: seed.map(|s| s.wrapping_add(i as u64 * 0x1000_0000)),
                timeline: (!timeline.is_empty()).then(|| Arc::new(timeline)),
                origin: Some(start),
                serial: match p.transport {
                    Transport::Tcp => Vec::new(),
                    Transport::Serial => p
                        .ports
                        .iter()
                        .map(|path| crate::serial::SerialTarget {
                            path: path.clone(),
                            baud: p.baud,
                            noise: crate::serial::Noise {
                                corrupt: p.corrupt,
                                drop: p.drop_bytes,
                            },
                        })
                        .collect(),
                },
                ..base.clone()
            };
            tokio::spawn(crate::fleet::run_fleet_with(config, stats.clone()))
        })
        .collect();
    let mut outcomes = Vec::new();
    for run in runs {
        outcomes.extend(run.await?.outcomes);
    }
    for outage in outages {
        outage.abort();
    }
    if let Some(gate) = &gate {
        gate.open();
    }
    let ramp = base.ramp.min(scenario.duration);
    Ok(Report::new(
        &stats,
        outcomes,
        start.elapsed(),
        ramp + scenario.duration,
    ))
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
