//! Stored data by the device's own timestamps: `/api/v1/devices/{id}/readings` (raw, or
//! min/max/avg/count per `step`), `/api/v1/devices/{id}/events` and `/api/v1/events`. Pages
//! continue from the `next` cursor of the previous one.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::params::Params;
use super::ApiState;
use crate::payload::severity_name;
use crate::store::now_ms;
use crate::store::query::{self, Order, Range, ReadingKey};

/// Most buckets of one `step` query's range, so a step too fine for the range is refused
/// rather than scanning for minutes.
const MAX_BUCKETS_SPAN: i64 = 1_000_000;

/// One reading.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reading {
    /// Sensor name.
    pub sensor: String,
    /// The device's timestamp, Unix ms.
    pub ts_ms: i64,
    /// The value; null where the device sent NaN.
    pub value: Option<f64>,
    /// Epoch of its frame.
    pub epoch: u64,
    /// Seq of its frame.
    pub seq: u64,
}

/// Readings of one step of one sensor.
#[derive(Debug, Serialize, ToSchema)]
pub struct Bucket {
    /// Sensor name.
    pub sensor: String,
    /// Start of the step, Unix ms (a multiple of the step).
    pub ts_ms: i64,
    /// Smallest value.
    pub min: Option<f64>,
    /// Largest value.
    pub max: Option<f64>,
    /// Mean value.
    pub avg: Option<f64>,
    /// Readings with a value in the step.
    pub count: i64,
}

/// A page of readings, or of step aggregates with `step`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadingPage {
    /// The device.
    pub device_id: String,
    /// `asc` (oldest first) or `desc` (newest first).
    pub order: String,
    /// The step in ms, when aggregated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<i64>,
    /// Raw readings (without `step`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub readings: Option<Vec<Reading>>,
    /// Aggregates (with `step`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buckets: Option<Vec<Bucket>>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

fn step_cursor(text: &str) -> Option<(i64, i64)> {
    let (bucket, series) = text.split_once('_')?;
    Some((bucket.parse().ok()?, series.parse().ok()?))
}

/// A device's readings by their timestamps, or per-step aggregates with `step`.
#[utoipa::path(get, path = "/api/v1/devices/{id}/readings", tag = "data",
    params(
        ("id" = String, Path, description = "Device id"),
        ("sensor" = Option<String>, Query, description = "Only this sensor"),
        ("from" = Option<String>, Query, description = "First timestamp included: Unix ms, RFC 3339, or a duration ago like -1h"),
        ("to" = Option<String>, Query, description = "First timestamp excluded (same forms)"),
        ("order" = Option<String>, Query, description = "asc or desc (default desc: newest first)"),
        ("limit" = Option<u32>, Query, description = "Readings (or buckets) per page, 1 to 10000 (default 1000)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
        ("step" = Option<String>, Query, description = "Aggregate per step, e.g. 1m, 15m, 1h"),
    ),
    responses((status = 200, body = ReadingPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn readings(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<ReadingPage>, ApiError> {
    let p = Params::new(
        query,
        &["sensor", "from", "to", "order", "limit", "after", "step"],
    )?;
    let now = now_ms();
    let order = match p.choice("order", &["asc", "desc"], "desc")? {
        "asc" => Order::Asc,
        _ => Order::Desc,
    };
    let range = Range {
        from: p.time("from", now)?.unwrap_or(0).max(0),
        to: p.time("to", now)?.unwrap_or(i64::MAX),
        limit: p.limit("limit", 1000, 10_000)?,
        order,
    };
    if range.from >= range.to {
        return Err(ApiError::parameter("to", "must be after `from`"));
    }
    let step = p.duration("step", Duration::from_millis(1))?;
    if query::device(&state.pool, &id).await?.is_none() {
        return Err(ApiError::unknown_device(&id));
    }
    let series = query::series(&state.pool, &id, p.text("sensor")).await?;
    let order_name = p.choice("order", &["asc", "desc"], "desc")?.to_owned();
    match step {
        None => {
            let after = p
                .text("after")
                .map(|a| {
                    ReadingKey::from_cursor(a)
                        .ok_or_else(|| ApiError::parameter("after", "not a cursor of this route"))
                })
                .transpose()?;
            let (rows, next) = query::readings(&state.pool, &series, range, after).await?;
            Ok(Json(ReadingPage {
                device_id: id,
                order: order_name,
                step_ms: None,
                readings: Some(
                    rows.into_iter()
                        .map(|r| Reading {
                            sensor: r.sensor,
                            ts_ms: r.key.ts_ms,
                            value: r.value,
                            epoch: r.epoch,
                            seq: r.key.seq as u64,
                        })
                        .collect(),
                ),
                buckets: None,
                next: next.map(|k| k.to_cursor()),
            }))
        }
        Some(step) => {
            let step_ms = step.as_millis().min(i64::MAX as u128) as i64;
            if range.to != i64::MAX && (range.to - range.from) / step_ms > MAX_BUCKETS_SPAN {
                return Err(ApiError::parameter(
                    "step",
                    format!("too fine for the range: more than {MAX_BUCKETS_SPAN} steps"),
                ));
            }
            let after = p
                .text("after")
                .map(|a| {
                    step_cursor(a)
                        .ok_or_else(|| ApiError::parameter("after", "not a cursor of this route"))
                })
                .transpose()?;
            let (rows, next) = query::buckets(&state.pool, &series, step_ms, range, after).await?;
            Ok(Json(ReadingPage {
                device_id: id,
                order: order_name,
                step_ms: Some(step_ms),
                readings: None,
                buckets: Some(
                    rows.into_iter()
                        .map(|b| Bucket {
                            sensor: b.sensor,
                            ts_ms: b.ts_ms,
                            min: b.min,
                            max: b.max,
                            avg: b.avg,
                            count: b.count,
                        })
                        .collect(),
                ),
                next: next.map(|(bucket, series)| format!("{bucket}_{series}")),
            }))
        }
    }
}

/// One event, in the shape the MQTT events topic carries.
#[derive(Debug, Serialize, ToSchema)]
pub struct Event {
    /// The device.
    pub device_id: String,
    /// Its epoch.
    pub epoch: u64,
    /// Its seq.
    pub seq: u64,
    /// Kind.
    pub kind: String,
    /// Message.
    pub message: String,
    /// `debug`, `info`, `warning`, `error` or `critical`.
    pub severity: String,
    /// The device's timestamp, Unix ms.
    pub ts_ms: i64,
}

/// A page of events, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    /// Events.
    pub events: Vec<Event>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

async fn event_page(
    state: &ApiState,
    device: Option<&str>,
    p: &Params,
    from_name: &str,
) -> Result<EventPage, ApiError> {
    let now = now_ms();
    let from = p.time(from_name, now)?.unwrap_or(0);
    let to = p.time("to", now)?.unwrap_or(i64::MAX);
    let limit = p.limit("limit", 1000, 10_000)?;
    let after = p
        .text("after")
        .map(|a| {
            let mut parts = a.split('_').map(|x| x.parse::<i64>().ok());
            match (
                parts.next().flatten(),
                parts.next().flatten(),
                parts.next().flatten(),
                parts.next(),
            ) {
                (Some(t), Some(s), Some(q), None) => Ok((t, s, q)),
                _ => Err(ApiError::parameter("after", "not a cursor of this route")),
            }
        })
        .transpose()?;
    let (rows, next) = query::events(&state.pool, device, from, to, limit, after).await?;
    Ok(EventPage {
        events: rows
            .into_iter()
            .map(|e| Event {
                device_id: e.device_id,
                epoch: e.epoch,
                seq: e.seq,
                kind: e.kind,
                message: e.message,
                severity: severity_name(e.severity),
                ts_ms: e.ts_ms,
            })
            .collect(),
        next: next.map(|(t, s, q)| format!("{t}_{s}_{q}")),
    })
}

/// A device's events by their timestamps, oldest first.
#[utoipa::path(get, path = "/api/v1/devices/{id}/events", tag = "data",
    params(
        ("id" = String, Path, description = "Device id"),
        ("from" = Option<String>, Query, description = "First timestamp included: Unix ms, RFC 3339, or a duration ago like -1h"),
        ("to" = Option<String>, Query, description = "First timestamp excluded"),
        ("limit" = Option<u32>, Query, description = "Events per page, 1 to 10000 (default 1000)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses((status = 200, body = EventPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn device_events(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<EventPage>, ApiError> {
    let p = Params::new(query, &["from", "to", "limit", "after"])?;
    if query::device(&state.pool, &id).await?.is_none() {
        return Err(ApiError::unknown_device(&id));
    }
    Ok(Json(event_page(&state, Some(&id), &p, "from").await?))
}

/// Every device's events by their timestamps, oldest first.
#[utoipa::path(get, path = "/api/v1/events", tag = "data",
    params(
        ("since" = Option<String>, Query, description = "First timestamp included: Unix ms, RFC 3339, or a duration ago like -1h"),
        ("to" = Option<String>, Query, description = "First timestamp excluded"),
        ("limit" = Option<u32>, Query, description = "Events per page, 1 to 10000 (default 1000)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses((status = 200, body = EventPage), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<EventPage>, ApiError> {
    let p = Params::new(query, &["since", "to", "limit", "after"])?;
    Ok(Json(event_page(&state, None, &p, "since").await?))
}
