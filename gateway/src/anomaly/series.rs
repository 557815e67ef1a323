//! Per (device, sensor) series detectors: `spike`, `drift` (a level shift or a change of
//! slope) and `stuck`. Pure: a reading in, findings out; no clock but the readings' own
//! timestamps, no I/O, so a replayed day is judged exactly like a live one.
//!
//! The state of one series is a fixed set of numbers ([`Series`] is 224 bytes):
//!
//! - two robust one-step forecasts: the previous accepted value (`prev`, right for
//!   integrated series such as a random walk or a densely sampled daily cycle) and a fast
//!   exponential level (`level`, right for noise around a set point), each with an
//!   exponentially weighted mean absolute deviation as its scale. A reading is judged by
//!   the forecast with the smaller usual error, and is **out** when its error is over
//!   `spike_z` of that scale. Out readings do not teach the state, every update is
//!   winsorised (outliers during learning do not inflate the scale), and the scales hold
//!   still while a CUSUM builds up.
//! - an excursion of at most `spike_max` out readings that comes back is a `spike` (decided
//!   at the first reading back, so `raised_ts_ms` is one reading late); one that stays out
//!   longer is a level shift (`drift`, detector `level-shift`), and the state re-anchors on
//!   the new level.
//! - two CUSUMs for sustained changes: one on increments (a change of slope, for any
//!   series) and, only where the series is mean-reverting (over a long memory its level
//!   deviation is not larger than its step deviation, so readings are close to
//!   independent), one on the error of the fast level (a ramp or a shift that the level
//!   follows more slowly than it moves). A steady trend or a slow daily swing keeps a
//!   steady level error that the scale has learned, so only a change of pace builds up.
//! - a run counter for `stuck`: a value repeated far longer (`stuck_factor` times) than the
//!   longest run the series has shown, and at least `stuck_min` readings, on a series that
//!   has varied at all. A quantised sensor's long runs are learned, a constant one never
//!   alarms.
//!
//! The scale has a floor at the smallest step the series has taken (its quantum), so one
//! quantisation step is never an anomaly. Readings older than the last one seen (a clock
//! stepped back, a late back-fill) are skipped and counted by the caller.

use super::{Finding, Kind};

/// How a series is judged; [`super::config`] resolves one per sensor name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// Readings a series learns from before it may raise anything.
    pub warmup: u32,
    /// `spike`: how many deviations (mean absolute deviation units) out a reading must be.
    pub spike_z: f64,
    /// `spike`: longest excursion (readings) still called a spike; longer is a level shift.
    pub spike_max: u8,
    /// `drift`: CUSUM decision threshold (standard deviations accumulated).
    pub drift_h: f64,
    /// `drift`: CUSUM slack per reading (standard deviations).
    pub drift_k: f64,
    /// `stuck`: how many times its longest usual run a repeat must last.
    pub stuck_factor: f64,
    /// `stuck`: fewest repeated readings ever called stuck.
    pub stuck_min: u32,
    /// Which detectors run.
    pub spike: bool,
    /// Level shifts and slope changes.
    pub drift: bool,
    /// Repeated values.
    pub stuck: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            warmup: 30,
            spike_z: 9.0,
            spike_max: 3,
            drift_h: 12.0,
            drift_k: 1.0,
            stuck_factor: 3.0,
            stuck_min: 8,
            spike: true,
            drift: true,
            stuck: true,
        }
    }
}

/// Weight of a new reading in the fast level and the scales.
const ALPHA: f64 = 0.05;
/// Weight of a new reading in the slow estimates (the mean increment, the long-run scales).
const ALPHA_SLOW: f64 = 0.005;
/// Mean absolute deviation to standard deviation, for a normal distribution.
const MAD_TO_SD: f64 = 1.2533;
/// How much of the longest usual run is kept at each new run (a slow forgetting).
const RUN_DECAY: f64 = 0.995;
/// A pause this many usual steps long breaks a series' steps (see `observe`).
const GAP_FACTOR: f64 = 4.0;
/// Extra CUSUM slack on the level error (standard deviations per reading).
const LEVEL_SLACK: f64 = 0.25;
/// Readings the fast level needs to settle after starting again from one reading.
const SETTLE: u8 = 20;
/// Readings learned as a plain mean before updates are winsorised.
const WINSOR_AFTER: u32 = 10;
/// Changes of value a series must show before `stuck` is armed.
const STUCK_ARM_CHANGES: u32 = 5;

/// One series' state (see the module docs). `Default` is a series not yet seen.
#[derive(Debug, Clone, Default)]
pub struct Series {
    n: u32,
    last_ts: i64,
    prev: f64,
    level: f64,
    dev_level: f64,
    dev_diff: f64,
    quantum: f64,
    // The excursion under way: readings out, first and last timestamps, most extreme value.
    exc_len: u8,
    exc_from: i64,
    exc_last: i64,
    exc_value: f64,
    exc_z: f64,
    // CUSUMs: on increments (against their slow mean) and on the fast level's error.
    mean_diff: f64,
    /// Slow versions of the two deviations: whether the series is mean-reverting.
    slow_dev_level: f64,
    slow_dev_diff: f64,
    slope_up: Cusum,
    slope_down: Cusum,
    level_up: Cusum,
    level_down: Cusum,
    // Runs of one repeated value.
    run: u32,
    run_from: i64,
    run_last: i64,
    run_value: f64,
    long_run: f64,
    changes: u32,
    stuck_open: bool,
    /// Readings left before the level CUSUM runs again after a re-anchor.
    settle: u8,
    /// Readings were missed before the next one: take it as the new `prev`, unjudged.
    resumed: bool,
    /// Usual time between its readings (ms, exponentially weighted over ordinary gaps).
    step_ts: f64,
}

/// A one-sided CUSUM: the sum and the timestamp where it started rising.
#[derive(Debug, Clone, Copy, Default)]
struct Cusum {
    sum: f64,
    from: i64,
}

impl Cusum {
    /// Adds `u - k` (never below 0); true past `h`.
    fn add(&mut self, u: f64, k: f64, h: f64, ts: i64) -> bool {
        if self.sum == 0.0 {
            self.from = ts;
        }
        self.sum = (self.sum + u - k).max(0.0);
        self.sum > h
    }
}

/// What [`Series::observe`] did with a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Judged.
    Judged,
    /// Older than the newest reading of the series: skipped.
    Late,
    /// NaN or infinite: skipped.
    NotANumber,
}

/// Maps how far past its threshold a statistic went to a score in 0..1 (0.5 at the
/// threshold, towards 1 far beyond it).
pub fn score(stat: f64, threshold: f64) -> f64 {
    if threshold <= 0.0 || !stat.is_finite() {
        return 1.0;
    }
    (stat / (stat + threshold)).clamp(0.0, 1.0)
}

impl Series {
    /// Readings judged so far.
    pub fn readings(&self) -> u32 {
        self.n
    }

    /// Timestamp of the newest reading judged.
    pub fn last_ts(&self) -> i64 {
        self.last_ts
    }

    /// Readings of this series were missed (the detector fell behind and skipped batches,
    /// or the device paused far longer than usual): the next reading starts its steps and
    /// its level afresh rather than being judged against the last one seen, and the level
    /// settles before its CUSUM runs. The scales stay.
    pub fn resume(&mut self) {
        self.exc_len = 0;
        self.clear_cusums();
        self.settle = SETTLE;
        self.resumed = true;
    }

    /// Judges one reading; findings (and ends of ongoing ones) go to `out`. With `learn_only`
    /// the state learns but raises nothing (warming up from the store after a restart).
    pub fn observe(
        &mut self,
        ts: i64,
        x: f64,
        t: &Tuning,
        learn_only: bool,
        out: &mut Vec<Finding>,
    ) -> Seen {
        if !x.is_finite() {
            return Seen::NotANumber;
        }
        if self.n == 0 {
            self.start(ts, x);
            return Seen::Judged;
        }
        if ts < self.last_ts {
            return Seen::Late;
        }
        if self.changes == 0 && x != self.run_value {
            // A series that had never varied (a sensor settling at power-up, a meter that
            // was off) has learned nothing about its noise: it starts learning here.
            let run = self.run;
            self.start(ts, x);
            self.long_run = f64::from(run).min(f64::from(t.stuck_min));
            self.changes = 1;
            return Seen::Judged;
        }
        self.n = self.n.saturating_add(1);
        // Irregular sampling: after a pause far longer than the series' usual step (a device
        // that reports in bursts, a gap in a replay), the next reading is not compared with
        // the last one, which may be long ago: it starts the steps afresh.
        let gap = ts.saturating_sub(self.last_ts) as f64;
        if self.n > 3 && gap > GAP_FACTOR * self.step_ts.max(1.0) {
            self.resume();
        } else {
            let a = (1.0 / f64::from(self.n)).max(ALPHA);
            self.step_ts += a * (gap - self.step_ts);
        }
        self.last_ts = ts;
        if self.resumed {
            self.resumed = false;
            self.prev = x;
            self.level = x;
            self.run_value = x;
            self.run = 1;
            self.run_from = ts;
            self.run_last = ts;
            return Seen::Judged;
        }
        let armed = self.n > t.warmup && !learn_only;
        self.track_runs(ts, x, t, armed, out);
        if self.stuck_open {
            return Seen::Judged; // a frozen sensor teaches nothing
        }

        let sd = self.dev_diff.max(self.floor(x));
        let sl = self.dev_level.max(self.floor(x));
        // Judged by the better forecaster of the two (the smaller usual error).
        let z = if self.dev_diff <= self.dev_level {
            (x - self.prev).abs() / sd
        } else {
            (x - self.level).abs() / sl
        };
        if armed && (t.spike || t.drift) && z > t.spike_z {
            if self.exc_len == 0 {
                self.exc_from = ts;
                self.exc_z = 0.0;
            }
            self.exc_len = self.exc_len.saturating_add(1);
            self.exc_last = ts;
            // Out readings teach the scales a little (winsorised, at a quarter of the rate):
            // one spike barely moves them, but noise that has really grown (or a scale
            // learned on too quiet a start) is learned within a few dozen readings instead
            // of raising alarms for ever.
            let (cap, a) = (t.spike_z * 0.5, ALPHA / 4.0);
            self.dev_diff += a * ((x - self.prev).abs().min(cap * sd) - self.dev_diff);
            self.dev_level += a * ((x - self.level).abs().min(cap * sl) - self.dev_level);
            if z > self.exc_z {
                self.exc_z = z;
                self.exc_value = x;
            }
            if self.exc_len > t.spike_max {
                if t.drift {
                    out.push(Finding::point(
                        Kind::Drift,
                        "level-shift",
                        score(self.exc_z, t.spike_z),
                        self.exc_from,
                        ts,
                        x,
                        format!(
                            "level moved from {:.4} to {:.4} ({:.1} deviations)",
                            self.prev, x, self.exc_z
                        ),
                    ));
                }
                self.reanchor(x);
            }
            return Seen::Judged;
        }
        if self.exc_len > 0 {
            if t.spike {
                out.push(Finding {
                    to_ms: self.exc_last,
                    ..Finding::point(
                        Kind::Spike,
                        "robust-z",
                        score(self.exc_z, t.spike_z),
                        self.exc_from,
                        ts,
                        self.exc_value,
                        format!(
                            "{:.4} is {:.1} deviations from {:.4} ({} reading{})",
                            self.exc_value,
                            self.exc_z,
                            self.prev,
                            self.exc_len,
                            if self.exc_len == 1 { "" } else { "s" }
                        ),
                    )
                });
            }
            self.exc_len = 0;
        }
        self.learn(ts, x, sd, sl, t, armed && t.drift, out);
        Seen::Judged
    }

    fn start(&mut self, ts: i64, x: f64) {
        *self = Series {
            n: 1,
            last_ts: ts,
            prev: x,
            level: x,
            run: 1,
            run_from: ts,
            run_last: ts,
            run_value: x,
            ..Series::default()
        };
    }

    /// The smallest scale a deviation is measured against: the series' quantum, or a
    /// relative epsilon for a series that has never moved.
    fn floor(&self, x: f64) -> f64 {
        if self.quantum > 0.0 {
            self.quantum
        } else {
            (x.abs() * 1e-6).max(1e-9)
        }
    }

    /// Takes `x` as the new normal after a level shift.
    fn reanchor(&mut self, x: f64) {
        self.prev = x;
        self.level = x;
        self.exc_len = 0;
        self.clear_cusums();
        self.settle = SETTLE;
    }

    fn clear_cusums(&mut self) {
        self.slope_up = Cusum::default();
        self.slope_down = Cusum::default();
        self.level_up = Cusum::default();
        self.level_down = Cusum::default();
    }

    /// Updates the learned state with an accepted reading, and runs the CUSUMs.
    #[allow(clippy::too_many_arguments)]
    fn learn(
        &mut self,
        ts: i64,
        x: f64,
        sd: f64,
        sl: f64,
        t: &Tuning,
        drift: bool,
        out: &mut Vec<Finding>,
    ) {
        let d = x - self.prev;
        if d != 0.0 && (self.quantum == 0.0 || d.abs() < self.quantum) {
            self.quantum = d.abs();
        }
        // Fast start: a plain mean over the first readings, then exponential.
        let a = (1.0 / f64::from(self.n)).max(ALPHA);
        let a_slow = (1.0 / f64::from(self.n)).max(ALPHA_SLOW);
        let cap = t.spike_z * 0.5;
        let u_slope = ((d - self.mean_diff) / (sd * MAD_TO_SD)).clamp(-cap, cap);
        // Measured against the long-run scale, so a ramp builds up before the fast scale has
        // learned it as normal.
        let u_level = ((x - self.level) / (self.slow_dev_level.max(self.floor(x)) * MAD_TO_SD))
            .clamp(-cap, cap);
        // While a CUSUM is building up, the scales hold still: a slow change must not
        // teach the state that it is normal before it is judged.
        let building = [
            self.slope_up,
            self.slope_down,
            self.level_up,
            self.level_down,
        ]
        .iter()
        .any(|c| c.sum > t.drift_h / 4.0);
        let a = if building { a.min(ALPHA_SLOW) } else { a };
        // Winsorised at `cap` scales, once there are scales to speak of: over the first
        // readings a plain mean, or a first small step would stunt the scale for good.
        let w = if self.n <= WINSOR_AFTER {
            f64::INFINITY
        } else {
            cap
        };
        self.dev_diff += a * ((d - self.mean_diff).abs().min(w * sd) - self.dev_diff);
        self.mean_diff += a_slow * (d.clamp(-w * sd, w * sd) - self.mean_diff);
        let r = x - self.level;
        self.dev_level += a * (r.abs().min(w * sl) - self.dev_level);
        self.level += a * r.clamp(-w * sl, w * sl);
        self.slow_dev_level += a_slow * (r.abs().min(w * sl) - self.slow_dev_level);
        self.slow_dev_diff += a_slow * (d.abs().min(w * sd) - self.slow_dev_diff);
        self.prev = x;

        if !drift {
            return;
        }
        let (k, h) = (t.drift_k, t.drift_h);
        let mut fired = None;
        if self.slope_up.add(u_slope, k, h, ts) {
            fired = Some(("cusum-slope", "rising", self.slope_up));
        } else if self.slope_down.add(-u_slope, k, h, ts) {
            fired = Some(("cusum-slope", "falling", self.slope_down));
        }
        // The level CUSUM assumes close to independent readings: only where the level
        // deviation, over a long memory, is not larger than the step deviation (white noise
        // has 0.71 of it; a random walk or a densely sampled cycle far more).
        if self.settle > 0 {
            // After a re-anchor the level starts from one reading: let it settle first.
            self.settle -= 1;
            self.level_up = Cusum::default();
            self.level_down = Cusum::default();
        } else if self.slow_dev_level <= self.slow_dev_diff {
            // More slack than on increments: a smooth signal's level error wavers with its
            // curvature, and only a clear ramp or shift should build up here.
            let k = k + LEVEL_SLACK;
            if self.level_up.add(u_level, k, h, ts) && fired.is_none() {
                fired = Some(("cusum-level", "above", self.level_up));
            } else if self.level_down.add(-u_level, k, h, ts) && fired.is_none() {
                fired = Some(("cusum-level", "below", self.level_down));
            }
        } else {
            self.level_up = Cusum::default();
            self.level_down = Cusum::default();
        }
        if let Some((detector, way, c)) = fired {
            out.push(Finding::point(
                Kind::Drift,
                detector,
                score(c.sum, h),
                c.from,
                ts,
                x,
                format!("sustained change ({way}) since this reading"),
            ));
            self.reanchor(x);
        }
    }

    /// Counts runs of one value; opens and closes `stuck`.
    fn track_runs(&mut self, ts: i64, x: f64, t: &Tuning, armed: bool, out: &mut Vec<Finding>) {
        if x == self.run_value {
            self.run = self.run.saturating_add(1);
            self.run_last = ts;
            let limit = (self.long_run * t.stuck_factor).max(f64::from(t.stuck_min));
            if t.stuck
                && armed
                && !self.stuck_open
                && self.changes >= STUCK_ARM_CHANGES
                && f64::from(self.run) >= limit
            {
                self.stuck_open = true;
                out.push(Finding {
                    ongoing: true,
                    ..Finding::point(
                        Kind::Stuck,
                        "repeat",
                        score(f64::from(self.run), limit / 2.0),
                        self.run_from,
                        ts,
                        x,
                        format!(
                            "{x} repeated {} times; its usual longest run is {:.0}",
                            self.run, self.long_run
                        ),
                    )
                });
            }
            return;
        }
        if self.stuck_open {
            self.stuck_open = false;
            out.push(Finding::end(Kind::Stuck, self.run_from, self.run_last));
            // The sensor moves again: its steps are judged from here, its level against the
            // level it had before it froze.
            self.prev = x;
            self.exc_len = 0;
            self.clear_cusums();
            self.settle = SETTLE;
        } else {
            self.long_run = (self.long_run * RUN_DECAY).max(f64::from(self.run));
        }
        self.changes = self.changes.saturating_add(1);
        self.run = 1;
        self.run_from = ts;
        self.run_last = ts;
        self.run_value = x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal};

    fn run(values: &[f64]) -> Vec<Finding> {
        let mut s = Series::default();
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            s.observe(i as i64 * 1000, *v, &Tuning::default(), false, &mut out);
        }
        out
    }

    fn noise(n: usize, seed: u64) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0, 1.0).unwrap();
        (0..n).map(|_| normal.sample(&mut rng)).collect()
    }

    #[test]
    fn white_noise_raises_nothing() {
        for seed in 0..5 {
            let v: Vec<f64> = noise(20_000, seed).iter().map(|x| 20.0 + x).collect();
            let found = run(&v);
            assert!(found.len() <= 1, "seed {seed}: {found:?}");
        }
    }

    #[test]
    fn many_short_noisy_series_raise_nothing() {
        // Like a fleet just connected: 100 readings each of a set point with noise,
        // some quantised.
        for seed in 0..200 {
            let q = if seed % 2 == 0 { 0.5 } else { 0.0 };
            let v: Vec<f64> = noise(100, 1000 + seed)
                .iter()
                .map(|e| {
                    let x = 230.0 + e;
                    if q > 0.0 {
                        (x / q).round() * q
                    } else {
                        x
                    }
                })
                .collect();
            let found = run(&v);
            assert!(found.is_empty(), "seed {seed}: {found:?}");
        }
    }

    #[test]
    fn a_random_walk_raises_nothing() {
        let mut x = 0.0;
        let v: Vec<f64> = noise(20_000, 9)
            .iter()
            .map(|s| {
                x += s;
                x
            })
            .collect();
        assert!(run(&v).len() <= 1, "{:?}", run(&v));
    }

    #[test]
    fn a_noisy_daily_cycle_raises_nothing() {
        // 5-minute samples, a daily cycle of ±5 with noise 0.3, two weeks.
        let v: Vec<f64> = noise(4032, 3)
            .iter()
            .enumerate()
            .map(|(i, e)| 20.0 + 5.0 * (std::f64::consts::TAU * i as f64 / 288.0).sin() + 0.3 * e)
            .collect();
        assert!(run(&v).is_empty(), "{:?}", run(&v));
    }

    #[test]
    fn a_quantised_slow_sensor_raises_nothing() {
        // A slow cycle rounded to 0.5: long runs of one value are normal.
        let v: Vec<f64> = noise(5000, 4)
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let x = 20.0 + 3.0 * (std::f64::consts::TAU * i as f64 / 700.0).sin() + 0.1 * e;
                (x * 2.0).round() / 2.0
            })
            .collect();
        assert!(run(&v).is_empty(), "{:?}", run(&v));
    }

    #[test]
    fn a_spike_is_raised_at_the_next_reading_with_its_own_timestamp() {
        let mut v: Vec<f64> = noise(500, 1).iter().map(|x| 50.0 + x).collect();
        v[300] += 25.0;
        let found = run(&v);
        assert_eq!(found.len(), 1, "{found:?}");
        let f = &found[0];
        assert_eq!(
            (f.kind, f.ts_ms, f.to_ms, f.raised_ts_ms),
            (Kind::Spike, 300_000, 300_000, 301_000)
        );
        assert!(f.score > 0.5 && f.score <= 1.0);
        assert_eq!(f.value, Some(v[300]));
    }

    #[test]
    fn outliers_while_learning_do_not_blind_the_detector() {
        let mut v: Vec<f64> = noise(400, 2).iter().map(|x| 10.0 + x).collect();
        v[3] = 1000.0;
        v[10] = -500.0;
        v[200] += 20.0;
        let found = run(&v);
        assert!(
            found
                .iter()
                .any(|f| f.kind == Kind::Spike && f.ts_ms == 200_000),
            "{found:?}"
        );
    }

    #[test]
    fn a_level_shift_is_a_drift_placed_at_its_first_reading() {
        let mut v: Vec<f64> = noise(600, 5).iter().map(|x| 10.0 + x).collect();
        for x in &mut v[300..] {
            *x += 15.0;
        }
        let found = run(&v);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].kind, found[0].detector, found[0].ts_ms),
            (Kind::Drift, "level-shift", 300_000)
        );
        assert_eq!(found[0].raised_ts_ms, 303_000);
    }

    #[test]
    fn a_slow_ramp_on_a_steady_sensor_is_a_drift() {
        let mut v: Vec<f64> = noise(1000, 6).iter().map(|x| 10.0 + x).collect();
        for (i, x) in v[500..].iter_mut().enumerate() {
            *x += i as f64 * 0.1; // 5 deviations after 50 readings
        }
        let found = run(&v);
        assert!(
            !found.is_empty() && found.iter().all(|f| f.kind == Kind::Drift),
            "{found:?}"
        );
        assert!(
            found[0].raised_ts_ms > 500_000 && found[0].raised_ts_ms < 620_000,
            "{found:?}"
        );
    }

    #[test]
    fn a_frozen_sensor_is_stuck_until_it_moves_again() {
        let mut v: Vec<f64> = noise(400, 7).iter().map(|x| 10.0 + x).collect();
        for i in 200..230 {
            v[i] = v[199];
        }
        let found = run(&v);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(
            (found[0].kind, found[0].ts_ms, found[0].ongoing),
            (Kind::Stuck, 199_000, true)
        );
        assert_eq!(found[0].raised_ts_ms, 199_000 + 7_000);
        assert_eq!(
            (found[1].kind, found[1].ts_ms, found[1].to_ms),
            (Kind::Stuck, 199_000, 229_000)
        );
        assert!(found[1].is_end());
    }

    #[test]
    fn a_series_is_small() {
        assert_eq!(std::mem::size_of::<Series>(), 224);
    }

    #[test]
    fn a_quiet_start_or_noise_that_grows_costs_a_few_alarms_at_most() {
        // A sensor settling at power-up (40 equal readings), then noisy.
        let mut v = vec![20.0; 40];
        v.extend(noise(400, 21).iter().map(|e| 20.0 + 0.5 * e));
        assert!(run(&v).is_empty(), "{:?}", run(&v));
        // Noise that grows fivefold for good: learned, not alarmed on for ever.
        let mut v: Vec<f64> = noise(300, 22).iter().map(|e| 20.0 + 0.1 * e).collect();
        v.extend(noise(1000, 23).iter().map(|e| 20.0 + 0.5 * e));
        let found = run(&v);
        assert!(found.len() <= 6, "{} alarms: {found:?}", found.len());
        assert!(found.iter().all(|f| f.ts_ms < 400_000), "{found:?}");
    }

    #[test]
    fn a_slow_signal_sampled_in_bursts_raises_nothing() {
        // A sine over minutes with small noise, sampled in bursts of 30 readings 1 ms apart
        // every 5 s (a device that uploads what it buffered): between bursts the signal
        // moves more than its noise, which is not an anomaly.
        let e = noise(6000, 31);
        let mut s = Series::default();
        let mut out = Vec::new();
        for (i, e) in e.iter().enumerate() {
            let ts = (i / 30) as i64 * 5_000 + (i % 30) as i64;
            let x = 50.0 + 10.0 * (ts as f64 / 60_000.0).sin() + 0.05 * e;
            s.observe(ts, x, &Tuning::default(), false, &mut out);
        }
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_constant_sensor_is_never_stuck() {
        assert!(run(&[3.0; 1000]).is_empty());
    }

    #[test]
    fn late_and_missing_readings_change_nothing() {
        let mut s = Series::default();
        let mut out = Vec::new();
        let t = Tuning::default();
        for i in 0..100 {
            s.observe(i * 10, (i % 7) as f64, &t, false, &mut out);
        }
        assert_eq!(s.observe(5, 1e9, &t, false, &mut out), Seen::Late);
        assert_eq!(
            s.observe(2000, f64::NAN, &t, false, &mut out),
            Seen::NotANumber
        );
        assert!(out.is_empty());
        // Learning starts at the first change of value: 99 readings from the second on.
        assert_eq!(s.readings(), 99);
    }

    #[test]
    fn learning_only_raises_nothing() {
        let mut s = Series::default();
        let mut out = Vec::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for i in 0..300 {
            let v = if i == 200 {
                1e6
            } else {
                rng.random_range(0.0..1.0)
            };
            s.observe(i, v, &Tuning::default(), true, &mut out);
        }
        assert!(out.is_empty());
    }
}
