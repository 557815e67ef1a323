//! One batch commit of the store writer: resolve interned ids, deduplicate by
//! (device, epoch, seq), and write readings, events, command outcomes, outbox rows and each
//! stream's new `last_seq` in one transaction.
//!
//! The writer's connection is rusqlite on the same libsqlite3 as sqlx, with every statement
//! prepared once and reused (`prepare_cached`): measured with `cargo bench --bench store`
//! and `firmware-sim bench ingest`, that is about twice the rate of sqlx multi-row statements
//! (see BENCHMARKS.md). It is synchronous, so the writer runs it on a blocking thread.
//! Owns the id caches; knows nothing of channels or acks.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use prost::Message;
use rusqlite::{params, Connection, Transaction, TransactionBehavior};

use super::outbox::{row_cost, Kind};
use super::writer::{FrameBody, WriteFrame};
use super::{u64_from_sql, u64_to_sql, StoreError, STORE_PRAGMAS};
use crate::config::Durability;
use crate::payload::{self, timestamp};

/// Caches grow with devices x sensors and epochs; past this many entries they are dropped
/// and refilled from SQLite on demand.
const CACHE_LIMIT: usize = 1_000_000;

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

    fn device(&mut self, tx: &Transaction<'_>, name: &Arc<str>) -> rusqlite::Result<i64> {
        if let Some(&id) = self.devices.get(name) {
            return Ok(id);
        }
        let id = tx
            .prepare_cached(
                "INSERT INTO devices (device_id, created_at_ms) VALUES (?1, ?2)
                 ON CONFLICT (device_id) DO UPDATE SET device_id = excluded.device_id
                 RETURNING id",
            )?
            .query_row(params![&**name, super::now_ms()], |r| r.get(0))?;
        self.devices.insert(name.clone(), id);
        Ok(id)
    }

    fn stream(
        &mut self,
        tx: &Transaction<'_>,
        device: i64,
        epoch: i64,
    ) -> rusqlite::Result<(i64, u64)> {
        if let Some(&s) = self.streams.get(&(device, epoch)) {
            return Ok(s);
        }
        let (id, last_seq): (i64, i64) = tx
            .prepare_cached(
                "INSERT INTO streams (device, epoch) VALUES (?1, ?2)
                 ON CONFLICT (device, epoch) DO UPDATE SET epoch = excluded.epoch
                 RETURNING id, last_seq",
            )?
            .query_row(params![device, epoch], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let s = (id, u64_from_sql(last_seq));
        self.streams.insert((device, epoch), s);
        Ok(s)
    }

    fn series(&mut self, tx: &Transaction<'_>, device: i64, sensor: &str) -> rusqlite::Result<i64> {
        if let Some(&id) = self.series.get(&device).and_then(|m| m.get(sensor)) {
            return Ok(id);
        }
        let sensor_id: i64 = tx
            .prepare_cached(
                "INSERT INTO sensors (name) VALUES (?1)
                 ON CONFLICT (name) DO UPDATE SET name = excluded.name
                 RETURNING id",
            )?
            .query_row([sensor], |r| r.get(0))?;
        let id: i64 = tx
            .prepare_cached(
                "INSERT INTO series (device, sensor) VALUES (?1, ?2)
                 ON CONFLICT (device, sensor) DO UPDATE SET sensor = excluded.sensor
                 RETURNING id",
            )?
            .query_row(params![device, sensor_id], |r| r.get(0))?;
        self.series
            .entry(device)
            .or_default()
            .insert(sensor.to_owned(), id);
        Ok(id)
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

/// A stream's changes within one batch.
#[derive(Debug, Clone, Copy)]
struct Pending {
    device: i64,
    epoch: i64,
    /// Highest seq stored.
    seq: u64,
    /// Frames stored.
    frames: i64,
    /// Readings stored.
    readings: i64,
    /// Receive time of the newest frame.
    last_ms: i64,
}

/// The writer's connection and caches.
pub struct Batcher {
    conn: Connection,
    cache: Cache,
    /// Whether to queue frames for the MQTT bridge.
    uplink: bool,
    /// What the batch being built does to each stream it touches.
    pending: HashMap<i64, Pending>,
    /// Per frame of the last commit: whether it was stored (false for a resend, or for a
    /// result of a command that was not open).
    kept: Vec<bool>,
    /// Reused encoding buffer for outbox bodies.
    body: Vec<u8>,
}

/// Opens the writer's connection to the store at `path` (already migrated).
pub fn open_connection(path: &Path, durability: Durability) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    let synchronous = match durability {
        Durability::ProcessCrash => "NORMAL",
        Durability::PowerLoss => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {synchronous}; {}",
        &*STORE_PRAGMAS
    ))?;
    Ok(conn)
}

/// What one retention step deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Readings.
    pub readings: u64,
    /// Events.
    pub events: u64,
    /// Finished commands.
    pub commands: u64,
    /// Anomalies that ended.
    pub anomalies: u64,
}

impl Pruned {
    /// All rows.
    pub fn total(&self) -> u64 {
        self.readings + self.events + self.commands + self.anomalies
    }
}

impl Batcher {
    /// A batcher writing on `conn`; `uplink` adds outbox rows for the bridge.
    pub fn new(conn: Connection, uplink: bool) -> Self {
        Self {
            conn,
            cache: Cache::default(),
            uplink,
            pending: HashMap::new(),
            kept: Vec::new(),
            body: Vec::new(),
        }
    }

    /// The writer's connection (for a checkpoint between batches).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Per frame of the last successful [`Batcher::commit`], whether it was stored.
    pub fn kept(&self) -> &[bool] {
        &self.kept
    }

    /// Forgets cached ids (after a failed commit, which may have rolled some back).
    pub fn forget(&mut self) {
        self.cache = Cache::default();
    }

    /// Retention: deletes up to `max_rows` each of readings, events and finished commands
    /// from before `cutoff_ms`, in one transaction. The readings and events lookups seek per
    /// device on the primary key (readings) or its time index (events), so a step costs what
    /// it deletes plus one seek per device. Open commands stay.
    pub fn prune(&mut self, cutoff_ms: i64, max_rows: i64) -> Result<Pruned, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let readings = tx
            .prepare_cached(
                "DELETE FROM readings WHERE (device, ts_ms, series, stream, seq, idx) IN \
                 (SELECT device, ts_ms, series, stream, seq, idx FROM readings \
                  WHERE device IN (SELECT id FROM devices) AND ts_ms < ?1 LIMIT ?2)",
            )?
            .execute(rusqlite::params![cutoff_ms, max_rows])?;
        let events = tx
            .prepare_cached(
                "DELETE FROM event_log WHERE (stream, seq) IN \
                 (SELECT stream, seq FROM event_log \
                  WHERE device IN (SELECT id FROM devices) AND ts_ms < ?1 LIMIT ?2)",
            )?
            .execute(rusqlite::params![cutoff_ms, max_rows])?;
        let commands = tx
            .prepare_cached(
                "DELETE FROM commands WHERE id IN (SELECT id FROM commands \
                 WHERE outcome IS NOT NULL AND finished_ms < ?1 LIMIT ?2)",
            )?
            .execute(rusqlite::params![cutoff_ms, max_rows])?;
        // Anomalies by when they were decided (they are few; the time index finds them).
        let anomalies = tx
            .prepare_cached(
                "DELETE FROM anomaly_log WHERE id IN (SELECT id FROM anomaly_log \
                 WHERE detected_ms < ?1 AND ongoing = 0 LIMIT ?2)",
            )?
            .execute(rusqlite::params![cutoff_ms, max_rows])?;
        tx.commit()?;
        Ok(Pruned {
            readings: readings as u64,
            events: events as u64,
            commands: commands as u64,
            anomalies: anomalies as u64,
        })
    }

    /// Writes anomalies the detector raised or ended (an ongoing one is written again with
    /// its end), and queues each for the MQTT bridge, in one transaction; returns the bytes
    /// added to the outbox.
    pub fn record_anomalies(&mut self, rows: &[Arc<payload::Anomaly>]) -> Result<u64, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut bytes = 0;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO anomaly_log (id, device_id, sensor, kind, detector, score, ts_ms, to_ms,
                     raised_ts_ms, value, detail, detected_ms, peer, ongoing)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (id) DO UPDATE SET to_ms = excluded.to_ms, ongoing = excluded.ongoing",
            )?;
            let mut outbox = tx.prepare_cached(
                "INSERT INTO outbox (kind, device_id, epoch, seq, received_ms, body) VALUES (?1, ?2, 0, ?3, ?4, ?5)",
            )?;
            for a in rows {
                insert.execute(params![
                    a.id,
                    a.device_id,
                    a.sensor,
                    a.kind,
                    a.detector,
                    a.score,
                    a.ts_ms,
                    a.to_ms,
                    a.raised_ts_ms,
                    a.value,
                    a.detail,
                    a.detected_ms,
                    a.peer,
                    a.ongoing
                ])?;
                if self.uplink {
                    let device = a.device_id.as_deref().unwrap_or("");
                    let body = payload::anomaly_json(a);
                    outbox.execute(params![
                        Kind::Anomaly as i64,
                        device,
                        a.id,
                        a.detected_ms,
                        body
                    ])?;
                    bytes += row_cost(device, body.len());
                }
            }
        }
        tx.commit()?;
        Ok(bytes)
    }

    /// Deletes the outbox rows the broker has (every id up to `upto`), in one transaction;
    /// returns (rows, cost).
    pub fn delete_published(&mut self, upto: i64) -> Result<(u64, u64), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (mut rows, mut bytes) = (0, 0);
        {
            let mut stmt = tx.prepare_cached(&format!(
                "DELETE FROM outbox WHERE id <= ?1 RETURNING {}",
                super::outbox::ROW_COST_SQL
            ))?;
            let costs = stmt.query_map([upto], |r| r.get::<_, i64>(0))?;
            for cost in costs {
                rows += 1;
                bytes += cost?.max(0) as u64;
            }
        }
        tx.commit()?;
        Ok((rows, bytes))
    }

    /// Deletes the oldest `n` outbox rows (the `drop-oldest` policy); returns (rows, cost).
    pub fn drop_oldest(&mut self, n: i64) -> Result<(u64, u64), StoreError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?1) RETURNING {}",
            super::outbox::ROW_COST_SQL
        ))?;
        let costs = stmt.query_map([n], |r| r.get::<_, i64>(0))?;
        let (mut rows, mut bytes) = (0, 0);
        for cost in costs {
            rows += 1;
            bytes += cost?.max(0) as u64;
        }
        Ok((rows, bytes))
    }

    /// Stores one batch in one transaction. Frames at or below their stream's stored seq
    /// are skipped (they are durable already).
    pub fn commit(&mut self, batch: &[WriteFrame]) -> Result<Stored, StoreError> {
        let Batcher {
            conn,
            cache,
            uplink,
            pending,
            kept,
            body,
        } = self;
        cache.clear_if_large();
        pending.clear();
        kept.clear();
        let mut stored = Stored::default();
        // IMMEDIATE: the write lock is taken at BEGIN (waiting on the busy handler if another
        // connection holds it), never refused mid-transaction as a stale read snapshot would be.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut reading = tx.prepare_cached(
                "INSERT INTO readings (device, ts_ms, series, stream, seq, idx, value) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut event = tx.prepare_cached(
                "INSERT INTO event_log (stream, seq, device, ts_ms, kind, message, severity)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let mut outbox = tx.prepare_cached(
                "INSERT INTO outbox (kind, device_id, epoch, seq, received_ms, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            let mut result = tx.prepare_cached(
                "UPDATE commands SET outcome = ?1, detail = ?2, finished_ms = ?3, result = ?6
                 WHERE device = ?4 AND command_id = ?5 AND outcome IS NULL",
            )?;
            for frame in batch {
                let device = cache.device(&tx, &frame.device)?;
                let epoch = u64_to_sql(frame.epoch);
                let (stream, committed) = cache.stream(&tx, device, epoch)?;
                let last = pending.get(&stream).map_or(committed, |p| p.seq);
                if frame.seq <= last {
                    kept.push(false);
                    continue; // already stored: acknowledged again, not stored twice
                }
                let p = pending.entry(stream).or_insert(Pending {
                    device,
                    epoch,
                    seq: 0,
                    frames: 0,
                    readings: 0,
                    last_ms: 0,
                });
                p.seq = frame.seq;
                p.frames += 1;
                p.last_ms = p.last_ms.max(frame.received_ms);
                stored.frames += 1;
                let seq = u64_to_sql(frame.seq);
                kept.push(true);
                let kind = match &frame.body {
                    FrameBody::Telemetry(t) => {
                        for (idx, r) in t.readings.iter().enumerate() {
                            let series = cache.series(&tx, device, &r.sensor)?;
                            let value = (!r.value.is_nan()).then_some(r.value);
                            let ts = timestamp(r.timestamp_ms, frame.received_ms);
                            reading.execute(params![
                                device, ts, series, stream, seq, idx as i64, value
                            ])?;
                        }
                        stored.readings += t.readings.len() as u64;
                        if let Some(p) = pending.get_mut(&stream) {
                            p.readings += t.readings.len() as i64;
                        }
                        body.clear();
                        t.encode(body)
                            .map_err(|e| StoreError::Encode(e.to_string()))?;
                        Kind::Telemetry
                    }
                    FrameBody::Event(e) => {
                        let ts = timestamp(e.timestamp_ms, frame.received_ms);
                        event.execute(params![
                            stream, seq, device, ts, e.kind, e.message, e.severity
                        ])?;
                        body.clear();
                        e.encode(body)
                            .map_err(|e| StoreError::Encode(e.to_string()))?;
                        Kind::Event
                    }
                    FrameBody::CommandResult(r) => {
                        // The first outcome of an open command wins; a late or unknown result
                        // is acknowledged and dropped.
                        let status = payload::status_name(r);
                        let changed = result.execute(params![
                            status,
                            r.detail,
                            frame.received_ms,
                            device,
                            r.id,
                            (!r.payload.is_empty()).then_some(&r.payload[..])
                        ])?;
                        if changed == 0 {
                            tracing::debug!(device = %frame.device, command = %r.id, "result for a command that is not open; ignored");
                            if let Some(k) = kept.last_mut() {
                                *k = false;
                            }
                            continue;
                        }
                        *body = payload::command_result_json(
                            &frame.device,
                            &r.id,
                            status,
                            &r.detail,
                            &r.payload,
                            frame.received_ms,
                        );
                        Kind::CommandResult
                    }
                };
                if *uplink {
                    outbox.execute(params![
                        kind as i64,
                        &*frame.device,
                        epoch,
                        seq,
                        frame.received_ms,
                        &body[..]
                    ])?;
                    stored.outbox_bytes += row_cost(&frame.device, body.len());
                }
            }
            let mut seqs = tx.prepare_cached(
                "UPDATE streams SET last_seq = ?1, frames = frames + ?3, readings = readings + ?5,
                 last_ms = MAX(COALESCE(last_ms, 0), ?4) WHERE id = ?2",
            )?;
            for (stream, p) in pending.iter() {
                seqs.execute(params![
                    u64_to_sql(p.seq),
                    stream,
                    p.frames,
                    p.last_ms,
                    p.readings
                ])?;
            }
        }
        tx.commit()?;
        for (stream, p) in pending.iter() {
            cache.streams.insert((p.device, p.epoch), (*stream, p.seq));
        }
        Ok(stored)
    }
}
