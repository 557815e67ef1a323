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
//! State per device: a few numbers (about 100 bytes). Pure: the caller passes the clock.

use super::series::score;
use super::{Finding, Kind};

/// Frames a device reports before its intervals are trusted.
const WARMUP_FRAMES: u32 = 10;
/// Weight of a new interval in the learned ones.
const ALPHA: f64 = 0.1;

/// One device's reporting rhythm.
#[derive(Debug, Clone, Default)]
pub struct Cadence {
    frames: u32,
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
        factor: f64,
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
        let armed = self.frames >= WARMUP_FRAMES && !learn_only;
        if let Some(from) = self.open.take() {
            out.push(Finding::end(
                Kind::Dropout,
                from,
                first_ts - self.step.round() as i64,
            ));
        } else if armed && self.step > 0.0 && gap > factor * self.step {
            let step = self.step.round() as i64;
            out.push(Finding {
                value: None,
                to_ms: first_ts - step,
                ..Finding::point(
                    Kind::Dropout,
                    "gap",
                    score(gap / self.step, factor),
                    self.last_ts + step,
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
            let arrival = (now - self.last_arrival).max(0) as f64;
            let capped = if self.arrival > 0.0 {
                arrival.min(factor * self.arrival)
            } else {
                arrival
            };
            self.arrival += a * (capped - self.arrival);
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
    pub fn deadline(&self, factor: f64) -> Option<i64> {
        (self.connected
            && self.open.is_none()
            && self.frames >= WARMUP_FRAMES
            && self.arrival > 0.0)
            .then(|| self.last_arrival + (factor * self.arrival).ceil() as i64)
    }

    /// Raises the live dropout if `now` is past the deadline.
    pub fn check(&mut self, now: i64, factor: f64, out: &mut Vec<Finding>) {
        let Some(deadline) = self.deadline(factor) else {
            return;
        };
        if now < deadline {
            return;
        }
        let silent = (now - self.last_arrival) as f64;
        // The device's clock runs at `step` per `arrival` (1 for live data, faster for a
        // replay or a device reporting several samples a frame).
        let pace = if self.arrival > 0.0 {
            self.step / self.arrival
        } else {
            1.0
        };
        let step = self.step.round() as i64;
        let from = self.last_ts + step;
        self.open = Some(from);
        out.push(Finding {
            value: None,
            ongoing: true,
            ..Finding::point(
                Kind::Dropout,
                "silence",
                score(silent / self.arrival, factor),
                from,
                self.last_ts + (silent * pace).round() as i64,
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

    /// A device reporting every second for `n` frames, arriving on time.
    fn steady(n: i64) -> (Cadence, Vec<Finding>) {
        let mut c = Cadence::default();
        let mut out = Vec::new();
        for i in 0..n {
            c.frame(i * 1000, i * 1000, 5_000 + i * 1000, 2.5, false, &mut out);
        }
        (c, out)
    }

    #[test]
    fn a_gap_in_timestamps_is_a_dropout_found_when_data_resumes() {
        let (mut c, mut out) = steady(30);
        c.frame(40_000, 40_000, 5_000 + 30_000, 2.5, false, &mut out);
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
        assert_eq!(c.deadline(2.5), Some(36_500));
        c.check(36_000, 2.5, &mut out);
        assert!(out.is_empty());
        c.check(36_600, 2.5, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].ts_ms, out[0].raised_ts_ms, out[0].ongoing),
            (30_000, 31_600, true)
        );
        c.check(40_000, 2.5, &mut out);
        assert_eq!(out.len(), 1, "raised once");
        c.frame(45_000, 45_000, 50_000, 2.5, false, &mut out);
        assert_eq!(out.len(), 2);
        assert!(out[1].is_end());
        assert_eq!((out[1].ts_ms, out[1].to_ms), (30_000, 44_000));
    }

    #[test]
    fn a_disconnected_device_is_not_a_dropout() {
        let (mut c, mut out) = steady(30);
        c.disconnected(&mut out);
        assert_eq!(c.deadline(2.5), None);
        c.check(1_000_000, 2.5, &mut out);
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
                2.5,
                false,
                &mut out,
            );
        }
        assert!(out.is_empty(), "{out:?}");
    }
}
