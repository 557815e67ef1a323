//! Readings of a device by their timestamps: raw pages merged over its series in key order,
//! and per-step aggregates, each a primary-key seek per series.

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
