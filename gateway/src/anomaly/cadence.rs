//! Per device `dropout`: a device silent far longer than its usual interval.
//!
//! Two views, because a replayed day must be judged like a live one:
//! - **a gap in the readings' timestamps**: the first reading after the silence is more than
//!   `factor` usual steps after the last one before it. Decided when data resumes, so it
//!   also finds gaps in back-filled or replayed data.
//! - **live**, on the gateway's clock: a connected device whose next frame is `factor` usual
//!   arrival intervals late. Decided while the silence lasts (the caller checks
//!   [`Cadence::deadline`]), and ended when data resumes. `raised_ts_ms` is where the device's
//!   clock stood then, projected from its last reading at its usual pace.
//!
//! Either way the silence must also last `min_ms` of the device's own clock (2 s by
//! default): a device that sends ten frames a second is not "dropped out" by a 300 ms network
//! hiccup, nor is one that uploaded a backlog in a burst and then went back to its pace. On
//! a device clock that runs faster than the wall (a replay, a time-scaled simulation) that
//! floor is short on the wall.
//!
//! State per device: a few numbers (about 100 bytes). Pure: the caller passes the clock.

use super::series::score;
use super::{Finding, Kind};

/// Frames a device reports before its intervals are trusted.
const WARMUP_FRAMES: u32 = 10;
/// Frames closer together than this on the gateway's clock (a backlog uploaded after a
/// reconnect, a device sending as fast as it can) do not teach the arrival interval, so a
/// burst never makes the next ordinary pause look like a dropout. A device that always
/// sends faster than this is never judged live (its gaps in timestamps still are).
const MIN_PACED_GAP_MS: i64 = 20;
/// Bounds of the device-clock pace (device ms per gateway ms) the floor is scaled by.
const MIN_PACE: f64 = 0.1;
const MAX_PACE: f64 = 1e6;
/// Longest wait for a device's next frame before its silence is judged (a day).
const MAX_WAIT_MS: f64 = 86_400_000.0;
/// Weight of a new interval in the learned ones.
const ALPHA: f64 = 0.1;

/// How long a silence must be to be a dropout.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rhythm {
    /// Times the device's usual interval.
    pub factor: f64,
    /// And at least this long on the device's clock, ms.
    pub min_ms: f64,
}

/// One device's reporting rhythm.
#[derive(Debug, Clone, Default)]
pub struct Cadence {
    frames: u32,
    /// Frames that arrived at least [`MIN_PACED_GAP_MS`] after the one before (the ones its
    /// usual arrival interval is learned from).
    paced: u32,
    /// Newest reading timestamp (device clock).
    last_ts: i64,
    /// Gateway time the newest frame arrived.
    last_arrival: i64,
    /// Usual step between the last reading of a frame and the first of the next (ms).
    step: f64,
    /// Usual time between frames on the gateway's clock (ms).
    arrival: f64,
    /// A live dropout under way: its first missing reading's timestamp.
    open: Option<i64>,
    /// Whether the device is connected (only then is silence a dropout).
    connected: bool,
}

impl Cadence {
    /// A frame with readings from `first_ts` to `last_ts` arrived at `now` (gateway clock).
    /// With `learn_only`, nothing is raised.
    pub fn frame(
        &mut self,
        first_ts: i64,
        last_ts: i64,
        now: i64,
        rhythm: Rhythm,
        learn_only: bool,
        out: &mut Vec<Finding>,
    ) {
        self.connected = true;
        if self.frames == 0 {
            self.frames = 1;
            self.last_ts = last_ts;
            self.last_arrival = now;
            return;
        }
        if first_ts < self.last_ts {
            return; // older data (a clock stepped back, a resend of old frames): no rhythm
        }
        let gap = (first_ts - self.last_ts) as f64;
        let factor = rhythm.factor;
        let armed = self.frames >= WARMUP_FRAMES && !learn_only;
        if let Some(from) = self.open.take() {
            out.push(Finding::end(
                Kind::Dropout,
                from,
                first_ts.saturating_sub(self.step.round() as i64),
            ));
        } else if armed && self.step > 0.0 && gap > (factor * self.step).max(rhythm.min_ms) {
            let step = self.step.round() as i64;
            out.push(Finding {
                value: None,
                to_ms: first_ts.saturating_sub(step),
                ..Finding::point(
                    Kind::Dropout,
                    "gap",
                    score(gap / self.step, factor),
                    self.last_ts.saturating_add(step),
                    first_ts,
                    0.0,
                    format!(
                        "no readings for {} ms; it usually reports every {step} ms",
                        first_ts - self.last_ts
                    ),
                )
            });
        }
        // Learn the rhythm from ordinary gaps only (a dropout is not the new normal).
        if gap <= factor * self.step || self.step == 0.0 {
            let a = (1.0 / f64::from(self.frames)).max(ALPHA);
            self.step += a * (gap - self.step);
            let arrival = now - self.last_arrival;
            if arrival >= MIN_PACED_GAP_MS {
                self.paced = self.paced.saturating_add(1);
                let a = (1.0 / f64::from(self.paced)).max(ALPHA);
                let arrival = arrival as f64;
                let capped = if self.arrival > 0.0 {
                    arrival.min(factor * self.arrival)
                } else {
                    arrival
                };
                self.arrival += a * (capped - self.arrival);
            }
        }
        self.frames = self.frames.saturating_add(1);
        self.last_ts = self.last_ts.max(last_ts);
        self.last_arrival = now;
    }

    /// The device disconnected: its silence from now on is not a dropout (the status topic
    /// says it is offline). Ends a live dropout under way at its last reading.
    pub fn disconnected(&mut self, out: &mut Vec<Finding>) {
        self.connected = false;
        if let Some(from) = self.open.take() {
            out.push(Finding::end(Kind::Dropout, from, from));
        }
    }

    /// When (gateway clock) its silence becomes a dropout; `None` while not armed,
    /// disconnected, or already raised.
    pub fn deadline(&self, rhythm: Rhythm) -> Option<i64> {
        (self.connected && self.open.is_none() && self.paced >= WARMUP_FRAMES && self.arrival > 0.0)
            .then(|| {
                let floor = rhythm.min_ms / self.pace();
                let wait = (rhythm.factor * self.arrival).max(floor).min(MAX_WAIT_MS);
                self.last_arrival.saturating_add(wait.ceil() as i64)
            })
    }

    /// Device-clock ms per gateway-clock ms: 1 for live data, more for a replay or a
    /// time-scaled simulation.
    fn pace(&self) -> f64 {
        if self.arrival > 0.0 && self.step > 0.0 {
            // Bounded: frames with equal timestamps (or a wildly fast clock) must not make
            // the floor vanish or explode.
            (self.step / self.arrival).clamp(MIN_PACE, MAX_PACE)
        } else {
            1.0
        }
    }

    /// Raises the live dropout if `now` is past the deadline.
    pub fn check(&mut self, now: i64, rhythm: Rhythm, out: &mut Vec<Finding>) {
        let factor = rhythm.factor;
        let Some(deadline) = self.deadline(rhythm) else {
            return;
        };
        if now < deadline {
            return;
        }
        let silent = (now - self.last_arrival) as f64;
        // The device's clock runs at `step` per `arrival` (1 for live data, faster for a
        // replay or a device reporting several samples a frame).
        let pace = self.pace();
        let step = self.step.round() as i64;
        let from = self.last_ts.saturating_add(step);
        self.open = Some(from);
        out.push(Finding {
            value: None,
            ongoing: true,
            ..Finding::point(
                Kind::Dropout,
                "silence",
                score(silent / self.arrival, factor),
                from,
                self.last_ts.saturating_add((silent * pace).round() as i64),
                0.0,
                format!(
                    "connected but silent for {} ms; it usually sends every {} ms",
                    silent.round(),
                    self.arrival.round()
                ),
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: Rhythm = Rhythm {
        factor: 2.5,
        min_ms: 2000.0,
    };

    /// A device reporting every second for `n` frames, arriving on time.
    fn steady(n: i64) -> (Cadence, Vec<Finding>) {
        let mut c = Cadence::default();
        let mut out = Vec::new();
        for i in 0..n {
            c.frame(i * 1000, i * 1000, 5_000 + i * 1000, R, false, &mut out);
        }
        (c, out)
    }

    #[test]
    fn a_gap_in_timestamps_is_a_dropout_found_when_data_resumes() {
        let (mut c, mut out) = steady(30);
        c.frame(40_000, 40_000, 5_000 + 30_000, R, false, &mut out);
        assert_eq!(out.len(), 1, "{out:?}");
        let f = &out[0];
        assert_eq!(
            (f.kind, f.detector, f.ts_ms, f.to_ms, f.raised_ts_ms),
            (Kind::Dropout, "gap", 30_000, 39_000, 40_000)
        );
    }

    #[test]
    fn live_silence_is_a_dropout_until_data_resumes() {
        let (mut c, mut out) = steady(30);
        // Last frame: ts 29 000 arrived at 34 000; usual arrival every 1 000 ms.
        assert_eq!(c.deadline(R), Some(36_500));
        c.check(36_000, R, &mut out);
        assert!(out.is_empty());
        c.check(36_600, R, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].ts_ms, out[0].raised_ts_ms, out[0].ongoing),
            (30_000, 31_600, true)
        );
        c.check(40_000, R, &mut out);
        assert_eq!(out.len(), 1, "raised once");
        c.frame(45_000, 45_000, 50_000, R, false, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[1].is_end());
        assert_eq!((out[1].ts_ms, out[1].to_ms), (30_000, 44_000));
    }

    #[test]
    fn a_disconnected_device_is_not_a_dropout() {
        let (mut c, mut out) = steady(30);
        c.disconnected(&mut out);
        assert_eq!(c.deadline(R), None);
        c.check(1_000_000, R, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn jitter_and_batches_are_not_dropouts() {
        let mut c = Cadence::default();
        let mut out = Vec::new();
        // Frames of 5 samples every 5 s, arriving with jitter.
        for i in 0..200i64 {
            let first = i * 5000;
            c.frame(
                first,
                first + 4000,
                i * 5000 + (i * 37 % 900),
                R,
                false,
                &mut out,
            );
        }
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_burst_teaches_no_rhythm_and_a_live_device_gets_two_seconds() {
        let mut c = Cadence::default();
        let mut out = Vec::new();
        // A live device every 100 ms, then a backlog of 100 frames within 40 ms.
        for i in 0..30i64 {
            c.frame(i * 100, i * 100, i * 100, R, false, &mut out);
        }
        for i in 0..100i64 {
            c.frame(
                3_000 + i * 100,
                3_000 + i * 100,
                3_000 + i * 2 / 5,
                R,
                false,
                &mut out,
            );
        }
        // Its interval is still 100 ms, but a silence must last 2 s of its clock.
        assert_eq!(c.deadline(R), Some(3_039 + 2_000));
        c.check(4_000, R, &mut out);
        assert!(out.is_empty());
        let mut fast = Cadence::default();
        for i in 0..100i64 {
            fast.frame(i, i, i, R, false, &mut out);
        }
        assert_eq!(fast.deadline(R), None, "never paced: not judged live");
    }

    #[test]
    fn on_a_fast_device_clock_the_floor_is_short_on_the_wall() {
        let mut c = Cadence::default();
        let mut out = Vec::new();
        // A replay: a 5-minute step every 100 ms of wall time.
        for i in 0..30i64 {
            c.frame(i * 300_000, i * 300_000, i * 100, R, false, &mut out);
        }
        assert_eq!(c.deadline(R), Some(2_900 + 250));
    }

    #[test]
    fn wild_timestamps_never_overflow() {
        let mut c = Cadence::default();
        let mut out = Vec::new();
        // Frames with equal timestamps, then one at the end of time, then more.
        for i in 0..50i64 {
            c.frame(7, 7, i * 100, R, false, &mut out);
        }
        c.frame(i64::MAX, i64::MAX, 5_100, R, false, &mut out);
        for i in 0..50i64 {
            c.frame(i64::MAX, i64::MAX, 5_200 + i * 100, R, false, &mut out);
        }
        let deadline = c.deadline(R).unwrap();
        assert!(deadline > 10_000);
        c.check(i64::MAX / 2, R, &mut out);
        c.frame(i64::MAX, i64::MAX, i64::MAX / 2 + 1, R, false, &mut out);
        assert!(out.iter().all(|f| f.ts_ms <= f.to_ms || f.is_end()));
    }
}
