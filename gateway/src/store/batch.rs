//! One batch commit of the store writer: resolve interned ids, deduplicate by
//! (device, epoch, seq), and write readings, events, command outcomes, outbox rows and each
//! stream's new `last_seq` in one transaction with multi-row statements.
//!
//! Owns the id caches and the reusable row buffers; knows nothing of channels or acks.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use sqlx::sqlite::{SqliteArguments, SqliteConnection};
use sqlx::{Connection, Sqlite};

use super::outbox::{row_cost, Kind};
use super::writer::{FrameBody, WriteFrame};
use super::{u64_from_sql, u64_to_sql, StoreError};
use crate::bridge::payload;

/// Rows per multi-row INSERT. The remainder of a batch goes in power-of-two chunks, so the
/// connection's statement cache holds at most a handful of shapes per table.
const MAX_ROWS_PER_STATEMENT: usize = 256;

/// Caches grow with devices x sensors and epochs; past this many entries they are dropped
/// and refilled from SQLite on demand.
const CACHE_LIMIT: usize = 1_000_000;

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

struct OutboxRow {
    kind: Kind,
    frame: usize,
    body: Vec<u8>,
}

#[derive(Default)]
struct Cache {
    devices: HashMap<Arc<str>, i64>,
    /// (device, epoch) -> (stream id, committed last_seq).
    streams: HashMap<(i64, i64), (i64, u64)>,
    /// device -> sensor name -> series id.
    series: HashMap<i64, HashMap<String, i64>>,
}

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
        let s = (id, u64_from_sql(last_seq));
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

/// A device timestamp, or the receive time where the device sent 0.
fn timestamp(device_ms: u64, received_ms: i64) -> i64 {
    if device_ms == 0 {
        received_ms
    } else {
        // The session rejects timestamps above i64::MAX.
        device_ms as i64
    }
}

/// What one commit stored.
#[derive(Debug, Default)]
pub struct Stored {
    /// Frames stored for the first time.
    pub frames: u64,
    /// Readings stored.
    pub readings: u64,
    /// Bytes added to the outbox.
    pub outbox_bytes: u64,
}

/// The writer's connection, caches and buffers.
pub struct Batcher {
    conn: SqliteConnection,
    cache: Cache,
    /// Whether to queue frames for the MQTT bridge.
    uplink: bool,
    readings_sql: InsertSql,
    events_sql: InsertSql,
    streams_sql: InsertSql,
    outbox_sql: InsertSql,
    readings: Vec<ReadingRow>,
    events: Vec<EventRow>,
    pending: HashMap<i64, StreamRow>,
    outbox: Vec<OutboxRow>,
}

impl Batcher {
    /// A batcher writing on `conn`; `uplink` adds outbox rows for the bridge.
    pub fn new(conn: SqliteConnection, uplink: bool) -> Self {
        Self {
            conn,
            cache: Cache::default(),
            uplink,
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
            outbox_sql: InsertSql::new(
                "INSERT INTO outbox (kind, device_id, epoch, seq, received_ms, body)",
                6,
                "",
            ),
            readings: Vec::new(),
            events: Vec::new(),
            pending: HashMap::new(),
            outbox: Vec::new(),
        }
    }

    /// The writer's own connection, for housekeeping between batches.
    pub fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    /// Forgets cached ids (after a failed commit, which may have rolled some back).
    pub fn forget(&mut self) {
        self.cache = Cache::default();
    }

    /// Stores one batch in one transaction. Frames at or below their stream's stored seq
    /// are skipped (they are durable already).
    pub async fn commit(&mut self, batch: &[WriteFrame]) -> Result<Stored, StoreError> {
        let Batcher {
            conn,
            cache,
            uplink,
            readings_sql,
            events_sql,
            streams_sql,
            outbox_sql,
            readings,
            events,
            pending,
            outbox,
        } = self;
        cache.clear_if_large();
        readings.clear();
        events.clear();
        pending.clear();
        outbox.clear();
        let mut stored = Stored::default();

        let mut tx = Connection::begin(conn).await?;
        for (i, frame) in batch.iter().enumerate() {
            let device = cache.device(&mut tx, &frame.device).await?;
            let epoch = u64_to_sql(frame.epoch);
            let (stream, committed) = cache.stream(&mut tx, device, epoch).await?;
            let last = pending.get(&stream).map_or(committed, |p| p.last_seq);
            if frame.seq <= last {
                continue; // already stored: acknowledged again, not stored twice
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
                FrameBody::Telemetry(t) => {
                    for (idx, r) in t.readings.iter().enumerate() {
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
                    stored.readings += t.readings.len() as u64;
                    if *uplink {
                        outbox.push(OutboxRow {
                            kind: Kind::Telemetry,
                            frame: i,
                            body: t.encode_to_vec(),
                        });
                    }
                }
                FrameBody::Event(e) => {
                    events.push(EventRow {
                        stream,
                        seq,
                        device,
                        ts_ms: timestamp(e.timestamp_ms, frame.received_ms),
                        frame: i,
                    });
                    if *uplink {
                        outbox.push(OutboxRow {
                            kind: Kind::Event,
                            frame: i,
                            body: e.encode_to_vec(),
                        });
                    }
                }
                FrameBody::CommandResult(r) => {
                    // The first outcome of an open command wins; a late or unknown result
                    // is acknowledged and dropped.
                    let status = payload::status_name(r);
                    let done = sqlx::query(
                        "UPDATE commands SET outcome = ?, detail = ?, finished_ms = ?
                         WHERE device = ? AND command_id = ? AND outcome IS NULL",
                    )
                    .bind(status)
                    .bind(&r.detail)
                    .bind(frame.received_ms)
                    .bind(device)
                    .bind(&r.id)
                    .execute(&mut *tx)
                    .await?;
                    if done.rows_affected() > 0 && *uplink {
                        outbox.push(OutboxRow {
                            kind: Kind::CommandResult,
                            frame: i,
                            body: payload::command_result_json(
                                &frame.device,
                                &r.id,
                                status,
                                &r.detail,
                                &r.payload,
                                frame.received_ms,
                            ),
                        });
                    } else if done.rows_affected() == 0 {
                        tracing::debug!(device = %frame.device, command = %r.id, "result for a command that is not open; ignored");
                    }
                }
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
        insert_rows(&mut tx, outbox_sql, outbox, |q, r| {
            let f = &batch[r.frame];
            q.bind(r.kind as i64)
                .bind(&*f.device)
                .bind(u64_to_sql(f.epoch))
                .bind(u64_to_sql(f.seq))
                .bind(f.received_ms)
                .bind(r.body.as_slice())
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
        stored.outbox_bytes = outbox
            .iter()
            .map(|r| row_cost(&batch[r.frame].device, r.body.len()))
            .sum();
        Ok(stored)
    }
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
