//! The batching writer: the one task that writes device data to SQLite.
//!
//! Sessions send [`WriteFrame`]s over a bounded channel ([`WriterHandle`]). The writer takes
//! everything queued (up to `batch_max_frames`), commits it in one transaction with
//! multi-row statements, and only then raises each session's [`AckSignal`], so a device is
//! acknowledged only for data that is durable. Frames that arrive while a commit runs form the
//! next batch: group commit without a linger timer.
//!
//! Deduplication lives here because the writer is the single owner of each stream's
//! `last_seq`: a frame whose seq is at or below what is stored (or already in the batch) is
//! acknowledged again and not stored. That holds even while a superseded link's frames are
//! still queued beside its replacement's resends.
//!
//! Full-policy of the queue: **block**. A session waits to enqueue, so it stops reading its
//! socket and the device slows down; nothing is dropped.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::sqlite::{SqliteArguments, SqliteConnection};
use sqlx::{Connection, Sqlite};
use tokio::sync::{mpsc, watch};

use super::{u64_to_sql, StoreError};
use crate::metrics::Metrics;

/// What a session learns from the writer: how far its frames are durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durable {
    /// Every frame of the link's epoch with a seq at or below this is durable.
    pub seq: u64,
    /// A commit holding this link's frames failed; the link should close so the device
    /// resends after reconnecting.
    pub failed: bool,
}

/// Shared by a session and its queued frames; the writer raises it after each commit.
pub type AckSignal = Arc<watch::Sender<Durable>>;

/// The data of one frame.
#[derive(Debug)]
pub enum FrameBody {
    /// Readings, already validated by the session.
    Telemetry(Vec<proto::v1::Reading>),
    /// One event.
    Event(proto::v1::Event),
}

/// One data frame to store.
#[derive(Debug)]
pub struct WriteFrame {
    /// The device's id from its Hello.
    pub device: Arc<str>,
    /// The link's epoch.
    pub epoch: u64,
    /// The frame's seq (> 0).
    pub seq: u64,
    /// Gateway receive time, used where the device sent timestamp 0.
    pub received_ms: i64,
    /// What to store.
    pub body: FrameBody,
    /// Raised after the commit that makes this frame durable.
    pub acks: AckSignal,
}

/// A cheap, cloneable sender to the writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<WriteFrame>,
}

impl WriterHandle {
    /// Queues a frame, waiting while the queue is full (backpressure). Fails only when the
    /// writer has stopped.
    pub async fn send(&self, frame: WriteFrame) -> Result<(), WriterStopped> {
        self.tx.send(frame).await.map_err(|_| WriterStopped)
    }
}

/// The writer task is gone (the store failed or the gateway is stopping).
#[derive(Debug, thiserror::Error)]
#[error("the store writer has stopped")]
pub struct WriterStopped;

/// Rows per multi-row INSERT. The remainder of a batch goes in power-of-two chunks, so the
/// connection's statement cache holds at most a handful of shapes per table.
const MAX_ROWS_PER_STATEMENT: usize = 256;

struct ReadingRow {
    series: i64,
    ts_ms: i64,
    stream: i64,
    seq: i64,
    idx: i64,
    value: Option<f64>,
}

struct EventRow {
    stream: i64,
    seq: i64,
    device: i64,
    ts_ms: i64,
    frame: usize,
}

struct StreamRow {
    id: i64,
    device: i64,
    epoch: i64,
    last_seq: u64,
}

#[derive(Default)]
struct Cache {
    devices: HashMap<Arc<str>, i64>,
    /// (device, epoch) -> (stream id, committed last_seq).
    streams: HashMap<(i64, i64), (i64, u64)>,
    /// device -> sensor name -> series id.
    series: HashMap<i64, HashMap<String, i64>>,
}

/// Caches grow with devices x sensors and epochs; past this many entries they are dropped
/// and refilled from SQLite on demand.
const CACHE_LIMIT: usize = 1_000_000;

impl Cache {
    fn clear_if_large(&mut self) {
        let size = self.devices.len() + self.streams.len() + self.series.len();
        if size > CACHE_LIMIT {
            *self = Cache::default();
        }
    }

    async fn device(
        &mut self,
        conn: &mut SqliteConnection,
        name: &Arc<str>,
    ) -> Result<i64, sqlx::Error> {
        if let Some(&id) = self.devices.get(name) {
            return Ok(id);
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO devices (device_id, created_at_ms) VALUES (?, ?)
             ON CONFLICT (device_id) DO UPDATE SET device_id = excluded.device_id
             RETURNING id",
        )
        .bind(&**name)
        .bind(super::now_ms())
        .fetch_one(conn)
        .await?;
        self.devices.insert(name.clone(), id);
        Ok(id)
    }

    async fn stream(
        &mut self,
        conn: &mut SqliteConnection,
        device: i64,
        epoch: i64,
    ) -> Result<(i64, u64), sqlx::Error> {
        if let Some(&s) = self.streams.get(&(device, epoch)) {
            return Ok(s);
        }
        let (id, last_seq): (i64, i64) = sqlx::query_as(
            "INSERT INTO streams (device, epoch) VALUES (?, ?)
             ON CONFLICT (device, epoch) DO UPDATE SET epoch = excluded.epoch
             RETURNING id, last_seq",
        )
        .bind(device)
        .bind(epoch)
        .fetch_one(conn)
        .await?;
        let s = (id, super::u64_from_sql(last_seq));
        self.streams.insert((device, epoch), s);
        Ok(s)
    }

    async fn series(
        &mut self,
        conn: &mut SqliteConnection,
        device: i64,
        sensor: &str,
    ) -> Result<i64, sqlx::Error> {
        if let Some(&id) = self.series.get(&device).and_then(|m| m.get(sensor)) {
            return Ok(id);
        }
        let sensor_id: i64 = sqlx::query_scalar(
            "INSERT INTO sensors (name) VALUES (?)
             ON CONFLICT (name) DO UPDATE SET name = excluded.name
             RETURNING id",
        )
        .bind(sensor)
        .fetch_one(&mut *conn)
        .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO series (device, sensor) VALUES (?, ?)
             ON CONFLICT (device, sensor) DO UPDATE SET sensor = excluded.sensor
             RETURNING id",
        )
        .bind(device)
        .bind(sensor_id)
        .fetch_one(conn)
        .await?;
        self.series
            .entry(device)
            .or_default()
            .insert(sensor.to_owned(), id);
        Ok(id)
    }
}

/// Multi-row INSERT statements for one table, one per power-of-two row count.
struct InsertSql {
    by_log2: Vec<String>,
}

impl InsertSql {
    fn new(prefix: &str, columns: usize, suffix: &str) -> Self {
        let row = format!("({})", vec!["?"; columns].join(","));
        let mut by_log2 = Vec::new();
        let mut n = 1;
        while n <= MAX_ROWS_PER_STATEMENT {
            by_log2.push(format!(
                "{prefix} VALUES {}{suffix}",
                vec![row.as_str(); n].join(",")
            ));
            n *= 2;
        }
        Self { by_log2 }
    }

    /// Splits `len` rows into statement-sized chunks: (statement, row count).
    fn chunks(&self, mut len: usize) -> Vec<(&str, usize)> {
        let mut out = Vec::new();
        while len > 0 {
            let n = if len >= MAX_ROWS_PER_STATEMENT {
                MAX_ROWS_PER_STATEMENT
            } else {
                1 << (usize::BITS - 1 - len.leading_zeros())
            };
            out.push((self.by_log2[n.trailing_zeros() as usize].as_str(), n));
            len -= n;
        }
        out
    }
}

type Query<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// The writer task's state. Created by [`spawn`].
pub struct Writer {
    conn: SqliteConnection,
    cache: Cache,
    metrics: Arc<Metrics>,
    readings_sql: InsertSql,
    events_sql: InsertSql,
    streams_sql: InsertSql,
    readings: Vec<ReadingRow>,
    events: Vec<EventRow>,
    pending: HashMap<i64, StreamRow>,
}

/// Starts the writer on `conn`. It runs until every [`WriterHandle`] is dropped, then commits
/// what is queued and returns.
pub fn spawn(
    conn: SqliteConnection,
    queue_frames: usize,
    batch_max_frames: usize,
    metrics: Arc<Metrics>,
) -> (WriterHandle, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(queue_frames);
    let writer = Writer {
        conn,
        cache: Cache::default(),
        metrics,
        readings_sql: InsertSql::new(
            "INSERT INTO readings (series, ts_ms, stream, seq, idx, value)",
            6,
            "",
        ),
        events_sql: InsertSql::new(
            "INSERT INTO event_log (stream, seq, device, ts_ms, kind, message, severity)",
            7,
            "",
        ),
        streams_sql: InsertSql::new(
            "INSERT INTO streams (id, device, epoch, last_seq)",
            4,
            " ON CONFLICT (id) DO UPDATE SET last_seq = excluded.last_seq",
        ),
        readings: Vec::new(),
        events: Vec::new(),
        pending: HashMap::new(),
    };
    let task = tokio::spawn(writer.run(rx, batch_max_frames));
    (WriterHandle { tx }, task)
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<WriteFrame>, batch_max_frames: usize) {
        let mut batch = Vec::with_capacity(batch_max_frames);
        while rx.recv_many(&mut batch, batch_max_frames).await > 0 {
            match self.commit(&batch).await {
                Ok(stored) => {
                    self.metrics
                        .record_batch(batch.len() as u64, stored.frames, stored.readings);
                    for frame in &batch {
                        frame.acks.send_if_modified(|d| {
                            let raise = frame.seq > d.seq;
                            if raise {
                                d.seq = frame.seq;
                            }
                            raise
                        });
                    }
                }
                Err(e) => {
                    // Nothing of this batch was acknowledged; its devices resend after
                    // reconnecting. Interned ids may have been rolled back: forget them.
                    tracing::error!(error = %e, frames = batch.len(), "store commit failed; closing the links of this batch");
                    self.metrics.inc(&self.metrics.commit_failures);
                    self.cache = Cache::default();
                    for frame in &batch {
                        frame.acks.send_modify(|d| d.failed = true);
                    }
                }
            }
            batch.clear();
        }
        tracing::debug!("store writer drained and stopped");
    }

    /// Stores one batch in one transaction. Returns what was new.
    async fn commit(&mut self, batch: &[WriteFrame]) -> Result<Stored, StoreError> {
        let Writer {
            conn,
            cache,
            readings_sql,
            events_sql,
            streams_sql,
            readings,
            events,
            pending,
            ..
        } = self;
        cache.clear_if_large();
        readings.clear();
        events.clear();
        pending.clear();
        let mut stored = Stored::default();

        let mut tx = Connection::begin(conn).await?;
        for (i, frame) in batch.iter().enumerate() {
            let device = cache.device(&mut tx, &frame.device).await?;
            let epoch = u64_to_sql(frame.epoch);
            let (stream, committed) = cache.stream(&mut tx, device, epoch).await?;
            let last = pending.get(&stream).map_or(committed, |p| p.last_seq);
            if frame.seq <= last {
                continue; // already stored: acknowledged again below, not stored twice
            }
            pending.insert(
                stream,
                StreamRow {
                    id: stream,
                    device,
                    epoch,
                    last_seq: frame.seq,
                },
            );
            stored.frames += 1;
            let seq = u64_to_sql(frame.seq);
            match &frame.body {
                FrameBody::Telemetry(rs) => {
                    for (idx, r) in rs.iter().enumerate() {
                        let series = cache.series(&mut tx, device, &r.sensor).await?;
                        readings.push(ReadingRow {
                            series,
                            ts_ms: timestamp(r.timestamp_ms, frame.received_ms),
                            stream,
                            seq,
                            idx: idx as i64,
                            value: (!r.value.is_nan()).then_some(r.value),
                        });
                    }
                    stored.readings += rs.len() as u64;
                }
                FrameBody::Event(e) => events.push(EventRow {
                    stream,
                    seq,
                    device,
                    ts_ms: timestamp(e.timestamp_ms, frame.received_ms),
                    frame: i,
                }),
            }
        }

        insert_rows(&mut tx, readings_sql, readings, |q, r| {
            q.bind(r.series)
                .bind(r.ts_ms)
                .bind(r.stream)
                .bind(r.seq)
                .bind(r.idx)
                .bind(r.value)
        })
        .await?;
        insert_rows(&mut tx, events_sql, events, |q, r| {
            let FrameBody::Event(e) = &batch[r.frame].body else {
                unreachable!("event rows point at event frames")
            };
            q.bind(r.stream)
                .bind(r.seq)
                .bind(r.device)
                .bind(r.ts_ms)
                .bind(e.kind.as_str())
                .bind(e.message.as_str())
                .bind(e.severity)
        })
        .await?;
        let streams: Vec<&StreamRow> = pending.values().collect();
        insert_rows(&mut tx, streams_sql, &streams, |q, s| {
            q.bind(s.id)
                .bind(s.device)
                .bind(s.epoch)
                .bind(u64_to_sql(s.last_seq))
        })
        .await?;
        tx.commit().await?;

        for s in pending.values() {
            cache
                .streams
                .insert((s.device, s.epoch), (s.id, s.last_seq));
        }
        Ok(stored)
    }
}

#[derive(Default)]
struct Stored {
    frames: u64,
    readings: u64,
}

/// A device timestamp, or the receive time where the device sent 0.
fn timestamp(device_ms: u64, received_ms: i64) -> i64 {
    if device_ms == 0 {
        received_ms
    } else {
        // The session rejects timestamps above i64::MAX.
        device_ms as i64
    }
}

async fn insert_rows<'r, R>(
    conn: &mut SqliteConnection,
    sql: &'r InsertSql,
    rows: &'r [R],
    bind: impl Fn(Query<'r>, &'r R) -> Query<'r>,
) -> Result<(), sqlx::Error> {
    let mut rest = rows;
    for (statement, n) in sql.chunks(rows.len()) {
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let mut q = sqlx::query(statement);
        for row in chunk {
            q = bind(q, row);
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_with_few_statement_shapes() {
        let sql = InsertSql::new("INSERT INTO t (a)", 1, "");
        for len in [0, 1, 2, 3, 100, 255, 256, 257, 1000] {
            let chunks = sql.chunks(len);
            assert_eq!(chunks.iter().map(|c| c.1).sum::<usize>(), len);
            for (statement, n) in chunks {
                assert_eq!(statement.matches('?').count(), n);
            }
        }
    }
}
