//! The read side the operator API uses: devices with what the store knows of them, sensors
//! with their last reading, readings and per-step aggregates by the device's timestamps,
//! events, and commands. Runs on the read pool, never on the writer's connection.
//!
//! Every query seeks an index: readings by their primary key (device, ts_ms, series, ...), so
//! a page of a device's readings is one range of it and costs the rows it returns (and, when
//! one sensor is asked, the device's other sensors' rows between them) whatever the table
//! holds; events by `(device, ts_ms)` or `(ts_ms)`.
//! Pages continue from an opaque cursor, the position of the last row returned.

mod anomalies;
mod events;
mod readings;

pub use anomalies::*;
pub use events::*;
pub use readings::*;

use sqlx::SqlitePool;

use super::{u64_from_sql, StoreError};

/// One device as the store knows it.
#[derive(Debug, Clone, Default)]
pub struct DeviceRecord {
    /// The device's id.
    pub device_id: String,
    /// Provisioned with a per-device token.
    pub has_token: bool,
    /// When it was revoked.
    pub revoked_at_ms: Option<i64>,
    /// When it was provisioned or first seen.
    pub created_at_ms: i64,
    /// From its latest Hello.
    pub firmware_version: Option<String>,
    /// From its latest Hello.
    pub last_link: Option<String>,
    /// From its latest Hello.
    pub last_peer: Option<String>,
    /// When it last said Hello.
    pub last_hello_ms: Option<i64>,
    /// Its streams (one per epoch), oldest first.
    pub streams: Vec<StreamRecord>,
}

/// One (device, epoch) sequence space.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamRecord {
    /// The epoch.
    pub epoch: u64,
    /// Highest seq stored.
    pub last_seq: u64,
    /// Frames stored.
    pub frames: u64,
    /// Readings stored.
    pub readings: u64,
    /// When its last frame was received, Unix ms.
    pub last_ms: Option<i64>,
}

impl DeviceRecord {
    /// Frames stored over every epoch.
    pub fn frames_total(&self) -> u64 {
        self.streams.iter().map(|s| s.frames).sum()
    }

    /// Readings stored over every epoch.
    pub fn readings_total(&self) -> u64 {
        self.streams.iter().map(|s| s.readings).sum()
    }

    /// The stream of `epoch`, or else the one that received data last.
    pub fn current(&self, epoch: Option<u64>) -> Option<&StreamRecord> {
        match epoch {
            Some(e) => self.streams.iter().find(|s| s.epoch == e),
            None => self.streams.iter().max_by_key(|s| s.last_ms.unwrap_or(0)),
        }
    }

    /// When data or a Hello was last received.
    pub fn last_seen_ms(&self) -> Option<i64> {
        self.streams
            .iter()
            .filter_map(|s| s.last_ms)
            .chain(self.last_hello_ms)
            .max()
    }
}

type DeviceRow = (
    String,
    bool,
    Option<i64>,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);

const DEVICE_COLUMNS: &str =
    "d.device_id, d.token_hash IS NOT NULL, d.revoked_at_ms, d.created_at_ms,
    d.firmware_version, d.last_link, d.last_peer, d.last_hello_ms,
    s.epoch, s.last_seq, s.frames, s.last_ms, s.readings";

fn group(rows: Vec<DeviceRow>) -> Vec<DeviceRecord> {
    let mut out: Vec<DeviceRecord> = Vec::new();
    for r in rows {
        if out.last().is_none_or(|d| d.device_id != r.0) {
            out.push(DeviceRecord {
                device_id: r.0,
                has_token: r.1,
                revoked_at_ms: r.2,
                created_at_ms: r.3,
                firmware_version: r.4,
                last_link: r.5,
                last_peer: r.6,
                last_hello_ms: r.7,
                streams: Vec::new(),
            });
        }
        if let (Some(epoch), Some(last_seq), Some(frames), Some(d)) =
            (r.8, r.9, r.10, out.last_mut())
        {
            d.streams.push(StreamRecord {
                epoch: u64_from_sql(epoch),
                last_seq: u64_from_sql(last_seq),
                frames: frames.max(0) as u64,
                readings: r.12.unwrap_or(0).max(0) as u64,
                last_ms: r.11,
            });
        }
    }
    out
}

/// Up to `limit` devices with an id after `after`, by id.
pub async fn devices(
    pool: &SqlitePool,
    after: &str,
    limit: u32,
) -> Result<Vec<DeviceRecord>, StoreError> {
    let rows: Vec<DeviceRow> = sqlx::query_as(&format!(
        "SELECT {DEVICE_COLUMNS} FROM
           (SELECT * FROM devices WHERE device_id > ? ORDER BY device_id LIMIT ?) d
         LEFT JOIN streams s ON s.device = d.id
         ORDER BY d.device_id, s.id"
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(group(rows))
}

/// The device `device_id`, if the store knows it.
pub async fn device(
    pool: &SqlitePool,
    device_id: &str,
) -> Result<Option<DeviceRecord>, StoreError> {
    let rows: Vec<DeviceRow> = sqlx::query_as(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices d LEFT JOIN streams s ON s.device = d.id
         WHERE d.device_id = ? ORDER BY s.id"
    ))
    .bind(device_id)
    .fetch_all(pool)
    .await?;
    Ok(group(rows).pop())
}

/// A sensor of a device and its newest reading.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorRecord {
    /// The sensor's name.
    pub name: String,
    /// Timestamp of its newest reading.
    pub last_ts_ms: Option<i64>,
    /// Value of its newest reading (`None` for NaN).
    pub last_value: Option<f64>,
}

/// The device's sensors by name, each with its newest reading: one backward scan of the
/// device's newest rows per sensor, which stops at that sensor's newest reading.
pub async fn sensors(pool: &SqlitePool, device_id: &str) -> Result<Vec<SensorRecord>, StoreError> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT s.name, se.id, se.device FROM series se
         JOIN sensors s ON s.id = se.sensor
         JOIN devices d ON d.id = se.device
         WHERE d.device_id = ? ORDER BY s.name",
    )
    .bind(device_id)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (name, series, device) in rows {
        let last: Option<(i64, Option<f64>)> = sqlx::query_as(
            "SELECT ts_ms, value FROM readings WHERE device = ? AND series = ?
             ORDER BY ts_ms DESC LIMIT 1",
        )
        .bind(device)
        .bind(series)
        .fetch_optional(pool)
        .await?;
        out.push(SensorRecord {
            name,
            last_ts_ms: last.map(|l| l.0),
            last_value: last.and_then(|l| l.1),
        });
    }
    Ok(out)
}

/// The device's series (id and sensor name), by id; only `sensor`'s when given.
pub async fn series(
    pool: &SqlitePool,
    device_id: &str,
    sensor: Option<&str>,
) -> Result<SeriesSet, StoreError> {
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT se.device, se.id, s.name FROM series se
         JOIN sensors s ON s.id = se.sensor
         JOIN devices d ON d.id = se.device
         WHERE d.device_id = ?1 AND (?2 IS NULL OR s.name = ?2) ORDER BY se.id",
    )
    .bind(device_id)
    .bind(sensor)
    .fetch_all(pool)
    .await?;
    Ok(SeriesSet {
        device: rows.first().map_or(0, |r| r.0),
        series: rows.into_iter().map(|r| (r.1, r.2)).collect(),
        one: sensor.is_some(),
    })
}
/// A stored command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    /// The device.
    pub device_id: String,
    /// Its id.
    pub command_id: String,
    /// What to do.
    pub name: String,
    /// JSON text of its params.
    pub params: Vec<u8>,
    /// When it arrived, Unix ms.
    pub created_ms: i64,
    /// Its deadline, Unix ms.
    pub deadline_ms: i64,
    /// When it was first written to the device.
    pub sent_ms: Option<i64>,
    /// Its outcome, once it has one.
    pub outcome: Option<String>,
    /// Detail of the outcome.
    pub detail: Option<String>,
    /// The device's result payload.
    pub result: Option<Vec<u8>>,
    /// When it got its outcome.
    pub finished_ms: Option<i64>,
}

/// Commands with id `command_id` (of `device_id` only, when given); more than one when
/// several devices used the same id.
pub async fn commands(
    pool: &SqlitePool,
    command_id: &str,
    device_id: Option<&str>,
) -> Result<Vec<CommandRecord>, StoreError> {
    type Row = (
        String,
        String,
        String,
        Vec<u8>,
        i64,
        i64,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<Vec<u8>>,
        Option<i64>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT d.device_id, c.command_id, c.name, c.params, c.created_ms, c.deadline_ms,
                c.sent_ms, c.outcome, c.detail, c.result, c.finished_ms
         FROM commands c JOIN devices d ON d.id = c.device
         WHERE c.command_id = ?1 AND (?2 IS NULL OR d.device_id = ?2) ORDER BY c.id LIMIT 10",
    )
    .bind(command_id)
    .bind(device_id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| CommandRecord {
            device_id: r.0,
            command_id: r.1,
            name: r.2,
            params: r.3,
            created_ms: r.4,
            deadline_ms: r.5,
            sent_ms: r.6,
            outcome: r.7,
            detail: r.8,
            result: r.9,
            finished_ms: r.10,
        })
        .collect())
}
