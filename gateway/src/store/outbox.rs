//! The outbox: frames stored for the MQTT bridge to publish, in publish order.
//!
//! The store writer adds rows in the same transaction as the readings they carry, so a frame
//! acknowledged to a device is also durably queued for the broker. The bridge reads rows past
//! its position; once the broker has acknowledged everything up to a row, the bridge
//! [`Backlog::confirm`]s it and the writer deletes those rows between its batches (one
//! writer: no second connection contends for SQLite's write lock while acks wait). The
//! smallest id left is the durable cursor. [`Backlog`] keeps the unpublished size in
//! memory and applies the disk budget's policy (slow the devices, or drop the oldest).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::{SqliteConnection, SqlitePool};
use tokio::sync::Notify;

use super::StoreError;
use crate::config::BacklogPolicy;
use crate::metrics::Metrics;

/// What an outbox row holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Telemetry frame (protobuf body).
    Telemetry = 1,
    /// An Event frame (protobuf body).
    Event = 2,
    /// A command outcome (JSON body).
    CommandResult = 3,
    /// An anomaly the detector raised or ended (JSON body; `seq` is its id).
    Anomaly = 4,
}

impl Kind {
    fn from_i64(v: i64) -> Option<Self> {
        match v {
            1 => Some(Self::Telemetry),
            2 => Some(Self::Event),
            3 => Some(Self::CommandResult),
            4 => Some(Self::Anomaly),
            _ => None,
        }
    }
}

/// One row read back for publishing.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Publish order and cursor position.
    pub id: i64,
    /// What the body is.
    pub kind: Kind,
    /// The device it concerns.
    pub device_id: String,
    /// Its epoch (as stored: the u64's bits).
    pub epoch: i64,
    /// Its seq.
    pub seq: i64,
    /// When the gateway received it.
    pub received_ms: i64,
    /// Protobuf Telemetry/Event, or JSON for command results.
    pub body: Vec<u8>,
}

/// Bytes a row is counted as against the budget: its body and device id plus a fixed
/// allowance for the other columns and SQLite's overhead.
pub fn row_cost(device_id: &str, body_len: usize) -> u64 {
    (body_len + device_id.len() + 40) as u64
}

/// SQL for a row's cost, matching [`row_cost`].
pub(crate) const ROW_COST_SQL: &str = "length(body) + length(device_id) + 40";

/// The unpublished backlog: its size against the budget, and the signals between the
/// writer (adds) and the bridge (removes).
#[derive(Debug)]
pub struct Backlog {
    bytes: AtomicU64,
    budget: u64,
    policy: BacklogPolicy,
    /// Where the gauges and the dropped count show.
    metrics: Arc<Metrics>,
    /// Notified when rows are added (the bridge waits on it).
    pub added: Notify,
    /// Highest outbox id the broker has acknowledged, with every id below it.
    confirmed: AtomicI64,
    /// Notified when `confirmed` rises (the writer deletes up to it).
    pub confirmed_rose: Notify,
    /// Set when the writer stops: the bridge then deletes what it confirms itself.
    writer_stopped: AtomicBool,
}

impl Backlog {
    /// A backlog with `budget` bytes, starting from what the outbox holds now.
    pub async fn load(
        pool: &SqlitePool,
        budget: u64,
        policy: BacklogPolicy,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let bytes: i64 = sqlx::query_scalar(&format!(
            "SELECT COALESCE(SUM({ROW_COST_SQL}), 0) FROM outbox"
        ))
        .fetch_one(pool)
        .await?;
        metrics.uplink_backlog_bytes.set(bytes.max(0));
        Ok(Self {
            bytes: AtomicU64::new(bytes.max(0) as u64),
            budget,
            policy,
            metrics,
            added: Notify::new(),
            confirmed: AtomicI64::new(0),
            confirmed_rose: Notify::new(),
            writer_stopped: AtomicBool::new(false),
        })
    }

    /// Unpublished bytes now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The configured policy.
    pub fn policy(&self) -> BacklogPolicy {
        self.policy
    }

    /// Whether the backlog is at or over its budget.
    pub fn over_budget(&self) -> bool {
        self.bytes() >= self.budget
    }

    /// Rows worth `bytes` were committed.
    pub fn added(&self, bytes: u64) {
        let now = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.metrics.uplink_backlog_bytes.set(now as i64);
        self.added.notify_one();
    }

    /// Rows worth `bytes` were deleted.
    pub fn removed(&self, bytes: u64) {
        let before = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            })
            .unwrap_or(0);
        self.metrics
            .uplink_backlog_bytes
            .set(before.saturating_sub(bytes) as i64);
    }

    /// The broker has every row up to `upto`. Returns whether the writer will delete them
    /// (false once it has stopped: the caller deletes them itself).
    pub fn confirm(&self, upto: i64) -> bool {
        // SeqCst with `stop_writer`: either the writer's last pass sees this id, or this
        // caller sees that the writer stopped (deleting twice is harmless).
        self.confirmed.fetch_max(upto, Ordering::SeqCst);
        self.confirmed_rose.notify_one();
        !self.writer_stopped.load(Ordering::SeqCst)
    }

    /// The highest id confirmed so far.
    pub fn confirmed(&self) -> i64 {
        self.confirmed.load(Ordering::SeqCst)
    }

    /// The writer is stopping: after its last deletion, confirmed rows are the bridge's to
    /// delete.
    pub fn stop_writer(&self) {
        self.writer_stopped.store(true, Ordering::SeqCst);
    }

    /// Rows the writer deleted up to a confirmed id: `rows` published rows worth `bytes`.
    pub fn published(&self, rows: u64, bytes: u64) {
        self.removed(bytes);
        self.metrics.uplink_published.inc_by(rows);
    }

    /// `frames` unpublished rows were dropped by the `drop-oldest` policy.
    pub fn dropped(&self, frames: u64) {
        self.metrics.uplink_dropped.inc_by(frames);
    }

    /// Marks whether the budget's policy is in force.
    pub fn set_full(&self, full: bool) {
        self.metrics.uplink_backlog_full.set(i64::from(full));
    }
}

/// Reads up to `limit` rows with an id above `after`, in order.
pub async fn read_after(
    pool: &SqlitePool,
    after: i64,
    limit: i64,
) -> Result<Vec<OutboxRow>, StoreError> {
    #[derive(sqlx::FromRow)]
    struct Stored {
        id: i64,
        kind: i64,
        device_id: String,
        epoch: i64,
        seq: i64,
        received_ms: i64,
        body: Vec<u8>,
    }
    let rows: Vec<Stored> = sqlx::query_as(
        "SELECT id, kind, device_id, epoch, seq, received_ms, body FROM outbox
         WHERE id > ? ORDER BY id LIMIT ?",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            Some(OutboxRow {
                id: r.id,
                kind: Kind::from_i64(r.kind)?,
                device_id: r.device_id,
                epoch: r.epoch,
                seq: r.seq,
                received_ms: r.received_ms,
                body: r.body,
            })
        })
        .collect())
}

/// The id just below the oldest row (where publishing resumes), or the last id ever used
/// when the outbox is empty.
pub async fn cursor(pool: &SqlitePool) -> Result<i64, StoreError> {
    let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(id) FROM outbox")
        .fetch_one(pool)
        .await?;
    if let Some(oldest) = oldest {
        return Ok(oldest - 1);
    }
    let last: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
            .fetch_optional(pool)
            .await?;
    Ok(last.unwrap_or(0))
}

/// Deletes every row up to and including `upto` (the broker has them); returns (rows,
/// cost). The writer does this while it runs ([`Backlog::confirm`]); the bridge only after
/// the writer has stopped.
pub async fn delete_upto(pool: &SqlitePool, upto: i64) -> Result<(u64, u64), StoreError> {
    let costs: Vec<i64> = sqlx::query_scalar(&format!(
        "DELETE FROM outbox WHERE id <= ? RETURNING {ROW_COST_SQL}"
    ))
    .bind(upto)
    .fetch_all(pool)
    .await?;
    Ok((
        costs.len() as u64,
        costs.iter().map(|&c| c.max(0) as u64).sum(),
    ))
}

/// Inserts one row outside the writer (command outcomes decided by the gateway itself).
pub async fn insert_one(
    conn: &mut SqliteConnection,
    kind: Kind,
    device_id: &str,
    received_ms: i64,
    body: &[u8],
) -> Result<u64, StoreError> {
    sqlx::query("INSERT INTO outbox (kind, device_id, epoch, seq, received_ms, body) VALUES (?, ?, 0, 0, ?, ?)")
        .bind(kind as i64)
        .bind(device_id)
        .bind(received_ms)
        .bind(body)
        .execute(conn)
        .await?;
    Ok(row_cost(device_id, body.len()))
}
