//! What a fleet run measured: shared counters updated by every device ([`FleetStats`]) and
//! the final [`Report`], printed as a table or as one JSON object.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use crate::device::DeviceOutcome;
pub use crate::stats::FleetStats;

/// Ack latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest seen.
    pub max_ms: f64,
}

/// The outcome of a fleet run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Devices in the fleet.
    pub devices: usize,
    /// Wall time of the run, drain included, in seconds.
    pub elapsed_s: f64,
    /// Distinct frames created and sent at least once.
    pub frames_sent: u64,
    /// Distinct frames acknowledged (each once, however often it was resent).
    pub frames_acked: u64,
    /// Readings in the acknowledged frames: what the store must hold.
    pub readings_acked: u64,
    /// Readings the devices' sensors took (acked, dropped at the device, or still
    /// unacknowledged at the end).
    pub readings_produced: u64,
    /// Readings dropped at the devices: older samples that did not fit a frame while a
    /// device was paced or offline (a device's bounded buffer, not the gateway's loss).
    pub readings_dropped: u64,
    /// Readings in frames unacknowledged at the end, or forgotten at a reboot.
    pub readings_unacked: u64,
    /// Frame resends after reconnects.
    pub frames_resent: u64,
    /// Connections made after a device's first.
    pub reconnects: u64,
    /// `ConfigUpdate`s (pacing) received from the gateway, by all devices.
    pub config_updates: u64,
    /// Frames still unacknowledged when the drain period ended.
    pub unacked_frames: u64,
    /// Devices the gateway refused for good (bad or revoked token).
    pub devices_refused: u64,
    /// Reboots (reboot faults): each starts a new epoch.
    pub reboots: u64,
    /// Unacknowledged frames devices forgot when they rebooted (the device's loss, by design
    /// of the fault, not the gateway's).
    pub frames_lost_in_reboot: u64,
    /// Anomalies labelled in sensor values.
    pub anomalies: u64,
    /// Distinct commands received.
    pub commands_received: u64,
    /// Repeated deliveries of commands already received.
    pub commands_repeated: u64,
    /// Command results acknowledged by the gateway.
    pub results_acked: u64,
    /// Error frames received, by code name.
    pub errors: BTreeMap<String, u64>,
    /// Ack latency of acknowledged frames.
    pub ack_latency: Latency,
    /// Acknowledged readings per second of the producing period.
    pub readings_per_s: f64,
    /// Per-device outcomes (not printed).
    #[serde(skip)]
    pub outcomes: Vec<DeviceOutcome>,
}

impl Report {
    /// Builds the report from the devices' outcomes.
    pub fn new(
        stats: &FleetStats,
        outcomes: Vec<DeviceOutcome>,
        elapsed: Duration,
        producing: Duration,
    ) -> Self {
        let h = stats.latency_us.lock().unwrap_or_else(|e| e.into_inner());
        let ms = |us: u64| us as f64 / 1000.0;
        let ack_latency = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50_ms: ms(h.value_at_quantile(0.50)),
                p99_ms: ms(h.value_at_quantile(0.99)),
                p999_ms: ms(h.value_at_quantile(0.999)),
                max_ms: ms(h.max()),
            }
        };
        let readings_acked = outcomes.iter().map(|o| o.readings_acked).sum();
        let devices = outcomes
            .iter()
            .map(|o| o.device_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        Self {
            devices,
            reboots: (outcomes.len() - devices) as u64,
            frames_lost_in_reboot: outcomes.iter().map(|o| o.lost_in_reboot).sum(),
            anomalies: outcomes.iter().map(|o| o.labels.len() as u64).sum(),
            elapsed_s: elapsed.as_secs_f64(),
            frames_sent: stats.frames_sent.load(Ordering::Relaxed),
            frames_acked: outcomes.iter().map(|o| o.frames_acked).sum(),
            readings_acked,
            readings_produced: outcomes.iter().map(|o| o.readings_produced).sum(),
            readings_dropped: outcomes.iter().map(|o| o.readings_dropped).sum(),
            readings_unacked: outcomes
                .iter()
                .map(|o| o.readings_unacked + o.readings_lost_in_reboot)
                .sum(),
            frames_resent: stats.frames_resent.load(Ordering::Relaxed),
            reconnects: stats.reconnects.load(Ordering::Relaxed),
            config_updates: stats.config_updates.load(Ordering::Relaxed),
            unacked_frames: outcomes.iter().map(|o| o.unacked).sum(),
            devices_refused: outcomes.iter().filter(|o| o.gave_up.is_some()).count() as u64,
            commands_received: outcomes
                .iter()
                .map(|o| o.commands_received.len() as u64)
                .sum(),
            commands_repeated: outcomes.iter().map(|o| o.commands_repeated).sum(),
            results_acked: outcomes.iter().map(|o| o.results_acked).sum(),
            errors: stats
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            ack_latency,
            readings_per_s: readings_acked as f64 / producing.as_secs_f64().max(1e-9),
            outcomes,
        }
    }

    /// Average readings per acknowledged frame.
    pub fn readings_per_frame(&self) -> f64 {
        self.readings_acked as f64 / self.frames_acked.max(1) as f64
    }

    /// Every anomaly label of the run, device by device.
    pub fn labels(&self) -> impl Iterator<Item = &crate::timeline::Label> {
        self.outcomes.iter().flat_map(|o| o.labels.iter())
    }

    /// Whether every reading the sensors took is accounted for: acknowledged, dropped at the
    /// device (counted), or in a frame still unacknowledged.
    pub fn readings_accounted(&self) -> bool {
        self.readings_produced
            == self.readings_acked + self.readings_dropped + self.readings_unacked
    }

    /// Whether every frame sent was acknowledged and no device was refused.
    pub fn is_clean(&self) -> bool {
        self.unacked_frames == 0 && self.devices_refused == 0
    }

    /// A human-readable summary.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| s.push_str(&format!("{k:<18} {v}\n"));
        row("devices", self.devices.to_string());
        row("elapsed", format!("{:.1} s", self.elapsed_s));
        row("frames sent", self.frames_sent.to_string());
        row("frames acked", self.frames_acked.to_string());
        row(
            "readings acked",
            format!("{} ({:.0}/s)", self.readings_acked, self.readings_per_s),
        );
        if self.readings_dropped > 0 || self.readings_produced != self.readings_acked {
            row(
                "readings produced",
                format!(
                    "{} ({} acked, {} dropped at the devices, {} unacked)",
                    self.readings_produced,
                    self.readings_acked,
                    self.readings_dropped,
                    self.readings_unacked
                ),
            );
        }
        row("frames resent", self.frames_resent.to_string());
        row("reconnects", self.reconnects.to_string());
        if self.config_updates > 0 {
            row(
                "pacing",
                format!("{} ConfigUpdates received", self.config_updates),
            );
        }
        row("unacked frames", self.unacked_frames.to_string());
        row("devices refused", self.devices_refused.to_string());
        if self.reboots > 0 {
            row(
                "reboots",
                format!(
                    "{} ({} unacked frames forgotten by the devices)",
                    self.reboots, self.frames_lost_in_reboot
                ),
            );
        }
        if self.anomalies > 0 {
            row("anomalies", self.anomalies.to_string());
        }
        row(
            "commands",
            format!(
                "{} received, {} repeats, {} results acked",
                self.commands_received, self.commands_repeated, self.results_acked
            ),
        );
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        row("errors", errors);
        row(
            "ack latency",
            format!(
                "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
                self.ack_latency.p50_ms,
                self.ack_latency.p99_ms,
                self.ack_latency.p999_ms,
                self.ack_latency.max_ms
            ),
        );
        s
    }
}

/// A live line on the terminal (stderr) while a run goes: elapsed time, frames sent and
/// acknowledged, reconnects and errors. Abort the task to stop it.
pub fn progress(stats: std::sync::Arc<FleetStats>) -> tokio::task::JoinHandle<()> {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let errors: u64 = stats
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .sum();
            bar.set_message(format!(
                "{} frames sent, {} acked, {} resent, {} connected, {} reconnects, {} errors",
                stats.frames_sent.load(Ordering::Relaxed),
                stats.frames_acked.load(Ordering::Relaxed),
                stats.frames_resent.load(Ordering::Relaxed),
                stats.hello_acks.load(Ordering::Relaxed),
                stats.reconnects.load(Ordering::Relaxed),
                errors
            ));
            bar.tick();
        }
    })
}
