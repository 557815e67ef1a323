//! The gateway itself: `/healthz` for load balancers and systemd, `/metrics` for
//! Prometheus, `/api/v1/stats` for people and dashboards.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::params::Params;
use super::ApiState;
use crate::stats::{Health, Rates, Sample, HISTORY};
use crate::store::now_ms;

/// The MQTT uplink.
#[derive(Debug, Serialize, ToSchema)]
pub struct Uplink {
    /// Whether the bridge runs.
    pub enabled: bool,
    /// Whether it is connected to the broker now.
    pub connected: bool,
    /// Unpublished rows kept for the broker.
    pub backlog_rows: i64,
    /// Unpublished bytes kept for the broker.
    pub backlog_bytes: i64,
    /// Whether the backlog is at its budget (its policy applies).
    pub backlog_full: bool,
    /// Frames the broker acknowledged since start.
    pub published: u64,
}

/// Pacing of devices: what the pacer decided and what it measured.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pacing {
    /// `normal`, `slowing` while the heaviest senders are asked to report less often, or
    /// `off` (`pacing.enabled = false`).
    pub state: String,
    /// The report interval paced devices are asked to keep, ms (0: none).
    pub report_interval_ms: u32,
    /// Devices paced now.
    pub devices_paced: u64,
    /// Pressure: 1 at a target (queue fill, commit wait, MQTT backlog), above it over.
    pub pressure: f64,
    /// Store writer queue fill now, 0 to 1.
    pub queue_fill: f64,
    /// The fill the pacer holds the queue to.
    pub target_queue_fill: f64,
    /// The longest a frame waited for its commit in the last quarter second, ms.
    pub commit_wait_ms: u64,
    /// The commit wait the pacer keeps under, ms.
    pub target_ack_latency_ms: u64,
}

/// `/healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Healthz {
    /// `ok` or `failing`.
    pub status: String,
    /// Why it is failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Store writer queue fill, 0 to 1.
    pub store_queue_fill: f64,
    /// Devices online.
    pub devices_online: usize,
    /// The MQTT uplink.
    pub mqtt: Uplink,
    /// Pacing.
    pub pacing: Pacing,
    /// Seconds since start.
    pub uptime_s: u64,
}

fn uplink(state: &ApiState) -> Uplink {
    let m = &state.metrics;
    Uplink {
        enabled: state.mqtt_enabled,
        connected: m.mqtt_connected.get() == 1,
        backlog_rows: m.uplink_backlog_rows.get(),
        backlog_bytes: m.uplink_backlog_bytes.get(),
        backlog_full: m.uplink_backlog_full.get() == 1,
        published: m.uplink_published.get(),
    }
}

fn pacing(state: &ApiState) -> Pacing {
    let p = &state.pace;
    let ms = p.interval_ms();
    Pacing {
        state: match (p.enabled, ms) {
            (false, _) => "off",
            (true, 0) => "normal",
            (true, _) => "slowing",
        }
        .into(),
        report_interval_ms: ms,
        devices_paced: p.devices(),
        pressure: (p.pressure() * 1000.0).round() / 1000.0,
        queue_fill: state.metrics.store_queue_fill.get(),
        target_queue_fill: p.target_queue_fill,
        commit_wait_ms: p.wait_ms(),
        target_ack_latency_ms: p.target_ack_latency_ms,
    }
}

fn uptime_s(state: &ApiState) -> u64 {
    ((now_ms() - state.stats.started_ms).max(0) / 1000) as u64
}

/// 200 while the store commits and the writer keeps up; 503 with the reason otherwise.
#[utoipa::path(get, path = "/healthz", tag = "system",
    responses((status = 200, body = Healthz), (status = 503, body = Healthz)))]
pub async fn healthz(State(state): State<Arc<ApiState>>) -> (StatusCode, Json<Healthz>) {
    let health = state.stats.health();
    let (code, status, reason) = match health {
        Health::Ok => (StatusCode::OK, "ok", None),
        Health::Failing(r) => (StatusCode::SERVICE_UNAVAILABLE, "failing", Some(r)),
    };
    (
        code,
        Json(Healthz {
            status: status.into(),
            reason,
            store_queue_fill: state.metrics.store_queue_fill.get(),
            devices_online: state.registry.len(),
            mqtt: uplink(&state),
            pacing: pacing(&state),
            uptime_s: uptime_s(&state),
        }),
    )
}

/// Prometheus text exposition of every metric.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    state.stats.refresh_gauges().await;
    // Prometheus asks for OpenMetrics; other clients get the same text as the classic
    // format, whose parsers read the OpenMetrics-only lines (`# UNIT`, `# EOF`) as comments.
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    (
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.encode(),
    )
        .into_response()
}

/// Rates over two windows.
#[derive(Debug, Serialize, ToSchema)]
pub struct Windows {
    /// Over the last 10 seconds.
    pub last_10s: Rates,
    /// Over the last minute.
    pub last_60s: Rates,
}

/// `/api/v1/stats`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsBody {
    /// Readings and frames committed per second.
    pub rates: Windows,
    /// Readings committed since start.
    pub readings_total: u64,
    /// Frames committed since start.
    pub frames_total: u64,
    /// Store writer queue fill, 0 to 1.
    pub store_queue_fill: f64,
    /// Size of the SQLite database and WAL, bytes.
    pub store_size_bytes: i64,
    /// The store is full (disk full or `store.max_bytes`): nothing is acknowledged and
    /// devices are held back until space returns.
    pub store_full: bool,
    /// The MQTT uplink.
    pub mqtt: Uplink,
    /// Pacing.
    pub pacing: Pacing,
    /// Devices online now.
    pub devices_online: usize,
    /// Devices online now by link kind.
    pub devices_online_by_link: BTreeMap<String, usize>,
    /// Device links since start.
    pub connections_total: u64,
    /// Link errors since start, by code.
    pub link_errors: BTreeMap<String, u64>,
    /// Anomalies the detector raised since start.
    pub anomalies_total: u64,
    /// The same by kind (spike, drift, stuck, dropout, traffic, security).
    pub anomalies_by_kind: BTreeMap<String, u64>,
    /// Committed batches the detector skipped because it fell behind, since start.
    pub anomaly_skipped_batches: u64,
    /// Seconds since start.
    pub uptime_s: u64,
    /// When the gateway started, Unix ms.
    pub started_ms: i64,
    /// With `?history=N`: the last N one-second samples, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<Sample>>,
}

/// Rates, queue, backlog, pacing, connections, uptime and store size.
#[utoipa::path(get, path = "/api/v1/stats", tag = "system",
    params(("history" = Option<u32>, Query, description = "Also return the last N one-second samples (up to 600)")),
    responses((status = 200, body = StatsBody), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn stats(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<StatsBody>, ApiError> {
    let p = Params::new(query, &["history"])?;
    let history = match p.text("history") {
        Some(_) => Some(p.limit("history", 60, HISTORY as u32)?),
        None => None,
    };
    state.stats.refresh_gauges().await;
    let m = &state.metrics;
    Ok(Json(StatsBody {
        rates: Windows {
            last_10s: state.stats.rates(10),
            last_60s: state.stats.rates(60),
        },
        readings_total: m.readings_stored.get(),
        frames_total: m.frames_stored.get(),
        store_queue_fill: m.store_queue_fill.get(),
        store_size_bytes: m.store_bytes.get(),
        store_full: m.store_full.get() != 0,
        mqtt: uplink(&state),
        pacing: pacing(&state),
        devices_online: state.registry.len(),
        devices_online_by_link: state
            .registry
            .count_by_link()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        connections_total: m.connections_total(),
        link_errors: m
            .link_error_summary()
            .into_iter()
            .map(|(k, v)| (k.trim_start_matches("ERROR_CODE_").to_owned(), v))
            .collect(),
        anomalies_total: crate::anomaly::Kind::ALL
            .iter()
            .map(|k| m.anomalies(*k))
            .sum(),
        anomalies_by_kind: crate::anomaly::Kind::ALL
            .iter()
            .map(|k| (k.name().to_owned(), m.anomalies(*k)))
            .collect(),
        anomaly_skipped_batches: m.anomaly_skipped_batches.get(),
        uptime_s: uptime_s(&state),
        started_ms: state.stats.started_ms,
        history: history.map(|n| state.stats.history(n as usize)),
    }))
}
