//! `/api/v1/devices/{id}/commands` and `/api/v1/commands/{id}`: commands over HTTP take the
//! same path, store and outcomes as MQTT commands (the command desk). With `?wait=true` the
//! request is held until the command has an outcome (the device's, or the gateway's
//! `timeout`/`expired` at its deadline).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use utoipa::ToSchema;

use super::error::{ApiError, Body, ErrorBody};
use super::params::Params;
use super::ApiState;
use crate::commands::{Request, SubmitError};
use crate::live::LiveEvent;
use crate::store::now_ms;
use crate::store::query::{self, CommandRecord};
use crate::store::writer::FrameBody;

/// How often a waiting request re-reads the store in case the live hub lagged.
const RECHECK: Duration = Duration::from_secs(1);
/// How long past the deadline a waiter waits for the gateway's own `timeout`.
const GRACE: Duration = Duration::from_secs(5);

/// A command and where it stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct Command {
    /// Its id.
    pub id: String,
    /// The device.
    pub device_id: String,
    /// What to do.
    pub name: String,
    /// Its params.
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// `pending` (not yet delivered), `delivered`, or the outcome: `ok`, `error`,
    /// `rejected`, `timeout`, `expired`.
    pub status: String,
    /// Detail of the outcome.
    pub detail: Option<String>,
    /// Base64 of the device's result payload, if it sent one.
    pub payload: Option<String>,
    /// When it arrived, Unix ms.
    pub created_ms: i64,
    /// Its deadline, Unix ms.
    pub deadline_ms: i64,
    /// When it was first written to the device.
    pub sent_ms: Option<i64>,
    /// When it got its outcome.
    pub finished_ms: Option<i64>,
}

fn render(c: CommandRecord) -> Command {
    let status = match (&c.outcome, c.sent_ms) {
        (Some(o), _) => o.clone(),
        (None, Some(_)) => "delivered".into(),
        (None, None) => "pending".into(),
    };
    Command {
        params: serde_json::from_slice(&c.params).unwrap_or(serde_json::Value::Null),
        id: c.command_id,
        device_id: c.device_id,
        name: c.name,
        status,
        detail: c.detail,
        payload: c
            .result
            .filter(|r| !r.is_empty())
            .map(|r| base64::engine::general_purpose::STANDARD.encode(r)),
        created_ms: c.created_ms,
        deadline_ms: c.deadline_ms,
        sent_ms: c.sent_ms,
        finished_ms: c.finished_ms,
    }
}

async fn load(state: &ApiState, device: &str, id: &str) -> Result<Command, ApiError> {
    query::commands(&state.pool, id, Some(device))
        .await?
        .pop()
        .map(render)
        .ok_or_else(|| ApiError::not_found(format!("no command {id:?} for device {device:?}")))
}

/// Whether `event` closes command `id` of `device`.
fn closes(event: &LiveEvent, device: &str, id: &str) -> bool {
    match event {
        LiveEvent::Outcome(o) => o.device_id == device && o.command_id == id,
        LiveEvent::Frames(batch) => batch.frames.iter().any(|f| {
            &*f.device == device && matches!(&f.body, FrameBody::CommandResult(r) if r.id == id)
        }),
        LiveEvent::Status(_) | LiveEvent::Anomaly(_) => false,
    }
}

/// Sends a command to a device: 202 with its id at once, or with `?wait=true` 200 with its
/// outcome once it has one.
#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", tag = "commands", request_body = Request,
    params(
        ("id" = String, Path, description = "Device id"),
        ("wait" = Option<bool>, Query, description = "Hold the request until the outcome (or the deadline)"),
    ),
    responses(
        (status = 202, description = "Stored; delivered now or at the device's next connection", body = Command),
        (status = 200, description = "With wait=true: the outcome", body = Command),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn send(
    State(state): State<Arc<ApiState>>,
    Path(device): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    Body(request): Body<Request>,
) -> Result<(StatusCode, Json<Command>), ApiError> {
    let p = Params::new(query, &["wait"])?;
    let wait = p.bool("wait")?.unwrap_or(false);
    // Subscribed before submitting, so an outcome that comes at once is not missed.
    let mut live = wait.then(|| state.hub.subscribe());
    let accepted = match state.commands.submit(&device, request).await {
        Ok(a) => a,
        Err(SubmitError::Invalid { field, reason }) => {
            return Err(ApiError::body(format!("{field}: {reason}")))
        }
        Err(SubmitError::UnknownDevice(d)) => return Err(ApiError::unknown_device(&d)),
        Err(e @ SubmitError::Duplicate { .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                e.to_string(),
            ))
        }
        Err(SubmitError::Store(e)) => return Err(e.into()),
    };
    let Some(live) = live.as_mut() else {
        return Ok((
            StatusCode::ACCEPTED,
            Json(load(&state, &device, &accepted.id).await?),
        ));
    };
    let until = tokio::time::Instant::now()
        + Duration::from_millis((accepted.deadline_ms - now_ms()).max(0) as u64)
        + GRACE;
    let mut recheck = tokio::time::interval(RECHECK);
    loop {
        // Some(last): read the store now (last: and answer whatever it says).
        let check = tokio::select! {
            _ = tokio::time::sleep_until(until) => Some(true),
            _ = state.shutdown.cancelled() => Some(true),
            _ = recheck.tick() => Some(false),
            event = live.recv() => match event {
                Ok(e) => closes(&e, &device, &accepted.id).then_some(false),
                Err(RecvError::Lagged(_)) => Some(false),
                Err(RecvError::Closed) => Some(true),
            },
        };
        let Some(last) = check else { continue };
        let command = load(&state, &device, &accepted.id).await?;
        let finished = command.finished_ms.is_some();
        if last || finished {
            let status = if finished {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            return Ok((status, Json(command)));
        }
    }
}

/// A command by id (`device` narrows it when several devices used the same id).
#[utoipa::path(get, path = "/api/v1/commands/{id}", tag = "commands",
    params(
        ("id" = String, Path, description = "Command id"),
        ("device" = Option<String>, Query, description = "The device, when the id is not unique"),
    ),
    responses((status = 200, body = Command), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<Command>, ApiError> {
    let p = Params::new(query, &["device"])?;
    let mut found = query::commands(&state.pool, &id, p.text("device")).await?;
    match found.len() {
        0 => Err(ApiError::not_found(format!("no command {id:?}"))),
        1 => Ok(Json(render(found.remove(0)))),
        _ => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("several devices have a command {id:?}; add ?device=ID"),
        )),
    }
}
