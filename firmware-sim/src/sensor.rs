//! A simulated sensor: its waveform, plus the trend, noise and quantisation real sensors
//! have. Part of the device model: it knows nothing of fleets, scenarios or reports.

use rand::Rng;
use rand_distr::Distribution;
use serde::Deserialize;
use std::time::Duration;

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

/// One sensor of a profile: a waveform, plus a trend, noise and quantisation as real
/// sensors have them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorSpec {
    /// Its name in readings.
    pub name: String,
    /// How it moves.
    pub waveform: Waveform,
    /// Gaussian noise added to each reading (standard deviation). Default 0.
    #[serde(default)]
    pub noise: f64,
    /// A slow trend added, in units per hour of the device's clock. Default 0.
    #[serde(default)]
    pub trend_per_hour: f64,
    /// Readings are rounded to a multiple of this (an ADC step, a display resolution).
    /// Default: not rounded.
    pub quantum: Option<f64>,
}

impl SensorSpec {
    /// A sensor of `waveform` alone.
    pub fn plain(name: &str, waveform: Waveform) -> Self {
        Self {
            name: name.into(),
            waveform,
            noise: 0.0,
            trend_per_hour: 0.0,
            quantum: None,
        }
    }

    /// The reading `t` seconds after the device started; `walk` is its random-walk state.
    pub fn value(&self, t: f64, walk: &mut f64, rng: &mut impl Rng) -> f64 {
        let mut v = self.waveform.value(t, walk, rng) + self.trend_per_hour * t / 3600.0;
        if self.noise > 0.0 {
            let n: f64 = rand_distr::StandardNormal.sample(rng);
            v += self.noise * n;
        }
        match self.quantum {
            Some(q) if q > 0.0 => (v / q).round() * q,
            _ => v,
        }
    }
}
