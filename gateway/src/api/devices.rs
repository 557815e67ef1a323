//! `/api/v1/devices`: the device list and one device, provisioning, and revocation that
//! closes the device's live link at once.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, Body, ErrorBody};
use super::params::Params;
use super::ApiState;
use crate::registry::Online;
use crate::session::state::check_name;
use crate::store::devices::{self, AddError};
use crate::store::query::{self, DeviceRecord};

/// A device as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Device {
    /// Its id.
    pub id: String,
    /// Whether it has a link now.
    pub online: bool,
    /// `tcp`, `tls` or `serial`: its current link, or its last one.
    pub link: Option<String>,
    /// Peer address (or serial port) of its current or last link.
    pub peer: Option<String>,
    /// Firmware version from its latest Hello.
    pub firmware_version: Option<String>,
    /// Epoch of its current session, or of the one that stored data last.
    pub epoch: Option<u64>,
    /// Highest seq stored in that epoch.
    pub last_seq: u64,
    /// When anything was last received from it, Unix ms.
    pub last_seen_ms: Option<i64>,
    /// Frames stored from it, all epochs.
    pub frames_total: u64,
    /// Readings stored from it, all epochs.
    pub readings_total: u64,
    /// Whether it is revoked.
    pub revoked: bool,
    /// When it was revoked, Unix ms.
    pub revoked_at_ms: Option<i64>,
    /// Whether it has a per-device token (else it uses a fleet token).
    pub provisioned: bool,
    /// When it was provisioned or first seen, Unix ms.
    pub created_at_ms: i64,
    /// When its current link said Hello, Unix ms.
    pub connected_ms: Option<i64>,
    /// The report interval the pacer asks of its current link, ms (0: none; null offline).
    pub report_interval_ms: Option<u32>,
}

fn render(record: &DeviceRecord, online: Option<Online>) -> Device {
    let live_epoch = online.as_ref().map(|o| o.info.epoch);
    let stream = record.current(live_epoch);
    Device {
        id: record.device_id.clone(),
        online: online.is_some(),
        link: online
            .as_ref()
            .map(|o| o.info.link.to_owned())
            .or_else(|| record.last_link.clone()),
        peer: online
            .as_ref()
            .map(|o| o.info.peer.to_string())
            .or_else(|| record.last_peer.clone()),
        firmware_version: online
            .as_ref()
            .map(|o| o.info.firmware_version.clone())
            .or_else(|| record.firmware_version.clone()),
        epoch: live_epoch.or(stream.map(|s| s.epoch)),
        last_seq: stream.map_or(0, |s| s.last_seq),
        last_seen_ms: online
            .as_ref()
            .map(|o| o.last_seen_ms)
            .or(record.last_seen_ms()),
        frames_total: record.frames_total(),
        readings_total: record.readings_total(),
        revoked: record.revoked_at_ms.is_some(),
        revoked_at_ms: record.revoked_at_ms,
        provisioned: record.has_token,
        created_at_ms: record.created_at_ms,
        report_interval_ms: online.as_ref().map(|o| o.report_interval_ms),
        connected_ms: online.map(|o| o.info.connected_ms),
    }
}

/// A page of devices.
#[derive(Debug, Serialize, ToSchema)]
pub struct DevicePage {
    /// Devices by id.
    pub devices: Vec<Device>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

/// Every known device (provisioned or ever connected), by id.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices",
    params(
        ("online" = Option<bool>, Query, description = "Only devices online (true) or offline (false)"),
        ("limit" = Option<u32>, Query, description = "Devices per page, 1 to 1000 (default 100)"),
        ("after" = Option<String>, Query, description = "The `next` of the previous page"),
    ),
    responses((status = 200, body = DevicePage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<Vec<(String, String)>>,
) -> Result<Json<DevicePage>, ApiError> {
    let p = Params::new(query, &["online", "limit", "after"])?;
    let online = p.bool("online")?;
    let limit = p.limit("limit", 100, 1000)? as usize;
    let mut after = p.text("after").unwrap_or_default().to_owned();
    let mut devices = Vec::with_capacity(limit);
    // With a filter, read pages until this one is full or the devices run out.
    let chunk = if online.is_some() { 500 } else { limit as u32 };
    'pages: loop {
        let records = query::devices(&state.pool, &after, chunk).await?;
        for record in &records {
            after.clone_from(&record.device_id);
            let live = state.registry.get(&record.device_id);
            if online.is_some_and(|want| want != live.is_some()) {
                continue;
            }
            devices.push(render(record, live));
            if devices.len() == limit {
                break 'pages;
            }
        }
        if records.len() < chunk as usize {
            break;
        }
    }
    // A full page may have a next one (the last page may then come back empty).
    let next = (devices.len() == limit).then_some(after);
    Ok(Json(DevicePage { devices, next }))
}

/// A sensor and its newest reading.
#[derive(Debug, Serialize, ToSchema)]
pub struct Sensor {
    /// Its name.
    pub name: String,
    /// Value of its newest reading (null for NaN).
    pub last_value: Option<f64>,
    /// Timestamp of its newest reading, Unix ms.
    pub last_ts_ms: Option<i64>,
}

/// One device with its sensors.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeviceDetail {
    /// The device.
    #[serde(flatten)]
    pub device: Device,
    /// Its sensors by name.
    pub sensors: Vec<Sensor>,
}

/// One device, with its sensors' newest readings.
#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = DeviceDetail), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn one(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<DeviceDetail>, ApiError> {
    let record = query::device(&state.pool, &id)
        .await?
        .ok_or_else(|| ApiError::unknown_device(&id))?;
    let sensors = query::sensors(&state.pool, &id)
        .await?
        .into_iter()
        .map(|s| Sensor {
            name: s.name,
            last_value: s.last_value,
            last_ts_ms: s.last_ts_ms,
        })
        .collect();
    Ok(Json(DeviceDetail {
        device: render(&record, state.registry.get(&id)),
        sensors,
    }))
}

/// A device to provision.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// The id the device sends in Hello.
    pub id: String,
    /// Replace an existing token (the old one stops working).
    #[serde(default)]
    pub force: bool,
}

/// A provisioned device and its token, shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct Provisioned {
    /// The device's id.
    pub id: String,
    /// Its token; the store keeps only a hash.
    pub token: String,
}

/// Provisions a device (as `gateway devices add`) and returns its token once.
#[utoipa::path(post, path = "/api/v1/devices", tag = "devices", request_body = NewDevice,
    responses((status = 201, body = Provisioned), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn provision(
    State(state): State<Arc<ApiState>>,
    Body(new): Body<NewDevice>,
) -> Result<(StatusCode, Json<Provisioned>), ApiError> {
    check_name("device_id", &new.id).map_err(|e| ApiError::body(format!("id: {e}")))?;
    match devices::add(&state.pool, &new.id, new.force).await {
        Ok(token) => {
            tracing::info!(device = %new.id, "device provisioned over the API");
            Ok((StatusCode::CREATED, Json(Provisioned { id: new.id, token })))
        }
        Err(AddError::HasToken(id)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("device {id:?} already has a token; send \"force\": true to replace it"),
        )),
        Err(AddError::Store(e)) => Err(e.into()),
    }
}

/// What a revoke did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Revoked {
    /// The device.
    pub id: String,
    /// Always true: it is refused at Hello from now on.
    pub revoked: bool,
    /// Whether a live link was closed (with `DEVICE_REVOKED`).
    pub link_closed: bool,
}

/// Revokes a device: refused at Hello from now on, and its live link closed at once with
/// `ERROR_CODE_DEVICE_REVOKED`. Its stored data stays.
#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "devices",
    params(("id" = String, Path, description = "Device id")),
    responses((status = 200, body = Revoked), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn revoke(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<Json<Revoked>, ApiError> {
    if !devices::revoke(&state.pool, &id).await? {
        return Err(ApiError::unknown_device(&id));
    }
    let link_closed = state.registry.revoke(&id);
    tracing::info!(device = %id, link_closed, "device revoked over the API");
    Ok(Json(Revoked {
        id,
        revoked: true,
        link_closed,
    }))
}
