//! `firmware-sim chaos`: a fleet driven through the real gateway binary and a real Mosquitto
//! while faults strike at random instants, then a check that every acknowledged reading is
//! stored exactly once and was published at least once.
//!
//! Faults, each at its own random rhythm (intervals drawn uniformly between 0.2 and 1.8
//! times the mean, from a seed the report prints):
//! - the gateway is SIGKILLed and started again on the same port and store;
//! - the broker is stopped (SIGTERM: a persistent broker saves its sessions) and started
//!   again after 1 to 5 s;
//! - device faults, through the devices' own timeline: half the fleet dropping at once
//!   (storm), garbage frames, oversize frames, wrong tokens, slow readers, one device
//!   flooding with a burst;
//! - strangers: connections from outside the fleet that send garbage or guess a fleet
//!   device's token.
//!
//! Traffic goes only to 127.0.0.1; the run is bounded by `duration` plus the drain and the
//! checks, and stops by itself.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::{BufMut, BytesMut};
use futures::StreamExt;
use proto::v1::{device_message::Body, gateway_message, DeviceMessage, GatewayMessage, Hello};
use proto::DelimitedCodec;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_util::codec::FramedRead;

use crate::bench::procs::{free_port, Gateway, Mosquitto};
use crate::timeline::{pick, Action, ProfileTimeline};
use crate::verify::{MqttVerification, MqttWatch, Verification};
use crate::{FleetConfig, Report};

/// The fleet secret the chaos gateway and its devices share.
const FLEET_SECRET: &str = "chaos-fleet-secret-0123456789abcdef";

/// How a chaos run goes.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The gateway binary.
    pub gateway_bin: PathBuf,
    /// How long faults strike and devices produce.
    pub duration: Duration,
    /// Devices in the fleet.
    pub devices: usize,
    /// Frames per second per device.
    pub rate: f64,
    /// Readings per frame.
    pub readings: usize,
    /// Mean time between SIGKILLs of the gateway.
    pub kill_every: Duration,
    /// Mean time between broker stops.
    pub broker_every: Duration,
    /// Mean time between device faults (storm, garbage, oversize, wrong token, slow
    /// reader, flood).
    pub device_fault_every: Duration,
    /// Mean time between strangers (garbage or token guessing from outside the fleet).
    pub stranger_every: Duration,
    /// Seeds every random choice of the schedule; `None`: drawn, and printed.
    pub seed: Option<u64>,
    /// Keep the store, logs and broker files here; `None`: a temporary directory.
    pub dir: Option<PathBuf>,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        Self {
            gateway_bin: PathBuf::from("target/release/gateway"),
            duration: Duration::from_secs(60),
            devices: 50,
            rate: 5.0,
            readings: 8,
            kill_every: Duration::from_secs(12),
            broker_every: Duration::from_secs(40),
            device_fault_every: Duration::from_secs(5),
            stranger_every: Duration::from_secs(3),
            seed: None,
            dir: None,
        }
    }
}

/// What a chaos run did and found.
#[derive(Debug, Clone, Serialize)]
pub struct ChaosReport {
    /// The seed of the schedule.
    pub seed: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Times the gateway exited without being killed (a crash of its own).
    pub gateway_exits: u64,
    /// Strangers, by what the gateway answered (an error code name, or "no answer").
    pub strangers: BTreeMap<String, u64>,
    /// What the fleet saw (its per-device outcomes are not printed).
    pub fleet: Report,
    /// Every acknowledged frame in the store exactly once?
    pub store: Verification,
    /// Every acknowledged frame published at least once?
    pub mqtt: MqttVerification,
    /// Whether the gateway stopped cleanly on SIGTERM at the end.
    pub clean_stop: bool,
}

impl ChaosReport {
    /// No loss, no duplicate, nothing unpublished, nothing left unacknowledged, no crash of
    /// the gateway's own, and a clean stop.
    pub fn is_clean(&self) -> bool {
        self.store.is_clean()
            && self.mqtt.is_clean()
            && self.fleet.is_clean()
            && self.gateway_exits == 0
            && self.clean_stop
    }

    /// A human-readable summary.
    pub fn to_table(&self) -> String {
        let mut s = format!("seed               {}\n", self.seed);
        s.push_str("faults injected\n");
        for (kind, n) in &self.faults {
            s.push_str(&format!("  {kind:<30} {n}\n"));
        }
        s.push_str("strangers answered\n");
        for (answer, n) in &self.strangers {
            s.push_str(&format!("  {answer:<30} {n}\n"));
        }
        s.push_str(&format!(
            "gateway exits      {} of its own; clean stop at the end: {}\n",
            self.gateway_exits, self.clean_stop
        ));
        s.push_str(&self.fleet.to_table());
        s.push_str(&format!(
            "store check        {} acked frames: {} missing, {} duplicated\n",
            self.store.frames_checked, self.store.frames_missing, self.store.frames_duplicated
        ));
        s.push_str(&format!(
            "mqtt check         {} acked frames: {} never published ({} published more than once, allowed)\n",
            self.mqtt.frames_checked, self.mqtt.frames_missing, self.mqtt.frames_repeated
        ));
        for e in self.store.examples.iter().chain(&self.mqtt.examples) {
            s.push_str(&format!("  e.g. {e}\n"));
        }
        s.push_str(if self.is_clean() {
            "result             clean\n"
        } else {
            "result             NOT CLEAN\n"
        });
        s
    }
}

/// The gateway under test, restarted on the same address and store after each kill.
struct Target {
    bin: PathBuf,
    dir: PathBuf,
    listen: String,
    mqtt: String,
    gateway: Option<Gateway>,
}

impl Target {
    async fn start(&mut self) -> anyhow::Result<()> {
        let base = [
            "--listen",
            self.listen.as_str(),
            "--auth",
            "token",
            "--fleet-secret",
            FLEET_SECRET,
            "--gateway-id",
            "chaos",
        ];
        let args = ["--mqtt".to_owned(), self.mqtt.clone()];
        // Right after a kill the port can still be held for a moment: try a few times.
        let mut last = None;
        for _ in 0..10 {
            match Gateway::launch(&self.bin, &self.dir, &base, &args).await {
                Ok(gw) => {
                    self.gateway = Some(gw);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the gateway did not start")))
    }

    /// Whether it exited by itself since the last look.
    fn exited(&mut self) -> bool {
        match self.gateway.as_mut().and_then(Gateway::exited) {
            Some(status) => {
                tracing::error!(%status, "chaos: the gateway exited by itself");
                self.gateway = None;
                true
            }
            None => false,
        }
    }
}

/// A random instant between 0.2 and 1.8 times `mean` after `from`.
fn next_after(rng: &mut StdRng, from: Instant, mean: Duration) -> Instant {
    from + mean.mul_f64(rng.random_range(0.2..1.8))
}

/// The device faults of the run: one every `every` on average, of a kind drawn at random,
/// each hitting the devices its kind picks. Counted by kind.
fn device_faults(
    rng: &mut StdRng,
    options: &ChaosOptions,
    ramp: Duration,
    faults: &mut BTreeMap<&'static str, u64>,
) -> ProfileTimeline {
    let mut timeline = ProfileTimeline::default();
    let n = options.devices;
    let mut at = ramp
        + options
            .device_fault_every
            .mul_f64(rng.random_range(0.2..1.8));
    // Leave the last seconds fault-free so devices end on a working link.
    let last = ramp + options.duration.saturating_sub(Duration::from_secs(2));
    while at < last {
        let seed = rng.next_u64();
        let (name, action, share) = match rng.random_range(0..6) {
            0 => (
                "storm (half the fleet drops)",
                Action::Storm(Duration::from_millis(rng.random_range(0..2000))),
                0.5,
            ),
            1 => ("garbage frame", Action::Corrupt, 0.1),
            2 => ("oversize frame", Action::Oversize, 0.1),
            3 => ("wrong token", Action::WrongToken, 0.1),
            4 => (
                "slow reader",
                Action::SlowReader(Duration::from_millis(rng.random_range(1000..5000))),
                0.1,
            ),
            _ => ("flood (one device)", Action::Burst(2000), 1.0 / n as f64),
        };
        let picked = pick(n, share, Some(seed));
        if picked.iter().any(|p| *p) {
            *faults.entry(name).or_default() += 1;
            timeline.faults.push((at, action, picked));
        }
        at += options
            .device_fault_every
            .mul_f64(rng.random_range(0.2..1.8));
    }
    timeline
}

/// A connection from outside the fleet: garbage, or a Hello guessing a fleet device's token.
/// Returns the code the gateway answered with, or "no answer".
async fn stranger(addr: String, garbage: bool, device_id: String, noise: u64) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(&addr).await else {
        return "not connected (gateway down)".into();
    };
    let mut out = BytesMut::new();
    if garbage {
        // A plausible length, then bytes that are no DeviceMessage.
        let mut rng = StdRng::seed_from_u64(noise);
        out.put_u8(32);
        for _ in 0..32 {
            out.put_u8(rng.random_range(0x80..=0xff));
        }
    } else {
        out = BytesMut::from(
            &crate::device::encode(&DeviceMessage {
                seq: 0,
                body: Some(Body::Hello(Hello {
                    device_id,
                    token: format!("guess-{noise:016x}"),
                    firmware_version: "stranger".into(),
                    epoch: 1,
                })),
            })[..],
        );
    }
    if stream.write_all(&out).await.is_err() {
        return "closed before reading".into();
    }
    let mut reader = FramedRead::new(stream, DelimitedCodec::<GatewayMessage>::default());
    match tokio::time::timeout(Duration::from_secs(15), reader.next()).await {
        Ok(Some(Ok(GatewayMessage {
            body: Some(gateway_message::Body::Error(e)),
        }))) => proto::v1::ErrorCode::try_from(e.code)
            .map(|c| c.as_str_name().to_owned())
            .unwrap_or_else(|_| format!("code {}", e.code)),
        Ok(Some(Ok(_))) => "accepted (!)".into(),
        Ok(_) => "closed without an error".into(),
        Err(_) => "no answer".into(),
    }
}

/// Runs the chaos soak (faults are logged at `info` as they strike).
pub async fn run(options: &ChaosOptions) -> anyhow::Result<ChaosReport> {
    anyhow::ensure!(
        options.gateway_bin.exists(),
        "{} not found: build it with `cargo build --release --workspace` or pass --gateway-bin",
        options.gateway_bin.display()
    );
    let temp;
    let dir = match &options.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_owned()
        }
    };
    let seed = options.seed.unwrap_or_else(|| rand::rng().next_u64());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();

    let broker_port = free_port()?;
    let mut broker = Some(Mosquitto::start_with(&dir, broker_port, true).await?);
    let mqtt = format!("mqtt://127.0.0.1:{broker_port}");
    let watch = MqttWatch::start_with(&mqtt, "#", true).await?;
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut target = Target {
        bin: options.gateway_bin.clone(),
        dir: dir.clone(),
        listen: listen.clone(),
        mqtt: mqtt.clone(),
        gateway: None,
    };
    target.start().await?;

    let origin = Instant::now();
    let ramp = Duration::from_secs(1).min(options.duration);
    let timeline = device_faults(&mut rng, options, ramp, &mut faults);
    let config = FleetConfig {
        gateway: listen.clone(),
        devices: options.devices.max(1),
        rate: options.rate,
        readings: options.readings.max(1),
        duration: options.duration,
        drain: Duration::from_secs(60),
        fleet_secret: Some(FLEET_SECRET.into()),
        prefix: "chaos-".into(),
        ramp,
        timeline: Some(Arc::new(timeline)),
        origin: Some(origin),
        ..FleetConfig::default()
    };
    let ids: Vec<String> = (0..config.devices).map(|i| config.device_id(i)).collect();
    let fleet = tokio::spawn(crate::run_fleet(config));

    let end = origin + ramp + options.duration;
    let mut gateway_exits = 0;
    let mut strangers = JoinSet::new();
    let mut next_kill = next_after(&mut rng, origin + ramp, options.kill_every);
    let mut next_broker = next_after(&mut rng, origin + ramp, options.broker_every);
    let mut next_stranger = next_after(&mut rng, origin + ramp, options.stranger_every);
    loop {
        let next = next_kill.min(next_broker).min(next_stranger);
        if next >= end {
            break;
        }
        sleep_until(next).await;
        if target.exited() {
            gateway_exits += 1;
            target.start().await?;
        }
        if next == next_kill {
            if let Some(gw) = target.gateway.take() {
                gw.kill().await;
            }
            *faults.entry("gateway SIGKILL + restart").or_default() += 1;
            tracing::info!("chaos: gateway killed");
            target.start().await?;
            next_kill = next_after(&mut rng, Instant::now(), options.kill_every);
        } else if next == next_broker {
            if let Some(b) = broker.take() {
                b.stop_gracefully().await;
            }
            *faults.entry("broker stop + start").or_default() += 1;
            let down = Duration::from_millis(rng.random_range(1000..5000));
            tracing::info!(?down, "chaos: broker stopped");
            tokio::time::sleep(down).await;
            broker = Some(Mosquitto::start_with(&dir, broker_port, true).await?);
            next_broker = next_after(&mut rng, Instant::now(), options.broker_every);
        } else {
            let garbage = rng.random_bool(0.5);
            let id = ids[rng.random_range(0..ids.len())].clone();
            *faults
                .entry(if garbage {
                    "stranger sending garbage"
                } else {
                    "stranger guessing a token"
                })
                .or_default() += 1;
            strangers.spawn(stranger(listen.clone(), garbage, id, rng.next_u64()));
            next_stranger = next_after(&mut rng, Instant::now(), options.stranger_every);
        }
    }

    // Faults are over: the fleet drains against a gateway and broker that stay up.
    let report = loop {
        if fleet.is_finished() {
            break fleet.await.context("the fleet task failed")?;
        }
        if target.exited() {
            gateway_exits += 1;
            target.start().await?;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut answers: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(answer) = strangers.join_next().await {
        *answers
            .entry(answer.unwrap_or_else(|e| format!("task failed: {e}")))
            .or_default() += 1;
    }
    let store =
        crate::verify::verify_db(&dir.join("gateway.db"), &report).context("checking the store")?;
    let mqtt_check = watch.verify(&report, Duration::from_secs(60)).await;
    drop(watch);
    if target.exited() {
        gateway_exits += 1;
    }
    let clean_stop = match target.gateway.take() {
        Some(gw) => match gw.stop().await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "chaos: the gateway did not stop cleanly");
                false
            }
        },
        None => false,
    };
    if let Some(b) = broker {
        b.stop_gracefully().await;
    }
    Ok(ChaosReport {
        seed,
        faults,
        gateway_exits,
        strangers: answers,
        fleet: report,
        store,
        mqtt: mqtt_check,
        clean_stop,
    })
}
