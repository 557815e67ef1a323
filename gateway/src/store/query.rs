//! The read side the operator API uses: devices with what the store knows of them, sensors
//! with their last reading, readings and per-step aggregates by the device's timestamps,
//! events, and commands. Runs on the read pool, never on the writer's connection.
//!
//! Every query seeks an index: readings by their primary key (series, ts_ms, ...), one query
//! per series merged in memory (a device has a handful of sensors), so a page costs at most
//! `limit` rows per series whatever the table holds; events by `(device, ts_ms)` or `(ts_ms)`.
//! Pages continue from an opaque cursor, the position of the last row returned.

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

/// The device's sensors by name, each with its newest reading (one index seek each).
pub async fn sensors(pool: &SqlitePool, device_id: &str) -> Result<Vec<SensorRecord>, StoreError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.name, se.id FROM series se
         JOIN sensors s ON s.id = se.sensor
         JOIN devices d ON d.id = se.device
         WHERE d.device_id = ? ORDER BY s.name",
    )
    .bind(device_id)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for (name, series) in rows {
        let last: Option<(i64, Option<f64>)> = sqlx::query_as(
            "SELECT ts_ms, value FROM readings WHERE series = ? ORDER BY ts_ms DESC LIMIT 1",
        )
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

/// The device's series (id and sensor name), by id; only `sensor` when given.
pub async fn series(
    pool: &SqlitePool,
    device_id: &str,
    sensor: Option<&str>,
) -> Result<Vec<(i64, String)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT se.id, s.name FROM series se
         JOIN sensors s ON s.id = se.sensor
         JOIN devices d ON d.id = se.device
         WHERE d.device_id = ?1 AND (?2 IS NULL OR s.name = ?2) ORDER BY se.id",
    )
    .bind(device_id)
    .bind(sensor)
    .fetch_all(pool)
    .await?)
}

/// Newest or oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first.
    Desc,
}

/// A page request over readings or aggregates: the device's timestamps in `[from, to)`.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    /// First timestamp included, Unix ms.
    pub from: i64,
    /// First timestamp excluded, Unix ms.
    pub to: i64,
    /// Rows (or buckets) per page.
    pub limit: u32,
    /// Direction.
    pub order: Order,
}

/// A reading's position in the merged order of a device's readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadingKey {
    /// Its timestamp.
    pub ts_ms: i64,
    /// Its series.
    pub series: i64,
    /// Its stream.
    pub stream: i64,
    /// Its frame's seq.
    pub seq: i64,
    /// Its place in the frame.
    pub idx: i64,
}

impl ReadingKey {
    /// The cursor text of this position.
    pub fn to_cursor(&self) -> String {
        format!(
            "{}_{}_{}_{}_{}",
            self.ts_ms, self.series, self.stream, self.seq, self.idx
        )
    }

    /// Parses [`ReadingKey::to_cursor`]'s text.
    pub fn from_cursor(text: &str) -> Option<Self> {
        let mut parts = text.split('_').map(|p| p.parse::<i64>().ok());
        let key = Self {
            ts_ms: parts.next()??,
            series: parts.next()??,
            stream: parts.next()??,
            seq: parts.next()??,
            idx: parts.next()??,
        };
        parts.next().is_none().then_some(key)
    }
}

/// One stored reading.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingRecord {
    /// Its position (the cursor of the page it ends).
    pub key: ReadingKey,
    /// Its sensor.
    pub sensor: String,
    /// Its value (`None` for NaN).
    pub value: Option<f64>,
    /// Its frame's epoch.
    pub epoch: u64,
}

/// The row-value bound for `series` of a page that continues after `after` (or starts at
/// the range's edge): rows strictly past it in the page's order belong to the page.
fn bound(series: i64, range: &Range, after: Option<&ReadingKey>) -> (i64, i64, i64, i64) {
    let (lo, hi) = (i64::MIN, i64::MAX);
    match (range.order, after) {
        (Order::Asc, None) => (range.from, lo, lo, lo),
        (Order::Desc, None) => (range.to, lo, lo, lo),
        (order, Some(a)) => {
            // Within the cursor's timestamp, series order decides which rows are left.
            let past_cursor_series = match order {
                Order::Asc => series > a.series,
                Order::Desc => series < a.series,
            };
            match (order, series == a.series, past_cursor_series) {
                (_, true, _) => (a.ts_ms, a.stream, a.seq, a.idx),
                (Order::Asc, false, true) => (a.ts_ms, lo, lo, lo),
                (Order::Asc, false, false) => (a.ts_ms, hi, hi, hi),
                (Order::Desc, false, true) => (a.ts_ms, hi, hi, hi),
                (Order::Desc, false, false) => (a.ts_ms, lo, lo, lo),
            }
        }
    }
}

/// SQL for one series' page of readings.
pub fn readings_sql(order: Order) -> &'static str {
    match order {
        Order::Asc => {
            "SELECT r.ts_ms, r.stream, r.seq, r.idx, r.value, st.epoch FROM readings r
             JOIN streams st ON st.id = r.stream
             WHERE r.series = ?1 AND (r.ts_ms, r.stream, r.seq, r.idx) > (?2, ?3, ?4, ?5)
               AND r.ts_ms >= ?6 AND r.ts_ms < ?7
             ORDER BY r.ts_ms, r.stream, r.seq, r.idx LIMIT ?8"
        }
        Order::Desc => {
            "SELECT r.ts_ms, r.stream, r.seq, r.idx, r.value, st.epoch FROM readings r
             JOIN streams st ON st.id = r.stream
             WHERE r.series = ?1 AND (r.ts_ms, r.stream, r.seq, r.idx) < (?2, ?3, ?4, ?5)
               AND r.ts_ms >= ?6 AND r.ts_ms < ?7
             ORDER BY r.ts_ms DESC, r.stream DESC, r.seq DESC, r.idx DESC LIMIT ?8"
        }
    }
}

/// A page of readings of `series` (id, sensor name), merged in timestamp order; the
/// second value is the cursor of the next page, if there may be one.
pub async fn readings(
    pool: &SqlitePool,
    series: &[(i64, String)],
    range: Range,
    after: Option<ReadingKey>,
) -> Result<(Vec<ReadingRecord>, Option<ReadingKey>), StoreError> {
    let mut all = Vec::new();
    for (id, name) in series {
        let b = bound(*id, &range, after.as_ref());
        let rows: Vec<(i64, i64, i64, i64, Option<f64>, i64)> =
            sqlx::query_as(readings_sql(range.order))
                .bind(id)
                .bind(b.0)
                .bind(b.1)
                .bind(b.2)
                .bind(b.3)
                .bind(range.from)
                .bind(range.to)
                .bind(range.limit)
                .fetch_all(pool)
                .await?;
        all.extend(rows.into_iter().map(|r| ReadingRecord {
            key: ReadingKey {
                ts_ms: r.0,
                series: *id,
                stream: r.1,
                seq: r.2,
                idx: r.3,
            },
            sensor: name.clone(),
            value: r.4,
            epoch: u64_from_sql(r.5),
        }));
    }
    all.sort_by_key(|r| r.key);
    if range.order == Order::Desc {
        all.reverse();
    }
    all.truncate(range.limit as usize);
    let next = (all.len() == range.limit as usize)
        .then(|| all.last().map(|r| r.key))
        .flatten();
    Ok((all, next))
}

/// Readings of one series aggregated over one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// The sensor.
    pub sensor: String,
    /// The series (part of the cursor).
    pub series: i64,
    /// Start of the step, Unix ms (a multiple of the step).
    pub ts_ms: i64,
    /// Smallest value.
    pub min: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
    /// Mean value.
    pub avg: Option<f64>,
    /// Readings with a value (NaN left out).
    pub count: i64,
}

/// (bucket, min, max, avg, count).
type BucketRow = (i64, Option<f64>, Option<f64>, Option<f64>, i64);

/// SQL for one series' page of step aggregates.
pub fn buckets_sql(order: Order) -> &'static str {
    match order {
        Order::Asc => {
            "SELECT (ts_ms / ?2) * ?2 AS bucket, MIN(value), MAX(value), AVG(value), COUNT(value)
             FROM readings WHERE series = ?1 AND ts_ms >= ?3 AND ts_ms < ?4
             GROUP BY bucket ORDER BY bucket LIMIT ?5"
        }
        Order::Desc => {
            "SELECT (ts_ms / ?2) * ?2 AS bucket, MIN(value), MAX(value), AVG(value), COUNT(value)
             FROM readings WHERE series = ?1 AND ts_ms >= ?3 AND ts_ms < ?4
             GROUP BY bucket ORDER BY bucket DESC LIMIT ?5"
        }
    }
}

/// A page of per-`step_ms` aggregates of `series`, merged by (step, series); the cursor of
/// the next page is (bucket start, series).
pub async fn buckets(
    pool: &SqlitePool,
    series: &[(i64, String)],
    step_ms: i64,
    range: Range,
    after: Option<(i64, i64)>,
) -> Result<(Vec<Bucket>, Option<(i64, i64)>), StoreError> {
    let mut all = Vec::new();
    for (id, name) in series {
        // Whole steps only: the range's edges are rounded down to a step.
        let (mut from, mut to) = (range.from - range.from.rem_euclid(step_ms), range.to);
        if let Some((bucket, cursor_series)) = after {
            match range.order {
                Order::Asc if *id > cursor_series => from = from.max(bucket),
                Order::Asc => from = from.max(bucket.saturating_add(step_ms)),
                Order::Desc if *id < cursor_series => to = to.min(bucket.saturating_add(step_ms)),
                Order::Desc => to = to.min(bucket),
            }
        }
        let rows: Vec<BucketRow> = sqlx::query_as(buckets_sql(range.order))
            .bind(id)
            .bind(step_ms)
            .bind(from)
            .bind(to)
            .bind(range.limit)
            .fetch_all(pool)
            .await?;
        all.extend(rows.into_iter().map(|r| Bucket {
            sensor: name.clone(),
            series: *id,
            ts_ms: r.0,
            min: r.1,
            max: r.2,
            avg: r.3,
            count: r.4,
        }));
    }
    all.sort_by_key(|b| (b.ts_ms, b.series));
    if range.order == Order::Desc {
        all.reverse();
    }
    all.truncate(range.limit as usize);
    let next = (all.len() == range.limit as usize)
        .then(|| all.last().map(|b| (b.ts_ms, b.series)))
        .flatten();
    Ok((all, next))
}

/// One stored event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    /// The device.
    pub device_id: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its seq.
    pub seq: u64,
    /// The device's timestamp.
    pub ts_ms: i64,
    /// Kind.
    pub kind: String,
    /// Message.
    pub message: String,
    /// Severity number.
    pub severity: i32,
    /// Cursor position (ts_ms, stream, seq).
    pub key: (i64, i64, i64),
}

/// (device_id, epoch, seq, ts_ms, kind, message, severity, stream).
type EventRow = (String, i64, i64, i64, String, String, i32, i64);

/// SQL for a page of events, oldest first, of one device (`?1` its id) or of all
/// (`?1` NULL).
pub fn events_sql(device: bool) -> &'static str {
    if device {
        "SELECT d.device_id, st.epoch, e.seq, e.ts_ms, e.kind, e.message, e.severity, e.stream
         FROM event_log e JOIN streams st ON st.id = e.stream JOIN devices d ON d.id = e.device
         WHERE e.device = (SELECT id FROM devices WHERE device_id = ?1)
           AND (e.ts_ms, e.stream, e.seq) > (?2, ?3, ?4) AND e.ts_ms < ?5
         ORDER BY e.ts_ms, e.stream, e.seq LIMIT ?6"
    } else {
        "SELECT d.device_id, st.epoch, e.seq, e.ts_ms, e.kind, e.message, e.severity, e.stream
         FROM event_log e JOIN streams st ON st.id = e.stream JOIN devices d ON d.id = e.device
         WHERE ?1 IS NULL AND (e.ts_ms, e.stream, e.seq) > (?2, ?3, ?4) AND e.ts_ms < ?5
         ORDER BY e.ts_ms, e.stream, e.seq LIMIT ?6"
    }
}

/// A page of events (of `device_id`, or of every device), oldest first, from `from` (or
/// after the cursor `after`) to `to`.
pub async fn events(
    pool: &SqlitePool,
    device_id: Option<&str>,
    from: i64,
    to: i64,
    limit: u32,
    after: Option<(i64, i64, i64)>,
) -> Result<(Vec<EventRecord>, Option<(i64, i64, i64)>), StoreError> {
    let b = after.unwrap_or((from, i64::MIN, i64::MIN));
    let rows: Vec<EventRow> = sqlx::query_as(events_sql(device_id.is_some()))
        .bind(device_id)
        .bind(b.0.max(from))
        .bind(if b.0 >= from { b.1 } else { i64::MIN })
        .bind(if b.0 >= from { b.2 } else { i64::MIN })
        .bind(to)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    let out: Vec<EventRecord> = rows
        .into_iter()
        .map(|r| EventRecord {
            device_id: r.0,
            epoch: u64_from_sql(r.1),
            seq: u64_from_sql(r.2),
            ts_ms: r.3,
            kind: r.4,
            message: r.5,
            severity: r.6,
            key: (r.3, r.7, r.2),
        })
        .collect();
    let next = (out.len() == limit as usize)
        .then(|| out.last().map(|e| e.key))
        .flatten();
    Ok((out, next))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_as_the_same_position_and_junk_is_refused() {
        let k = ReadingKey {
            ts_ms: 1_700_000_000_000,
            series: 3,
            stream: -2,
            seq: 9,
            idx: 0,
        };
        assert_eq!(ReadingKey::from_cursor(&k.to_cursor()), Some(k));
        assert_eq!(ReadingKey::from_cursor("1_2_3_4"), None);
        assert_eq!(ReadingKey::from_cursor("1_2_3_4_5_6"), None);
        assert_eq!(ReadingKey::from_cursor("a_2_3_4_5"), None);
    }
}
