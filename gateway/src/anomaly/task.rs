//! The detector task: the one owner of every series', device's and address's detection
//! state. It reads committed batches and status changes from the live hub, bursts of failed
//! links from the [`super::traffic::Guard`], and its own timer for live dropouts; it hands
//! each finding, with an id, to the store writer (which writes the `anomalies` table and the
//! MQTT outbox, then shows it on the live feed).
//!
//! It never holds the writer back: the hub drops batches for it when it falls behind (counted
//! in `gateway_anomaly_skipped_batches_total`), and findings go to the writer with
//! `try_send` (a full queue drops and counts). After a restart, a device's series first warm
//! up on their latest readings in the store, so a restart raises no burst of false alarms.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::SqlitePool;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::cadence::Cadence;
use super::config::AnomalyConfig;
use super::series::{Seen, Series, Tuning};
use super::traffic::{Burst, FrameRate};
use super::Finding;
use crate::live::{Batch, LiveEvent};
use crate::metrics::{Metrics, Throttle};
use crate::payload::{self, Anomaly};
use crate::store::writer::{AnomalySender, FrameBody};

/// How long past a live-dropout deadline the detector waits for any data at all before it
/// believes the silence: a stalled commit delays every device, and is not a dropout.
const STALL_GRACE_MS: i64 = 2_000;

/// One device's state.
#[derive(Default)]
struct DeviceState {
    /// (sensor name, its series, index of its tuning); devices have few sensors, so a
    /// linear scan beats hashing each reading's name.
    sensors: Vec<(Box<str>, Series, u16)>,
    cadence: Cadence,
    rate: FrameRate,
    /// Whether it has an entry in the deadline heap.
    scheduled: bool,
    /// Anomalies under way, to be written again when they end.
    open: Vec<Arc<Anomaly>>,
}

/// The tunings series use and how many series there are, over all devices.
struct SeriesIndex {
    /// Distinct tunings (one per matching `[[anomaly.sensor]]`, and the default).
    tunings: Vec<Tuning>,
    /// Series tracked (bounded by `anomaly.max_series`).
    series: usize,
}

impl SeriesIndex {
    /// The index of `sensor` in `dev`'s series, created if new (`None` past `max_series`).
    fn slot(
        &mut self,
        config: &AnomalyConfig,
        dev: &mut DeviceState,
        sensor: &str,
    ) -> Option<usize> {
        if let Some(i) = dev.sensors.iter().position(|(n, _, _)| &**n == sensor) {
            return Some(i);
        }
        if self.series >= config.max_series {
            return None;
        }
        let tuning = config.tuning(sensor);
        let index = match self.tunings.iter().position(|t| *t == tuning) {
            Some(i) => i,
            None => {
                self.tunings.push(tuning);
                self.tunings.len() - 1
            }
        };
        self.series += 1;
        if dev.sensors.is_empty() {
            // Room for exactly one: a Vec's first push would make room for four series
            // (about 1 KB), and many devices have a single sensor.
            dev.sensors.reserve_exact(1);
        }
        dev.sensors.push((
            sensor.into(),
            Series::default(),
            u16::try_from(index).unwrap_or(0),
        ));
        Some(dev.sensors.len() - 1)
    }
}

/// The detector (see the module docs).
pub struct Detector {
    config: AnomalyConfig,
    /// Tunings and the count of series, shared by every device.
    index: SeriesIndex,
    devices: HashMap<Arc<str>, DeviceState>,
    next_id: i64,
    sink: AnomalySender,
    metrics: Arc<Metrics>,
    pool: SqlitePool,
    /// Reused buffer of one reading's findings.
    out: Vec<Finding>,
    /// Live-dropout checks: (when, device), earliest first.
    deadlines: BinaryHeap<Reverse<(i64, Arc<str>)>>,
    /// Receive time of the newest frame seen (the gateway is delivering data until then).
    progress_ms: i64,
    /// One INFO line per kind per minute; the rest are counted in it.
    log: [Throttle; 6],
}

impl Detector {
    /// A detector numbering its anomalies after the highest id in the store.
    pub async fn new(
        config: AnomalyConfig,
        pool: SqlitePool,
        sink: AnomalySender,
        metrics: Arc<Metrics>,
    ) -> Result<Self, sqlx::Error> {
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM anomaly_log")
            .fetch_one(&pool)
            .await?;
        Ok(Self {
            index: SeriesIndex {
                tunings: vec![config.tuning("")],
                series: 0,
            },
            config,
            devices: HashMap::new(),
            next_id: last.unwrap_or(0) + 1,
            sink,
            metrics,
            pool,
            out: Vec::new(),
            deadlines: BinaryHeap::new(),
            progress_ms: 0,
            log: Default::default(),
        })
    }

    /// Runs until `shutdown` or until the hub closes.
    pub async fn run(
        mut self,
        mut live: broadcast::Receiver<LiveEvent>,
        mut bursts: mpsc::Receiver<Burst>,
        shutdown: CancellationToken,
    ) {
        loop {
            let next = self.deadlines.peek().map(|Reverse((at, _))| *at);
            let sleep = next.map_or(Duration::from_secs(3600), |at| {
                Duration::from_millis((at - crate::store::now_ms()).clamp(0, 3_600_000) as u64)
            });
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = live.recv() => match event {
                    Ok(LiveEvent::Frames(batch)) => {
                        self.batch(&batch).await;
                        // Data arrived: silences it proves real may be due now.
                        self.check_deadlines(crate::store::now_ms());
                    }
                    Ok(LiveEvent::Status(s)) if !s.online => self.disconnected(&s.device),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        self.metrics.anomaly_skipped_batches.inc_by(n);
                        self.resume_all();
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                Some(burst) = bursts.recv() => self.burst(&burst),
                _ = tokio::time::sleep(sleep), if next.is_some() => {
                    self.check_deadlines(crate::store::now_ms());
                }
            }
        }
        tracing::debug!("anomaly detector stopped");
    }

    /// Judges every reading of a committed batch.
    pub async fn batch(&mut self, batch: &Batch) {
        let started = Instant::now();
        let mut judged = 0u64;
        let mut skipped = 0u64;
        let factor = self.config.rhythm();
        let mut found: Vec<(Option<usize>, Finding)> = Vec::new();
        for frame in &batch.frames {
            let FrameBody::Telemetry(t) = &frame.body else {
                continue;
            };
            if t.readings.is_empty() {
                continue;
            }
            let received = frame.received_ms;
            self.progress_ms = self.progress_ms.max(received);
            let ts = |r: &proto::v1::Reading| payload::timestamp(r.timestamp_ms, received);
            let first = t.readings.iter().map(ts).min().unwrap_or(received);
            let last = t.readings.iter().map(ts).max().unwrap_or(received);
            if !self.devices.contains_key(&frame.device) {
                self.warm_up(&frame.device, first).await;
            }
            // One lookup of the device per frame; findings are turned into anomalies after
            // its readings (they are rare).
            let Some(dev) = self.devices.get_mut(&frame.device) else {
                continue;
            };
            dev.cadence
                .frame(first, last, received, factor, false, &mut self.out);
            if self.config.traffic_factor > 0.0 {
                let window = self.config.traffic_window.as_millis() as i64;
                dev.rate
                    .frame(received, window, self.config.traffic_factor, &mut self.out);
            }
            if !dev.scheduled {
                if let Some(at) = dev.cadence.deadline(factor) {
                    dev.scheduled = true;
                    self.deadlines.push(Reverse((at, frame.device.clone())));
                }
            }
            found.extend(self.out.drain(..).map(|f| (None, f)));
            for (k, r) in t.readings.iter().enumerate() {
                let Some(i) = self.index.slot(&self.config, dev, &r.sensor) else {
                    skipped += 1;
                    continue;
                };
                let (_, series, tuning) = &mut dev.sensors[i];
                match series.observe(
                    ts(r),
                    r.value,
                    &self.index.tunings[usize::from(*tuning)],
                    false,
                    &mut self.out,
                ) {
                    Seen::Judged => judged += 1,
                    Seen::Late | Seen::NotANumber => skipped += 1,
                }
                found.extend(self.out.drain(..).map(|f| (Some(k), f)));
            }
            for (k, f) in found.drain(..) {
                let reading = k.and_then(|k| t.readings.get(k));
                self.emit_one(
                    &frame.device,
                    reading.map(|r| r.sensor.as_str()),
                    reading.map(|r| r.value),
                    &f,
                );
            }
        }
        self.metrics.anomaly_readings.inc_by(judged);
        self.metrics.anomaly_readings_skipped.inc_by(skipped);
        self.metrics.anomaly_series.set(self.index.series as i64);
        self.metrics
            .anomaly_busy_seconds
            .inc_by(started.elapsed().as_secs_f64());
    }

    /// After skipped batches every series has a hole: none is judged across it.
    fn resume_all(&mut self) {
        for dev in self.devices.values_mut() {
            for (_, series, _) in &mut dev.sensors {
                series.resume();
            }
        }
    }

    /// Creates a device's state, warming its series on their latest stored readings (before
    /// `before_ms`, the first of the batch being judged).
    async fn warm_up(&mut self, device: &Arc<str>, before_ms: i64) {
        let mut dev = DeviceState::default();
        self.learn_from_store(device, &mut dev, before_ms).await;
        self.devices.insert(device.clone(), dev);
    }

    async fn learn_from_store(&mut self, device: &Arc<str>, dev: &mut DeviceState, before_ms: i64) {
        let n = self.config.warmup_from_store;
        if n == 0 {
            return;
        }
        let series: Vec<(i64, i64, String)> = match sqlx::query_as(
            "SELECT se.device, se.id, s.name FROM series se
             JOIN devices d ON d.id = se.device JOIN sensors s ON s.id = se.sensor
             WHERE d.device_id = ?1",
        )
        .bind(&**device)
        .fetch_all(&self.pool)
        .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%device, error = %e, "warm-up from the store failed; learning afresh");
                return;
            }
        };
        for (device_row, id, name) in series {
            let rows: Vec<(i64, Option<f64>)> = sqlx::query_as(
                "SELECT ts_ms, value FROM readings WHERE device = ?4 AND ts_ms < ?2 AND series = ?1
                 ORDER BY ts_ms DESC LIMIT ?3",
            )
            .bind(id)
            .bind(before_ms)
            .bind(i64::from(n))
            .bind(device_row)
            .fetch_all(&self.pool)
            .await
            .unwrap_or_default();
            if rows.is_empty() {
                continue;
            }
            let Some(i) = self.index.slot(&self.config, dev, &name) else {
                return;
            };
            let (_, series, tuning) = &mut dev.sensors[i];
            let tuning = self.index.tunings[usize::from(*tuning)];
            for (ts, value) in rows.into_iter().rev() {
                if let Some(v) = value {
                    series.observe(ts, v, &tuning, true, &mut self.out);
                }
            }
            self.out.clear();
        }
    }

    /// A device went offline: its silence is not a dropout.
    fn disconnected(&mut self, device: &Arc<str>) {
        if let Some(dev) = self.devices.get_mut(device) {
            dev.cadence.disconnected(&mut self.out);
            self.emit(device);
        }
    }

    /// Raises the live dropouts that are due at `now`.
    fn check_deadlines(&mut self, now: i64) {
        let factor = self.config.rhythm();
        while let Some(Reverse((at, device))) = self.deadlines.peek().cloned() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(dev) = self.devices.get_mut(&device) else {
                continue;
            };
            match dev.cadence.deadline(factor) {
                None => dev.scheduled = false,
                Some(due) if due > now => self.deadlines.push(Reverse((due, device))),
                // Only believe the silence if other data arrived since the deadline, or
                // nothing at all did for a while (then it is not a stalled commit).
                Some(due) if self.progress_ms < due && now < due + STALL_GRACE_MS => {
                    let again = (now + 20).min(due + STALL_GRACE_MS);
                    self.deadlines.push(Reverse((again, device)));
                }
                Some(_) => {
                    dev.scheduled = false;
                    dev.cadence.check(now, factor, &mut self.out);
                    self.emit(&device);
                }
            }
        }
    }

    /// A burst of failed links from one address.
    fn burst(&mut self, burst: &Burst) {
        tracing::warn!(
            peer = %burst.addr,
            failures = burst.failures,
            codes = %burst.codes,
            refused_for = %humantime::format_duration(burst.penalty),
            "security: a burst of failed links from one address; refusing it for a while"
        );
        let a = self.anomaly(burst.device.clone(), None, &burst.finding(), None);
        let a = Arc::new(Anomaly {
            peer: Some(burst.addr.to_string()),
            ..a
        });
        self.send(a);
    }

    fn anomaly(
        &mut self,
        device: Option<String>,
        sensor: Option<&str>,
        f: &Finding,
        value: Option<f64>,
    ) -> Anomaly {
        let id = self.next_id;
        self.next_id += 1;
        self.metrics.record_anomaly(f.kind);
        let throttle = &self.log[f.kind as usize];
        match throttle.check(crate::store::now_ms() as u64) {
            Some(unlogged) => tracing::info!(
                kind = f.kind.name(),
                device = device.as_deref().unwrap_or("-"),
                sensor = sensor.unwrap_or("-"),
                unlogged,
                "anomaly: {} (and {unlogged} more of this kind since the last such line)",
                f.detail
            ),
            None => tracing::debug!(
                kind = f.kind.name(),
                device = device.as_deref().unwrap_or("-"),
                "anomaly: {}",
                f.detail
            ),
        }
        Anomaly {
            id,
            device_id: device,
            sensor: sensor.map(str::to_owned),
            kind: f.kind.name().to_owned(),
            detector: f.detector.to_owned(),
            score: f.score,
            ts_ms: f.ts_ms,
            to_ms: f.to_ms,
            raised_ts_ms: f.raised_ts_ms,
            value: f.value.or(value),
            detail: f.detail.clone(),
            detected_ms: crate::store::now_ms(),
            peer: None,
            ongoing: f.ongoing,
        }
    }

    /// Turns the findings in `out` into anomalies of `device` (device-level ones).
    fn emit(&mut self, device: &Arc<str>) {
        let findings = std::mem::take(&mut self.out);
        for f in &findings {
            self.emit_one(device, None, None, f);
        }
        self.out = findings;
        self.out.clear();
    }

    /// Sends one finding of `device` (and `sensor`, with the reading's `value`): a new
    /// anomaly, or the end of an ongoing one.
    fn emit_one(
        &mut self,
        device: &Arc<str>,
        sensor: Option<&str>,
        value: Option<f64>,
        f: &Finding,
    ) {
        if f.is_end() {
            let Some(dev) = self.devices.get_mut(device) else {
                return;
            };
            let kind = f.kind.name();
            let Some(i) = dev.open.iter().position(|a| {
                a.kind == kind && a.ts_ms == f.ts_ms && a.sensor.as_deref() == sensor
            }) else {
                return;
            };
            let open = dev.open.swap_remove(i);
            let ended = Anomaly {
                to_ms: f.to_ms.max(open.ts_ms),
                ongoing: false,
                ..(*open).clone()
            };
            self.send(Arc::new(ended));
            return;
        }
        let a = Arc::new(self.anomaly(Some(device.to_string()), sensor, f, value));
        if a.ongoing {
            if let Some(dev) = self.devices.get_mut(device) {
                dev.open.push(a.clone());
            }
        }
        self.send(a);
    }

    fn send(&self, a: Arc<Anomaly>) {
        if self.sink.try_send(a).is_err() {
            self.metrics.anomalies_dropped.inc();
        }
    }
}
