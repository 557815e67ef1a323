//! The pacer: a controller that keeps the gateway at full speed under overload by asking the
//! heaviest senders to report less often (protocol rule 11), per device.
//!
//! Every [`TICK`] it measures the pressure on the gateway: the store queue's fill against
//! `pacing.target_queue_fill`, the longest time a frame waited for its commit against
//! `pacing.target_ack_latency`, and the MQTT backlog against half its budget (1.0 at each
//! target). It also measures what each online device sends: readings/s and readings per
//! frame. From those it keeps one **level**: the most readings per second any one device may
//! send. Devices under the level are not touched; a device at or over it is asked for one
//! frame per `its readings per frame / level` seconds (max-min fairness: a flooding device
//! is slowed first, and a quiet one not at all). The level is in readings, not frames,
//! because a paced device batches: its frames grow as its interval does, so frames/s say
//! little about the load, and the interval of a device whose frames are still growing rises
//! by its own growth every tick until its frames are full and its readings/s fall to the
//! level.
//!
//! - pressure over 1: the devices together are admitted a share of what the writer served
//!   over the last second, less the further over the target (the level at most halves per
//!   tick); while what arrives already fits that share, the level holds (the queue is
//!   draining what came before);
//! - pressure under [`LIFT_BELOW`]: the level rises by [`LIFT_STEP`] per tick (gradually),
//!   and by [`LIFT_NEAR`] once near the level where it last had to cut;
//! - in between: it holds, so the loop settles instead of swinging between "10 s" and "0".
//!
//! Pacing ends (every device back to its own rate) once the level is well above what any
//! device sends and the pressure stays low. Each change of regime is logged once; the level,
//! the pressure and the paced devices are in `/metrics` and `/api/v1/stats`, and a device's
//! interval in its device record. A paced device should put more readings into each frame
//! (it keeps sampling): pacing costs frames, not readings. A device that ignores pacing is
//! still held by backpressure: its session waits for room in the store queue and stops
//! reading its socket.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::outbox::Backlog;
use crate::store::writer::QueueProbe;

/// How often the controller measures and decides.
pub const TICK: Duration = Duration::from_millis(250);
/// The soonest a full queue makes the pacer decide after its last decision.
const EARLIEST_TICK: Duration = Duration::from_millis(50);
/// Pressure under which the level rises.
pub const LIFT_BELOW: f64 = 0.5;
/// Factor the level rises by per calm tick.
pub const LIFT_STEP: f64 = 1.15;
/// The same near the level of the last cut (where the capacity was).
pub const LIFT_NEAR: f64 = 1.03;
/// Calm ticks with every device well under the level before pacing ends.
const CALM_TICKS_TO_END: u32 = 8;
/// Devices sending at least this share of the level are paced (and told the interval).
const PACED_SHARE: f64 = 0.5;
/// A paced device is told again only when its interval changes by more than this share.
const RETELL_SHARE: f64 = 0.1;
/// Queue fill at which sessions wait for room (backpressure is holding devices back).
const BLOCKED_FILL: f64 = 0.9;
/// Ticks over which the writer's served rate is averaged (one second).
const SERVED_WINDOW: usize = 4;
/// Share of the MQTT backlog budget that counts as pressure 1.
const BACKLOG_TARGET: f64 = 0.5;

/// `[pacing]`: how the gateway slows devices when it falls behind.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PacingConfig {
    /// Ask devices to report less often while the gateway falls behind. Default true. Off,
    /// devices are slowed by backpressure alone (the gateway stops reading their sockets).
    pub enabled: bool,
    /// Hold the store writer's queue near this fill (0 to 1). Default 0.25.
    pub target_queue_fill: f64,
    /// Keep the time a frame waits for its commit under this. Default 50ms.
    #[serde(with = "humantime_serde")]
    pub target_ack_latency: Duration,
    /// The longest interval a device is asked to keep. Default 10s.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            target_queue_fill: 0.25,
            target_ack_latency: Duration::from_millis(50),
            max_interval: Duration::from_secs(10),
        }
    }
}

impl PacingConfig {
    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.target_queue_fill > 0.0 && self.target_queue_fill < 1.0) {
            return Err((
                "pacing.target_queue_fill",
                "must be above 0 and below 1".into(),
            ));
        }
        if self.target_ack_latency < Duration::from_millis(1) {
            return Err(("pacing.target_ack_latency", "must be at least 1ms".into()));
        }
        if self.max_interval < Duration::from_millis(10) {
            return Err(("pacing.max_interval", "must be at least 10ms".into()));
        }
        Ok(())
    }
}

/// What the controller decided last, for `/api/v1/stats` and `/healthz`.
#[derive(Debug, Default)]
pub struct PaceStatus {
    /// `pacing.enabled`.
    pub enabled: bool,
    /// `pacing.target_queue_fill`.
    pub target_queue_fill: f64,
    /// `pacing.target_ack_latency`, ms.
    pub target_ack_latency_ms: u64,
    /// The longest interval a paced device is asked to keep, ms (0: not pacing).
    interval_ms: AtomicU32,
    /// Devices paced now.
    devices: AtomicU64,
    /// The last pressure, as f64 bits.
    pressure: AtomicU64,
    /// The longest commit wait of the last tick, ms.
    wait_ms: AtomicU64,
}

impl PaceStatus {
    /// Nothing decided yet, with the targets of `config`.
    pub fn new(config: &PacingConfig) -> Self {
        Self {
            enabled: config.enabled,
            target_queue_fill: config.target_queue_fill,
            target_ack_latency_ms: config.target_ack_latency.as_millis() as u64,
            ..Self::default()
        }
    }

    /// The longest interval a paced device is asked to keep, ms (0: not pacing).
    pub fn interval_ms(&self) -> u32 {
        self.interval_ms.load(Ordering::Relaxed)
    }

    /// Devices paced now.
    pub fn devices(&self) -> u64 {
        self.devices.load(Ordering::Relaxed)
    }

    /// The last pressure (1.0: at a target).
    pub fn pressure(&self) -> f64 {
        f64::from_bits(self.pressure.load(Ordering::Relaxed))
    }

    /// The longest time a frame waited for its commit in the last tick, ms.
    pub fn wait_ms(&self) -> u64 {
        self.wait_ms.load(Ordering::Relaxed)
    }
}

/// One tick's measurements.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measure {
    /// Store queue fill, 0 to 1.
    pub fill: f64,
    /// Time the writer needs for what is queued (queued readings over the readings it
    /// served lately), seconds: the wait a frame arriving now can expect.
    pub drain_s: f64,
    /// MQTT backlog bytes over its budget (0 without MQTT).
    pub backlog: f64,
    /// Whether the backlog is at its budget (its policy applies).
    pub backlog_full: bool,
    /// Readings/s the writer committed over the last second: its capacity while the queue
    /// is not empty.
    pub served: f64,
}

/// The controller's state, apart from the devices (pure: tested without a gateway).
#[derive(Debug, Clone)]
pub struct Controller {
    target_fill: f64,
    target_wait_s: f64,
    /// Lowest level (one reading per `max_interval`), readings/s.
    min_level: f64,
    /// Readings/s any one device may send; `None`: not pacing.
    level: Option<f64>,
    calm: u32,
    /// The level at the last fresh overshoot: the capacity was about there.
    last_cut: Option<f64>,
    /// Whether the last tick was over the target.
    over: bool,
}

/// A change of regime, to log once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Regime {
    /// Pacing began at this level (readings/s per device).
    Began(f64),
    /// Pacing ended.
    Ended,
}

impl Controller {
    /// A controller for `config`, not pacing.
    pub fn new(config: &PacingConfig) -> Self {
        Self {
            target_fill: config.target_queue_fill,
            target_wait_s: config.target_ack_latency.as_secs_f64(),
            min_level: 1.0 / config.max_interval.as_secs_f64().max(0.001),
            level: None,
            calm: 0,
            last_cut: None,
            over: false,
        }
    }

    /// Pressure of `m`: 1.0 at a target, above it over.
    pub fn pressure(&self, m: &Measure) -> f64 {
        let mut p = (m.fill / self.target_fill)
            .max(m.drain_s / self.target_wait_s)
            .max(m.backlog / BACKLOG_TARGET);
        if m.backlog_full {
            p = p.max(2.0);
        }
        p
    }

    /// The current level, readings/s per device (`None`: not pacing).
    pub fn level(&self) -> Option<f64> {
        self.level
    }

    /// One tick: `rates` are the devices' readings/s over the last tick.
    /// Returns the new level and a change of regime, if any.
    ///
    /// Over the target, the devices together are admitted a share of what the writer
    /// served (its measured capacity), less the further over the pressure is; within the
    /// band the level holds; well under it the level rises a step. Working from the served
    /// rate rather than the fill alone keeps the loop from swinging: the queue is an
    /// integrator, and steering it by its level only would overshoot both ways.
    pub fn step(&mut self, m: &Measure, rates: &[f64]) -> (Option<f64>, Option<Regime>) {
        let p = self.pressure(m);
        let busiest = rates.iter().copied().fold(0.0, f64::max);
        let admit = || {
            let share = (1.0 - 0.25 * (p - 1.0)).clamp(0.5, 0.95);
            water_level(rates, m.served * share).max(self.min_level)
        };
        let mut change = None;
        match self.level {
            None if p > 1.0 && busiest > 0.0 => {
                let level = admit();
                self.level = Some(level);
                self.calm = 0;
                change = Some(Regime::Began(level));
            }
            None => {}
            Some(level) => {
                let inflow: f64 = rates.iter().sum();
                let budget = m.served * (1.0 - 0.25 * (p - 1.0)).clamp(0.5, 0.95);
                // Under backpressure (the queue full) sessions read less than devices send, so
                // the inflow seen understates the load: no holding then.
                let blocked = m.fill >= BLOCKED_FILL;
                let next = if p > 1.0 && inflow <= budget && !blocked {
                    // What arrives now fits: the queue is still draining what came before
                    // (frames already in sockets and device windows). Cutting further would
                    // only overshoot.
                    level
                } else if p > 1.0 {
                    // Never above the level (an unused allowance slows nobody).
                    // A fresh overshoot (not the continued drain of an old queue) says where
                    // the capacity is.
                    if !self.over {
                        self.last_cut = Some(level);
                    }
                    let floor = if blocked { 0.25 } else { 0.5 };
                    admit().min(level).max(level * floor)
                } else if p < LIFT_BELOW {
                    // Quickly back towards where it last had to cut, then slowly past it.
                    match self.last_cut {
                        Some(cut) if level >= cut * 0.85 => level * LIFT_NEAR,
                        _ => level * LIFT_STEP,
                    }
                } else {
                    level
                };
                let next = next.max(self.min_level);
                if p < LIFT_BELOW && busiest < next * PACED_SHARE {
                    self.calm += 1;
                } else {
                    self.calm = 0;
                }
                if self.calm >= CALM_TICKS_TO_END {
                    self.level = None;
                    self.last_cut = None;
                    change = Some(Regime::Ended);
                } else {
                    self.level = Some(next);
                }
            }
        }
        self.over = p > 1.0;
        (self.level, change)
    }
}

/// The per-device cap at which `rates` capped to it sum to `budget` (max-min fair share).
pub fn water_level(rates: &[f64], budget: f64) -> f64 {
    let mut sorted: Vec<f64> = rates.iter().copied().filter(|r| *r > 0.0).collect();
    sorted.sort_by(f64::total_cmp);
    let mut left = budget.max(0.0);
    let mut n = sorted.len();
    for r in &sorted {
        let share = left / n as f64;
        if *r > share {
            return share;
        }
        left -= r;
        n -= 1;
    }
    // Everyone fits: the cap is the busiest device's rate.
    sorted.last().copied().unwrap_or(0.0)
}

/// The interval that holds a device sending `per_frame` readings a frame to `level`
/// readings/s, ms (at least 1, at most `max_interval`).
pub fn interval_ms(per_frame: f64, level: f64, max_interval: Duration) -> u32 {
    let ms = (1000.0 * per_frame.max(1.0) / level.max(1e-9)).round();
    (ms.clamp(1.0, max_interval.as_millis() as f64)) as u32
}

/// Runs the controller until `shutdown`.
pub async fn run(
    config: PacingConfig,
    registry: Arc<Registry>,
    queue: QueueProbe,
    backlog: Option<Arc<Backlog>>,
    metrics: Arc<Metrics>,
    status: Arc<PaceStatus>,
    shutdown: CancellationToken,
) {
    let mut controller = Controller::new(&config);
    metrics.pacing_target_fill.set(config.target_queue_fill);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    let mut rates = Vec::new();
    let mut served_readings = metrics.readings_stored.get();
    let mut recent_readings = [0.0; SERVED_WINDOW];
    let mut sends: Vec<Sent> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            // The queue filled before pacing began: decide now, not at the next tick (at
            // the onset of an overload a tick is long enough to fill it many times over).
            _ = queue.filled(), if controller.level().is_none() => {
                if last.elapsed() < EARLIEST_TICK {
                    continue;
                }
                tick.reset();
            }
        }
        let Some(fill) = queue.fill() else { return };
        let now = tokio::time::Instant::now();
        let dt = now.duration_since(last).as_secs_f64().max(0.001);
        last = now;
        // What the writer did over the last second: one long commit makes a tick with
        // nothing committed, not a writer that can do nothing.
        let readings = metrics.readings_stored.get();
        recent_readings.rotate_left(1);
        recent_readings[SERVED_WINDOW - 1] = readings.saturating_sub(served_readings) as f64 / dt;
        served_readings = readings;
        let readings_per_s = recent_readings.iter().sum::<f64>() / SERVED_WINDOW as f64;
        let wait_s = queue.take_max_wait().as_secs_f64();
        let m = Measure {
            served: readings_per_s,
            fill,
            drain_s: queue.queued_readings() as f64 / readings_per_s.max(1000.0),
            backlog: backlog
                .as_ref()
                .map_or(0.0, |b| b.bytes() as f64 / b.budget().max(1) as f64),
            backlog_full: metrics.uplink_backlog_full.get() != 0,
        };
        let links = registry.pace_states();
        sends.clear();
        sends.extend(links.iter().map(|s| s.pace.take_sent(dt)));
        rates.clear();
        rates.extend(sends.iter().map(|s| s.readings_per_s));
        let (level, change) = controller.step(&m, &rates);
        let pressure = controller.pressure(&m);
        tracing::debug!(
            pressure = format_args!("{pressure:.2}"),
            fill = format_args!("{:.3}", m.fill),
            drain_ms = (m.drain_s * 1000.0) as u64,
            served_readings_per_s = m.served as u64,
            inflow_readings_per_s = rates.iter().sum::<f64>() as u64,
            level = ?level,
            "pacer tick"
        );
        let mut paced = 0;
        let mut interval = 0;
        for (state, sent) in links.iter().zip(&sends) {
            let current = state.pace.interval_ms();
            let wanted = match level {
                Some(l)
                    if sent.readings_per_s >= l * PACED_SHARE
                        // A device already paced keeps an interval while it still sends
                        // near the level.
                        || (current > 0 && sent.readings_per_s >= l * PACED_SHARE * 0.5) =>
                {
                    match sent.per_frame() {
                        Some(per_frame) => interval_ms(per_frame, l, config.max_interval),
                        None => current, // nothing arrived this tick: no news
                    }
                }
                _ => 0,
            };
            if wanted > 0 {
                paced += 1;
                interval = interval.max(wanted);
            }
            state.pace.ask(wanted, RETELL_SHARE);
        }
        status.interval_ms.store(interval, Ordering::Relaxed);
        status.devices.store(paced, Ordering::Relaxed);
        status.pressure.store(pressure.to_bits(), Ordering::Relaxed);
        status
            .wait_ms
            .store((wait_s * 1000.0) as u64, Ordering::Relaxed);
        metrics.pacing_interval.set(f64::from(interval) / 1000.0);
        metrics.pacing_devices.set(paced as i64);
        metrics.pacing_pressure.set(pressure);
        match change {
            Some(Regime::Began(l)) => {
                metrics.pacing_episodes.inc();
                tracing::warn!(
                    pressure = format_args!("{pressure:.2}"),
                    store_queue_fill = format_args!("{fill:.2}"),
                    queue_drain_ms = (m.drain_s * 1000.0) as u64,
                    backlog_full = m.backlog_full,
                    devices_paced = paced,
                    longest_interval_ms = interval,
                    "falling behind: pacing devices that send over {l:.0} readings/s to fewer frames (more readings per frame)"
                );
            }
            Some(Regime::Ended) => {
                tracing::info!("caught up: pacing lifted, devices report at their own rate again");
            }
            None => {}
        }
    }
}

/// What one link sent over a tick.
#[derive(Debug, Clone, Copy)]
struct Sent {
    frames: u64,
    readings: u64,
    readings_per_s: f64,
}

impl Sent {
    /// Mean readings per data frame (`None`: no data frame).
    fn per_frame(&self) -> Option<f64> {
        (self.frames > 0).then(|| self.readings as f64 / self.frames as f64)
    }
}

/// A link's pacing state, shared by its session and the pacer.
#[derive(Debug, Default)]
pub struct LinkPace {
    /// Data frames received on the link (the session counts).
    frames: AtomicU64,
    /// Readings in them.
    readings: AtomicU64,
    /// `frames` and `readings` when the pacer last looked.
    seen: AtomicU64,
    seen_readings: AtomicU64,
    /// The interval the link was asked to keep, ms (0: none).
    interval_ms: AtomicU32,
    /// Wakes the session to send a new interval.
    pub changed: tokio::sync::Notify,
}

impl LinkPace {
    /// A data frame with `readings` readings arrived.
    pub fn frame(&self, readings: u64) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.readings.fetch_add(readings, Ordering::Relaxed);
    }

    /// The interval the link should keep now, ms (0: none).
    pub fn interval_ms(&self) -> u32 {
        self.interval_ms.load(Ordering::Relaxed)
    }

    /// What arrived since the last call, over `dt` seconds.
    fn take_sent(&self, dt: f64) -> Sent {
        let frames = self.frames.load(Ordering::Relaxed);
        let readings = self.readings.load(Ordering::Relaxed);
        let frames = frames.saturating_sub(self.seen.swap(frames, Ordering::Relaxed));
        let readings =
            readings.saturating_sub(self.seen_readings.swap(readings, Ordering::Relaxed));
        Sent {
            frames,
            readings_per_s: readings as f64 / dt,
            readings,
        }
    }

    /// Sets the interval (waking the session) unless it is within `share` of the current
    /// one: small moves of the level do not make a message per device per tick.
    pub fn ask(&self, ms: u32, share: f64) {
        let current = self.interval_ms();
        let same = match (current, ms) {
            (0, 0) => true,
            (0, _) | (_, 0) => false,
            (c, m) => (f64::from(m) - f64::from(c)).abs() <= f64::from(c) * share,
        };
        if !same {
            self.interval_ms.store(ms, Ordering::Relaxed);
            self.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> Controller {
        Controller::new(&PacingConfig::default())
    }

    const CALM: Measure = Measure {
        fill: 0.0,
        drain_s: 0.001,
        backlog: 0.0,
        backlog_full: false,
        served: 1000.0,
    };

    #[test]
    fn the_water_level_caps_the_heaviest_senders_first() {
        // 9 devices at 10 frames/s and one at 200: a budget of 150 leaves the quiet ones
        // alone and gives the heavy one the rest.
        let mut rates = vec![10.0; 9];
        rates.push(200.0);
        assert!((water_level(&rates, 150.0) - 60.0).abs() < 1e-9);
        // Too little for everyone: an equal share.
        assert!((water_level(&rates, 50.0) - 5.0).abs() < 1e-9);
        // Enough for everyone: the busiest rate.
        assert_eq!(water_level(&rates, 1000.0), 200.0);
    }

    #[test]
    fn overload_starts_pacing_at_a_level_that_cuts_the_inflow() {
        let mut c = controller();
        let rates = vec![100.0; 10];
        let over = Measure { fill: 0.5, ..CALM };
        let (level, change) = c.step(&over, &rates);
        // Pressure 2: three quarters of what the writer served (1000 frames/s), taken
        // equally from equal senders.
        assert_eq!(level, Some(75.0));
        assert_eq!(change, Some(Regime::Began(75.0)));
    }

    #[test]
    fn the_level_settles_instead_of_swinging_between_extremes() {
        // A plant whose queue fill follows how much the devices send against a capacity of
        // 400 frames/s (with 10 devices that each want 100).
        let mut c = controller();
        let capacity = 400.0;
        let mut queue: f64 = 0.6 * 8192.0;
        let dt = TICK.as_secs_f64();
        let mut levels = Vec::new();
        for _ in 0..400 {
            let sent: f64 = c.level().map_or(100.0, |l| l.min(100.0));
            let rates = vec![sent; 10];
            let inflow = sent * 10.0;
            let served = if queue > 0.0 {
                capacity
            } else {
                inflow.min(capacity)
            };
            queue = (queue + (inflow - served) * dt).clamp(0.0, 8192.0);
            let m = Measure {
                fill: queue / 8192.0,
                drain_s: queue / capacity,
                served,
                ..CALM
            };
            let (level, _) = c.step(&m, &rates);
            levels.push(level.unwrap_or(f64::INFINITY));
        }
        let tail = &levels[200..];
        let (lo, hi) = tail
            .iter()
            .fold((f64::MAX, 0.0_f64), |(lo, hi), l| (lo.min(*l), hi.max(*l)));
        assert!(hi.is_finite(), "still pacing under a steady overload");
        assert!(
            hi / lo < 1.6,
            "the level stays within a narrow band ({lo:.1} to {hi:.1})"
        );
        // Near the capacity's fair share (40 frames/s each).
        assert!((25.0..=60.0).contains(&lo), "{lo}");
    }

    #[test]
    fn pacing_lifts_gradually_and_ends_once_the_load_is_gone() {
        let mut c = controller();
        let heavy = vec![100.0; 10];
        c.step(&Measure { fill: 0.9, ..CALM }, &heavy);
        let start = c.level().unwrap();
        // Calm while still sending at the level: rises by LIFT_STEP a tick, still pacing.
        let (l1, change) = c.step(&CALM, &[start; 10]);
        assert_eq!(change, None);
        assert!((l1.unwrap() / start - LIFT_STEP).abs() < 1e-9);
        // The load ends: pacing ends after the calm ticks, not at once.
        let mut ended_after = None;
        for i in 1..=20 {
            if let (None, Some(Regime::Ended)) = c.step(&CALM, &[0.0; 10]) {
                ended_after = Some(i);
                break;
            }
        }
        assert_eq!(ended_after, Some(CALM_TICKS_TO_END as usize));
    }

    #[test]
    fn a_full_backlog_or_a_slow_commit_is_pressure_too() {
        let c = controller();
        assert!(
            c.pressure(&Measure {
                backlog_full: true,
                ..CALM
            }) >= 2.0
        );
        assert!(
            c.pressure(&Measure {
                drain_s: 0.2,
                ..CALM
            }) > 3.0
        );
        assert!(c.pressure(&CALM) < LIFT_BELOW);
    }

    #[test]
    fn a_link_is_told_again_only_when_its_interval_moves() {
        let link = LinkPace::default();
        link.ask(100, RETELL_SHARE);
        assert_eq!(link.interval_ms(), 100);
        link.ask(105, RETELL_SHARE);
        assert_eq!(link.interval_ms(), 100, "a 5 % move is not worth a message");
        link.ask(150, RETELL_SHARE);
        assert_eq!(link.interval_ms(), 150);
        link.ask(0, RETELL_SHARE);
        assert_eq!(link.interval_ms(), 0);
        // One frame per its readings over the level: 8 readings a frame at 400 readings/s.
        assert_eq!(interval_ms(8.0, 400.0, Duration::from_secs(10)), 20);
        assert_eq!(interval_ms(1024.0, 2048.0, Duration::from_secs(10)), 500);
        assert_eq!(interval_ms(1.0, 0.05, Duration::from_secs(10)), 10_000);
        assert_eq!(interval_ms(1.0, 5000.0, Duration::from_secs(10)), 1);
    }
}
