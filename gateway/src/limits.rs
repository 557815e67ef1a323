//! `[limits]`: what one source address, one device or the whole fleet may take of the
//! gateway, so a misbehaving or hostile peer costs only itself.
//!
//! Every limit is counted when hit (`gateway_limits_hit_total{limit=...}`) and a link refused
//! for one gets `ERROR_CODE_LIMIT_EXCEEDED` with a message naming the setting (logged once a
//! minute per code, like every link error). Two limits do not refuse but slow: Hellos past
//! the per-source rate wait their turn (token guessing gets slower, never faster), and a
//! device sending readings faster than `device_readings_per_second` is simply not read until
//! it is back under (backpressure: nothing is lost).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde::Deserialize;

use crate::metrics::Metrics;

/// `[limits]` settings. 0 turns a limit off where said.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Device links open at once, all sources together. Default 50000.
    pub max_connections: u32,
    /// Device links open at once from one source address. Default 0 (off: many sites put
    /// a whole fleet behind one NAT router); set it where each device has its own address.
    pub max_connections_per_source: u32,
    /// Hellos per second from one source address; past it a Hello waits its turn (up to
    /// `session.hello_timeout`, then the link is refused). Default 5000 (0: off): a site
    /// whose whole fleet reconnects through one NAT address after an outage is not held
    /// back for long, and wrong tokens are stopped sooner by `[anomaly.security]`.
    pub hellos_per_second_per_source: u32,
    /// Readings in one Telemetry frame. Default 10000.
    pub max_readings_per_frame: u32,
    /// Distinct sensor names one device may have in the store. Default 1000.
    pub max_sensors_per_device: u32,
    /// Distinct device ids in the store: a Hello from a new device past it is refused (a
    /// fleet that invents a new id per boot must not grow the store without bound).
    /// Default 100000.
    pub max_devices: u64,
    /// Readings per second one device may send; above it the gateway stops reading its
    /// link until it is back under (backpressure). Default 100000 (0: off).
    pub device_readings_per_second: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_connections_per_source: 0,
            hellos_per_second_per_source: 5000,
            max_readings_per_frame: 10_000,
            max_sensors_per_device: 1000,
            max_devices: 100_000,
            device_readings_per_second: 100_000,
        }
    }
}

impl LimitsConfig {
    /// Range checks; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("limits.max_connections", u64::from(self.max_connections)),
            (
                "limits.max_readings_per_frame",
                u64::from(self.max_readings_per_frame),
            ),
            (
                "limits.max_sensors_per_device",
                u64::from(self.max_sensors_per_device),
            ),
            ("limits.max_devices", self.max_devices),
        ] {
            if v == 0 {
                return Err((field, "must be at least 1".into()));
            }
        }
        Ok(())
    }
}

/// The limits, by name in metrics.
pub const LIMITS: [&str; 7] = [
    "connections",
    "connections_per_source",
    "hellos_per_source",
    "readings_per_frame",
    "sensors_per_device",
    "devices",
    "device_rate",
];

/// Which limit was hit (an index into [`LIMITS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `max_connections`.
    Connections = 0,
    /// `max_connections_per_source`.
    ConnectionsPerSource = 1,
    /// `hellos_per_second_per_source`.
    HellosPerSource = 2,
    /// `max_readings_per_frame`.
    ReadingsPerFrame = 3,
    /// `max_sensors_per_device`.
    SensorsPerDevice = 4,
    /// `max_devices`.
    Devices = 5,
    /// `device_readings_per_second`.
    DeviceRate = 6,
}

/// Most source addresses tracked for Hello rates; past it, idle ones are forgotten.
const MAX_SOURCES: usize = 10_000;

/// A token bucket refilled at `rate` per second up to `rate` tokens.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The gateway-wide state of the limits.
pub struct Limits {
    /// Replaced whole by a reload (SIGHUP).
    config: std::sync::RwLock<Arc<LimitsConfig>>,
    hello_wait_max: Duration,
    metrics: Arc<Metrics>,
    connections: AtomicU32,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    hellos: Mutex<HashMap<IpAddr, Bucket>>,
    /// Devices in the store (refreshed from it by [`Limits::set_devices`]) plus new ones
    /// admitted since.
    devices: AtomicU64,
}

/// A device link's place under `max_connections`; given back when dropped.
pub struct ConnectionSlot {
    limits: Arc<Limits>,
    source: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.limits.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(addr) = self.source {
            let mut map = self
                .limits
                .per_source
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&addr) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&addr);
                }
            }
        }
    }
}

impl Limits {
    /// Limits from `config`; a Hello waits at most `hello_wait_max` for its turn.
    pub fn new(config: LimitsConfig, hello_wait_max: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            config: std::sync::RwLock::new(Arc::new(config)),
            hello_wait_max,
            metrics,
            connections: AtomicU32::new(0),
            per_source: Mutex::new(HashMap::new()),
            hellos: Mutex::new(HashMap::new()),
            devices: AtomicU64::new(0),
        }
    }

    /// The settings now.
    pub fn config(&self) -> Arc<LimitsConfig> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// New settings (a reload). Links already open keep their places; the new limits apply
    /// to what comes next (a new link, a Hello, a frame).
    pub fn set_config(&self, config: LimitsConfig) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// Counts a hit of `limit`.
    pub fn hit(&self, limit: Limit) {
        self.metrics.limits_hit[limit as usize].inc();
    }

    /// Admits a new link from `source` (`None`: not a network link), or says which limit
    /// it is over.
    pub fn connect(self: &Arc<Self>, source: Option<IpAddr>) -> Result<ConnectionSlot, String> {
        let config = self.config();
        let open = self.connections.fetch_add(1, Ordering::Relaxed);
        // From here on the slot gives the count back, whatever happens.
        let mut slot = ConnectionSlot {
            limits: self.clone(),
            source: None,
        };
        if open >= config.max_connections {
            self.hit(Limit::Connections);
            return Err(format!(
                "the gateway has {open} links open (limits.max_connections = {})",
                config.max_connections
            ));
        }
        if let Some(addr) = source {
            let max = config.max_connections_per_source;
            let mut map = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
            let n = map.entry(addr).or_insert(0);
            if max > 0 && *n >= max {
                let n = *n;
                drop(map);
                self.hit(Limit::ConnectionsPerSource);
                return Err(format!(
                    "{n} links are open from {addr} (limits.max_connections_per_source = {max})"
                ));
            }
            *n += 1;
            slot.source = Some(addr);
        }
        Ok(slot)
    }

    /// How long a Hello from `source` must wait for its turn under
    /// `hellos_per_second_per_source` (zero: at once), or why it is refused.
    pub fn hello(&self, source: Option<IpAddr>, now: Instant) -> Result<Duration, String> {
        let config = self.config();
        let rate = f64::from(config.hellos_per_second_per_source);
        let Some(addr) = source.filter(|_| rate > 0.0) else {
            return Ok(Duration::ZERO);
        };
        let mut map = self.hellos.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_SOURCES && !map.contains_key(&addr) {
            // Forget the sources whose bucket is full again (idle for a second or more).
            map.retain(|_, b| now.saturating_duration_since(b.at).as_secs_f64() * rate < rate);
        }
        let b = map.entry(addr).or_insert(Bucket {
            tokens: rate,
            at: now,
        });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(rate);
        b.at = now;
        let wait = Duration::from_secs_f64(((1.0 - b.tokens) / rate).max(0.0));
        if wait > self.hello_wait_max {
            drop(map);
            self.hit(Limit::HellosPerSource);
            return Err(format!(
                "too many Hellos from {addr} (limits.hellos_per_second_per_source = {})",
                config.hellos_per_second_per_source
            ));
        }
        b.tokens -= 1.0;
        if !wait.is_zero() {
            drop(map);
            self.hit(Limit::HellosPerSource);
        }
        Ok(wait)
    }

    /// The devices the store holds now (at start, and now and then after).
    pub fn set_devices(&self, n: u64) {
        self.devices.store(n, Ordering::Relaxed);
    }

    /// A device the store does not know said Hello: admits it under `max_devices`.
    pub fn new_device(&self, device: &str) -> Result<(), String> {
        let max = self.config().max_devices;
        let taken = self
            .devices
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Ok(()),
            Err(n) => {
                self.hit(Limit::Devices);
                Err(format!(
                    "the store already has {n} devices; new device {device:?} refused (limits.max_devices = {max})"
                ))
            }
        }
    }
}

/// One device link's readings/s budget (`device_readings_per_second`): a token bucket
/// holding one second's worth.
#[derive(Debug)]
pub struct RateGate {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl RateGate {
    /// A gate for `rate` readings/s (`None` when the limit is off).
    pub fn new(rate: u32, now: Instant) -> Option<Self> {
        (rate > 0).then(|| Self {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        })
    }

    /// `readings` arrived at `now`: how long to stop reading the link before the next
    /// frame (zero: go on).
    pub fn take(&mut self, readings: u64, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.rate) - readings as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: LimitsConfig) -> Arc<Limits> {
        Arc::new(Limits::new(
            config,
            Duration::from_secs(1),
            Arc::new(Metrics::default()),
        ))
    }

    #[test]
    fn connection_slots_are_given_back_when_links_end() {
        let l = limits(LimitsConfig {
            max_connections: 3,
            max_connections_per_source: 2,
            ..LimitsConfig::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.connect(Some(a)).unwrap();
        let _a2 = l.connect(Some(a)).unwrap();
        let err = l.connect(Some(a)).err().unwrap();
        assert!(err.contains("max_connections_per_source"), "{err}");
        let _b1 = l.connect(Some(b)).unwrap();
        let err = l.connect(Some(b)).err().unwrap();
        assert!(err.contains("limits.max_connections ="), "{err}");
        drop(a1);
        assert!(l.connect(Some(b)).is_ok());
        assert_eq!(l.metrics.limits_hit[Limit::Connections as usize].get(), 1);
        assert_eq!(
            l.metrics.limits_hit[Limit::ConnectionsPerSource as usize].get(),
            1
        );
    }

    #[test]
    fn hellos_past_the_rate_wait_their_turn_and_then_are_refused() {
        let l = limits(LimitsConfig {
            hellos_per_second_per_source: 10,
            ..LimitsConfig::default()
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t = Instant::now();
        // A second's worth at once, then each waits longer, up to the 1 s cap.
        for _ in 0..10 {
            assert_eq!(l.hello(Some(a), t).unwrap(), Duration::ZERO);
        }
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            let wait = l.hello(Some(a), t).unwrap();
            assert!(wait > last, "{wait:?} after {last:?}");
            last = wait;
        }
        assert!(l.hello(Some(a), t).is_err());
        // Another address is not held back; a second later the first has room again.
        assert_eq!(
            l.hello(Some("10.0.0.2".parse().unwrap()), t).unwrap(),
            Duration::ZERO
        );
        assert_eq!(
            l.hello(Some(a), t + Duration::from_secs(3)).unwrap(),
            Duration::ZERO
        );
    }

    #[test]
    fn new_devices_past_the_limit_are_refused() {
        let l = limits(LimitsConfig {
            max_devices: 3,
            ..LimitsConfig::default()
        });
        l.set_devices(2);
        assert!(l.new_device("d3").is_ok());
        let err = l.new_device("d4").unwrap_err();
        assert!(
            err.contains("limits.max_devices = 3") && err.contains("d4"),
            "{err}"
        );
    }

    #[test]
    fn a_device_over_its_rate_is_held_for_its_excess() {
        let t = Instant::now();
        let mut g = RateGate::new(1000, t).unwrap();
        assert_eq!(g.take(1000, t), Duration::ZERO);
        assert_eq!(g.take(500, t), Duration::from_millis(500));
        // Half a second later it has paid that back, and no more.
        assert_eq!(g.take(0, t + Duration::from_millis(500)), Duration::ZERO);
        assert!(RateGate::new(0, t).is_none());
    }
}
