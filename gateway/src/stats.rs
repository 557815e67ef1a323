//! Once a second: a sample of the gateway's counters (for rates over the last 10 s and
//! minute, and a 10-minute history for charts), the state gauges of `/metrics` (queue fill,
//! store size, backlog rows, pacing), and the health verdict of `/healthz`.
//!
//! Reads counters and the store's read pool only; it never touches the writer's path.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use sqlx::SqlitePool;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::now_ms;
use crate::store::writer::QueueProbe;

/// Samples kept: ten minutes at one a second.
pub const HISTORY: usize = 600;

/// The queue counts as stuck when it stays at least this full...
const FULL_FILL: f64 = 0.99;
/// ...for this long.
const FULL_FOR_MS: i64 = 30_000;
/// A commit failure makes the gateway unhealthy until a batch commits again.
const FAILURE_WINDOW_MS: i64 = 10_000;

/// Counters at one instant.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// Unix ms.
    pub ts_ms: i64,
    /// Readings committed since start.
    pub readings: u64,
    /// Frames committed since start.
    pub frames: u64,
    /// Batches committed since start.
    pub batches: u64,
    /// Failed commits since start.
    pub commit_failures: u64,
    /// Store queue fill, 0 to 1.
    pub queue_fill: f64,
    /// Open device sessions.
    pub sessions: i64,
    /// Unpublished MQTT backlog, bytes.
    pub backlog_bytes: i64,
}

/// Rates between two samples.
#[derive(Debug, Clone, Copy, Default, Serialize, utoipa::ToSchema)]
pub struct Rates {
    /// Readings committed per second.
    pub readings_per_s: f64,
    /// Frames committed per second.
    pub frames_per_s: f64,
}

/// What `/healthz` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The store commits and the writer keeps up.
    Ok,
    /// Why not.
    Failing(String),
}

/// The sampler's state, shared with the API.
pub struct Stats {
    samples: Mutex<VecDeque<Sample>>,
    /// When the gateway started, Unix ms.
    pub started_ms: i64,
    health: Mutex<Health>,
    metrics: Arc<Metrics>,
    probe: QueueProbe,
    pool: SqlitePool,
    db_path: PathBuf,
    /// Whether the outbox is in use (MQTT on).
    uplink: bool,
}

impl Stats {
    /// A sampler over these parts.
    pub fn new(
        metrics: Arc<Metrics>,
        probe: QueueProbe,
        pool: SqlitePool,
        db_path: PathBuf,
        uplink: bool,
    ) -> Self {
        Self {
            samples: Mutex::new(VecDeque::with_capacity(HISTORY + 1)),
            started_ms: now_ms(),
            health: Mutex::new(Health::Ok),
            metrics,
            probe,
            pool,
            db_path,
            uplink,
        }
    }

    fn lock_samples(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The health verdict of the last sample (and of the writer now).
    pub fn health(&self) -> Health {
        if self.probe.fill().is_none() {
            return Health::Failing("the store writer has stopped".into());
        }
        if self.metrics.store_full.get() != 0 {
            return Health::Failing(
                "the store is full (disk full or store.max_bytes): devices are held back and nothing is acknowledged until space returns".into(),
            );
        }
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Rates over the last `seconds` (or as long as there are samples).
    pub fn rates(&self, seconds: usize) -> Rates {
        let samples = self.lock_samples();
        let (Some(last), Some(first)) = (
            samples.back(),
            samples.get(samples.len().saturating_sub(seconds + 1)),
        ) else {
            return Rates::default();
        };
        let dt = (last.ts_ms - first.ts_ms) as f64 / 1000.0;
        if dt <= 0.0 {
            return Rates::default();
        }
        Rates {
            readings_per_s: (last.readings - first.readings) as f64 / dt,
            frames_per_s: (last.frames - first.frames) as f64 / dt,
        }
    }

    /// The last `n` samples, oldest first.
    pub fn history(&self, n: usize) -> Vec<Sample> {
        let samples = self.lock_samples();
        samples
            .iter()
            .skip(samples.len().saturating_sub(n))
            .copied()
            .collect()
    }

    /// Refreshes the state gauges of `/metrics` (also done at each scrape).
    pub async fn refresh_gauges(&self) {
        let m = &self.metrics;
        if let Some(fill) = self.probe.fill() {
            m.store_queue_fill.set(fill);
        }
        let size = ["", "-wal"]
            .iter()
            .filter_map(|suffix| {
                let mut p = self.db_path.clone().into_os_string();
                p.push(suffix);
                std::fs::metadata(p).ok().map(|md| md.len())
            })
            .sum::<u64>();
        m.store_bytes.set(size as i64);
        if self.uplink {
            // Rows leave the outbox from the front only (the cursor and drop-oldest), so
            // the id span is the row count: two index seeks instead of a count.
            let rows: Result<i64, _> =
                sqlx::query_scalar("SELECT COALESCE(MAX(id) - MIN(id) + 1, 0) FROM outbox")
                    .fetch_one(&self.pool)
                    .await;
            if let Ok(rows) = rows {
                m.uplink_backlog_rows.set(rows);
            }
        }
    }

    /// Takes one sample and updates the health verdict.
    pub async fn sample(&self) {
        self.refresh_gauges().await;
        let m = &self.metrics;
        let now = Sample {
            ts_ms: now_ms(),
            readings: m.readings_stored.get(),
            frames: m.frames_stored.get(),
            batches: m.batches_committed.get(),
            commit_failures: m.commit_failures.get(),
            queue_fill: self.probe.fill().unwrap_or(1.0),
            sessions: m.sessions_active.get(),
            backlog_bytes: m.uplink_backlog_bytes.get(),
        };
        let mut samples = self.lock_samples();
        samples.push_back(now);
        while samples.len() > HISTORY {
            samples.pop_front();
        }
        let verdict = judge(&samples);
        drop(samples);
        *self.health.lock().unwrap_or_else(|e| e.into_inner()) = verdict;
    }

    /// Samples once a second until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.sample().await,
            }
        }
    }
}

/// The health verdict from the samples, newest last.
fn judge(samples: &VecDeque<Sample>) -> Health {
    let Some(last) = samples.back() else {
        return Health::Ok;
    };
    // A failed commit with no successful one since, within the window.
    let recent = samples
        .iter()
        .rev()
        .take_while(|s| last.ts_ms - s.ts_ms <= FAILURE_WINDOW_MS);
    let first_recent = recent.last().copied().unwrap_or(*last);
    if last.commit_failures > first_recent.commit_failures && last.batches == first_recent.batches {
        return Health::Failing(format!(
            "the store is failing: {} commits failed in the last {} s and none succeeded",
            last.commit_failures - first_recent.commit_failures,
            FAILURE_WINDOW_MS / 1000
        ));
    }
    // The queue full for long: the writer does not keep up.
    let full_since = samples
        .iter()
        .rev()
        .take_while(|s| s.queue_fill >= FULL_FILL)
        .last()
        .map(|s| s.ts_ms);
    if let Some(since) = full_since {
        let for_ms = last.ts_ms - since;
        if for_ms >= FULL_FOR_MS {
            return Health::Failing(format!(
                "the store queue has been full for {} s: the writer does not keep up",
                for_ms / 1000
            ));
        }
    }
    Health::Ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(ts_ms: i64, batches: u64, failures: u64, fill: f64) -> Sample {
        Sample {
            ts_ms,
            batches,
            commit_failures: failures,
            queue_fill: fill,
            ..Sample::default()
        }
    }

    #[test]
    fn a_committing_store_with_room_is_healthy() {
        let samples: VecDeque<_> = (0..20).map(|i| s(i * 1000, i as u64, 0, 0.5)).collect();
        assert_eq!(judge(&samples), Health::Ok);
    }

    #[test]
    fn failing_commits_without_a_success_are_unhealthy_until_one_commits() {
        let mut samples: VecDeque<_> = (0..5).map(|i| s(i * 1000, 10, i as u64, 0.0)).collect();
        assert!(matches!(judge(&samples), Health::Failing(r) if r.contains("failing")));
        samples.push_back(s(5000, 11, 4, 0.0));
        assert_eq!(judge(&samples), Health::Ok);
    }

    #[test]
    fn a_queue_full_for_half_a_minute_is_unhealthy() {
        let mut samples: VecDeque<_> = (0..29).map(|i| s(i * 1000, i as u64, 0, 1.0)).collect();
        assert_eq!(judge(&samples), Health::Ok, "28 s is not long yet");
        samples.push_back(s(30_000, 30, 0, 1.0));
        assert!(matches!(judge(&samples), Health::Failing(r) if r.contains("full")));
    }
}
