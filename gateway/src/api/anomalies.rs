//! `GET /api/v1/anomalies`: what the detector found, in the order it decided, filtered by
//! device, kind and time. Each anomaly has the shape published on MQTT.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::params::Params;
use super::ApiState;
use crate::anomaly::Kind;
use crate::payload::Anomaly;
use crate::store::now_ms;
use crate::store::query::{self, AnomalyFilter};

/// A page of anomalies, in the order they were decided.
#[derive(Debug, Serialize, ToSchema)]
pub struct AnomalyPage {
    /// Anomalies (an ongoing one shows its state now).
    pub anomalies: Vec<Anomaly>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

/// Anomalies, oldest decision first.
#[utoipa::path(get, path = "/api/v1/anomalies", tag = "data",
    params(
        ("device" = Option<String>, Query, description = "Only this device's"),
        ("kind" = Option<String>, Query, description = "Only this kind: spike, drift, stuck, dropout, traffic, security"),
        ("since" = Option<String>, Query, description = "First anomalous reading at or after: Unix ms, RFC 3339, or a duration ago like -1h"),
        ("to" = Option<String>, Query, description = "First anomalous reading before (same forms)"),
        ("limit" = Option<u32>, Query, description = "Anomalies per page, 1 to 10000 (default 1000)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses((status = 200, body = AnomalyPage), (status = 400, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<AnomalyPage>, ApiError> {
    let p = Params::new(query, &["device", "kind", "since", "to", "limit", "after"])?;
    let now = now_ms();
    let kind = match p.text("kind") {
        None => None,
        Some(k) => Some(Kind::parse(k).map(Kind::name).ok_or_else(|| {
            ApiError::parameter(
                "kind",
                "must be one of spike, drift, stuck, dropout, traffic, security",
            )
        })?),
    };
    let after = match p.text("after") {
        None => 0,
        Some(a) => a
            .parse()
            .map_err(|_| ApiError::parameter("after", "not a cursor of this route"))?,
    };
    let filter = AnomalyFilter {
        device: p.text("device"),
        kind,
        since: p.time("since", now)?.unwrap_or(i64::MIN),
        to: p.time("to", now)?.unwrap_or(i64::MAX),
        after,
        limit: p.limit("limit", 1000, 10_000)?,
    };
    let (anomalies, next) = query::anomalies(&state.pool, &filter).await?;
    Ok(Json(AnomalyPage {
        anomalies,
        next: next.map(|id| id.to_string()),
    }))
}
