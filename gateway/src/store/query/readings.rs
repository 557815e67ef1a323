//! Readings of a device by their timestamps: raw pages in key order (one primary-key range
//! of the device), and per-step aggregates (one range per series).

use sqlx::SqlitePool;

use crate::store::{u64_from_sql, StoreError};

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

/// A device's series as the readings queries read them.
#[derive(Debug, Clone, Default)]
pub struct SeriesSet {
    /// The device's row id (the first column of the readings key).
    pub device: i64,
    /// Each series id with its sensor name, by id.
    pub series: Vec<(i64, String)>,
    /// The request named one sensor: only its series is read.
    pub one: bool,
}

/// (ts_ms, series, stream, seq, idx, value, epoch).
type ReadingRow = (i64, i64, i64, i64, i64, Option<f64>, i64);

/// SQL for a page of a device's readings, in key order: the device's rows in the time
/// range are one stretch of the primary key (device, ts_ms, series, stream, seq, idx), so a
/// page reads its rows (and the other sensors' rows between them when one sensor is asked).
pub fn readings_sql(order: Order) -> &'static str {
    match order {
        Order::Asc => {
            "SELECT r.ts_ms, r.series, r.stream, r.seq, r.idx, r.value, st.epoch FROM readings r
             JOIN streams st ON st.id = r.stream
             WHERE r.device = ?1 AND (?2 IS NULL OR r.series = ?2)
               AND (r.ts_ms, r.series, r.stream, r.seq, r.idx) > (?3, ?4, ?5, ?6, ?7)
               AND r.ts_ms >= ?8 AND r.ts_ms < ?9
             ORDER BY r.ts_ms, r.series, r.stream, r.seq, r.idx LIMIT ?10"
        }
        Order::Desc => {
            "SELECT r.ts_ms, r.series, r.stream, r.seq, r.idx, r.value, st.epoch FROM readings r
             JOIN streams st ON st.id = r.stream
             WHERE r.device = ?1 AND (?2 IS NULL OR r.series = ?2)
               AND (r.ts_ms, r.series, r.stream, r.seq, r.idx) < (?3, ?4, ?5, ?6, ?7)
               AND r.ts_ms >= ?8 AND r.ts_ms < ?9
             ORDER BY r.ts_ms DESC, r.series DESC, r.stream DESC, r.seq DESC, r.idx DESC LIMIT ?10"
        }
    }
}

/// A page of a device's readings (of one sensor when `set.one`), in timestamp order; the
/// second value is the cursor of the next page, if there may be one.
pub async fn readings(
    pool: &SqlitePool,
    set: &SeriesSet,
    range: Range,
    after: Option<ReadingKey>,
) -> Result<(Vec<ReadingRecord>, Option<ReadingKey>), StoreError> {
    if set.series.is_empty() {
        return Ok((Vec::new(), None));
    }
    // Where the page starts: after the cursor, or at the range's edge in the page's order.
    let start = after.unwrap_or(ReadingKey {
        ts_ms: match range.order {
            Order::Asc => range.from,
            Order::Desc => range.to,
        },
        series: i64::MIN,
        stream: i64::MIN,
        seq: i64::MIN,
        idx: i64::MIN,
    });
    let rows: Vec<ReadingRow> = sqlx::query_as(readings_sql(range.order))
        .bind(set.device)
        .bind(set.one.then(|| set.series[0].0))
        .bind(start.ts_ms)
        .bind(start.series)
        .bind(start.stream)
        .bind(start.seq)
        .bind(start.idx)
        .bind(range.from)
        .bind(range.to)
        .bind(range.limit)
        .fetch_all(pool)
        .await?;
    let all: Vec<ReadingRecord> = rows
        .into_iter()
        .filter_map(|r| {
            // A series created after `set` was read has no name here; the next page has it.
            let (_, name) = set.series.iter().find(|(id, _)| *id == r.1)?;
            Some(ReadingRecord {
                key: ReadingKey {
                    ts_ms: r.0,
                    series: r.1,
                    stream: r.2,
                    seq: r.3,
                    idx: r.4,
                },
                sensor: name.clone(),
                value: r.5,
                epoch: u64_from_sql(r.6),
            })
        })
        .collect();
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
             FROM readings WHERE device = ?6 AND ts_ms >= ?3 AND ts_ms < ?4 AND series = ?1
             GROUP BY bucket ORDER BY bucket LIMIT ?5"
        }
        Order::Desc => {
            "SELECT (ts_ms / ?2) * ?2 AS bucket, MIN(value), MAX(value), AVG(value), COUNT(value)
             FROM readings WHERE device = ?6 AND ts_ms >= ?3 AND ts_ms < ?4 AND series = ?1
             GROUP BY bucket ORDER BY bucket DESC LIMIT ?5"
        }
    }
}

/// A page of per-`step_ms` aggregates of `series`, merged by (step, series); the cursor of
/// the next page is (bucket start, series).
pub async fn buckets(
    pool: &SqlitePool,
    set: &SeriesSet,
    step_ms: i64,
    range: Range,
    after: Option<(i64, i64)>,
) -> Result<(Vec<Bucket>, Option<(i64, i64)>), StoreError> {
    let mut all = Vec::new();
    for (id, name) in &set.series {
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
            .bind(set.device)
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
