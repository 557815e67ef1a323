//! A fleet: N devices with the same behaviour, started over a ramp so a large fleet does not
//! open every connection in the same millisecond, stopped by time, drained, and reported.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::device::{CommandBehaviour, Device, DeviceSpec, Faults, Timing};
use crate::report::Report;
use crate::stats::FleetStats;

/// Readings a frame carries at most by default: about 35 KiB of protobuf with the built-in
/// sensor names, well under the gateway's default 64 KiB frame limit.
pub const DEFAULT_MAX_FRAME_READINGS: usize = 1024;

/// How to run a fleet.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The gateway's device listener, `HOST:PORT`.
    pub gateway: String,
    /// Number of devices.
    pub devices: usize,
    /// Frames per second per device; 0 sends as fast as the window allows.
    pub rate: f64,
    /// Readings per frame.
    pub readings: usize,
    /// How long devices produce new frames.
    pub duration: Duration,
    /// After `duration`, how long to wait for outstanding acks.
    pub drain: Duration,
    /// Most unacknowledged frames per device.
    pub window: usize,
    /// Derive each device's token from this fleet secret.
    pub fleet_secret: Option<String>,
    /// Or present this token (for a provisioned device, or a gateway with auth off).
    pub token: Option<String>,
    /// Device ids are this prefix followed by a 5-digit index.
    pub prefix: String,
    /// Epoch of every device; default: the start time in milliseconds.
    pub epoch: Option<u64>,
    /// Devices start spread over this period.
    pub ramp: Duration,
    /// Devices ping after this long without sending.
    pub keepalive: Duration,
    /// Faults every device commits.
    pub faults: Faults,
    /// How devices answer commands.
    pub commands: CommandBehaviour,
    /// Play one device per serial port instead of a TCP fleet (`gateway` and `devices` are
    /// then unused).
    pub serial: Vec<crate::serial::SerialTarget>,
    /// Makes the run deterministic: device `i` is seeded with a value derived from this and
    /// `i`, and the default epoch is derived from it too.
    pub seed: Option<u64>,
    /// Sensors and waveforms (from a scenario profile); `None`: `readings` built-in sensors.
    pub sensors: Option<Arc<Vec<crate::sensor::SensorSpec>>>,
    /// Share of the report period by which each interval varies (0 to 1).
    pub jitter: f64,
    /// Readings per sensor per frame (with `sensors`).
    pub samples: usize,
    /// Most readings in one frame: a paced device batches its samples up to this and drops
    /// older ones beyond it (counted as `readings_dropped`).
    pub max_frame_readings: usize,
    /// Seeded devices: device-clock time per wall-clock time (see `DeviceSpec`).
    pub time_scale: f64,
    /// Faults and anomalies, with the devices they picked.
    pub timeline: Option<Arc<crate::timeline::ProfileTimeline>>,
    /// Time zero of the run (fault times count from it); default: when the fleet starts.
    pub origin: Option<Instant>,
    /// Record what every TCP device sends (`--record`).
    pub recorder: Option<Arc<crate::record::Recorder>>,
    /// Connect with TLS (`--tls-ca`); `None`: plain TCP.
    pub tls: Option<crate::tls::TlsClient>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            gateway: "127.0.0.1:7700".into(),
            devices: 10,
            rate: 1.0,
            readings: 8,
            duration: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            window: 256,
            fleet_secret: None,
            token: None,
            prefix: "sim-".into(),
            epoch: None,
            ramp: Duration::from_millis(500),
            keepalive: Duration::from_secs(20),
            faults: Faults::default(),
            commands: CommandBehaviour::default(),
            serial: Vec::new(),
            seed: None,
            sensors: None,
            jitter: 0.0,
            samples: 1,
            max_frame_readings: DEFAULT_MAX_FRAME_READINGS,
            time_scale: 1.0,
            timeline: None,
            origin: None,
            recorder: None,
            tls: None,
        }
    }
}

impl FleetConfig {
    /// The id of device `i`.
    pub fn device_id(&self, i: usize) -> String {
        format!("{}{i:05}", self.prefix)
    }

    fn token_for(&self, device_id: &str) -> String {
        match (&self.fleet_secret, &self.token) {
            (Some(secret), _) => proto::token::fleet_token(secret.as_bytes(), device_id),
            (None, Some(token)) => token.clone(),
            (None, None) => String::new(),
        }
    }
}

/// Runs the fleet to the end of its drain period and reports.
pub async fn run_fleet(config: FleetConfig) -> Report {
    run_fleet_with(config, Arc::new(FleetStats::default())).await
}

/// [`run_fleet`], updating `stats` as it goes so a caller can watch the run.
pub async fn run_fleet_with(config: FleetConfig, stats: Arc<FleetStats>) -> Report {
    let start = config.origin.unwrap_or_else(Instant::now);
    let epoch = config
        .epoch
        .or(config.seed.map(|s| s.wrapping_add(1)))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(1)
        });
    let ramp = config.ramp.min(config.duration);
    let stop_at = start + ramp + config.duration;
    let drain_until = stop_at + config.drain;
    let mut devices = JoinSet::new();
    let count = if config.serial.is_empty() {
        config.devices
    } else {
        config.serial.len()
    };
    let offsets: Vec<f64> = {
        let mut rng = rand::rng();
        (0..count).map(|_| rng.random_range(0.0..1.0)).collect()
    };
    for (i, offset) in offsets.into_iter().enumerate() {
        let id = config.device_id(i);
        let (schedule, anomalies) = config
            .timeline
            .as_ref()
            .map(|t| t.for_device(i))
            .unwrap_or_default();
        let spec = DeviceSpec {
            token: config.token_for(&id),
            id,
            epoch,
            readings: config.readings,
            rate: config.rate,
            window: config.window.max(1),
            keepalive: config.keepalive,
            faults: config.faults,
            commands: config.commands,
            // SplitMix-style spread so neighbouring devices get unrelated streams.
            seed: config
                .seed
                .map(|s| s ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            sensors: config.sensors.clone(),
            jitter: config.jitter,
            samples: config.samples,
            max_frame_readings: config.max_frame_readings.max(1),
            time_scale: config.time_scale,
            schedule,
            anomalies,
            recorder: config.recorder.clone(),
            tls: config.tls.clone(),
        };
        let offset = if ramp.is_zero() {
            Duration::ZERO
        } else {
            ramp.mul_f64(offset)
        };
        let timing = Timing {
            origin: start,
            start_at: start + offset,
            stop_at,
            drain_until,
        };
        let gateway = config.gateway.clone();
        let device = Device::new(spec, stats.clone());
        match config.serial.get(i).cloned() {
            Some(port) => {
                devices.spawn(async move {
                    device
                        .run_serial(&port.path, port.baud, port.noise, timing)
                        .await
                });
            }
            None => {
                devices.spawn(async move { device.run(&gateway, timing).await });
            }
        }
    }
    let mut outcomes = Vec::with_capacity(count);
    while let Some(done) = devices.join_next().await {
        match done {
            Ok(epochs) => outcomes.extend(epochs),
            Err(e) => tracing::error!(error = %e, "a simulated device task failed"),
        }
    }
    outcomes.sort_by(|a, b| (&a.device_id, a.epoch).cmp(&(&b.device_id, b.epoch)));
    Report::new(&stats, outcomes, start.elapsed(), ramp + config.duration)
}
