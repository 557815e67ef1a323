//! What the bridge publishes: JSON (the default) or `gateway.v1.Uplink` protobuf payloads
//! for stored frames, and JSON for command outcomes and device status. Pure functions; the
//! README documents every shape here.

use base64::Engine;
use prost::Message;
use proto::v1::{uplink, CommandResult, Event, Severity, Telemetry, Uplink};
use serde::Serialize;

use crate::config::PayloadFormat;
use crate::store::outbox::{Kind, OutboxRow};
use crate::store::u64_from_sql;

#[derive(Serialize)]
struct ReadingJson<'a> {
    sensor: &'a str,
    /// NaN is written as null.
    value: f64,
    ts_ms: i64,
}

#[derive(Serialize)]
struct TelemetryJson<'a> {
    device_id: &'a str,
    epoch: u64,
    seq: u64,
    received_ms: i64,
    readings: Vec<ReadingJson<'a>>,
}

#[derive(Serialize)]
struct EventJson<'a> {
    device_id: &'a str,
    epoch: u64,
    seq: u64,
    received_ms: i64,
    kind: &'a str,
    message: &'a str,
    severity: String,
    ts_ms: i64,
}

#[derive(Serialize)]
struct CommandResultJson<'a> {
    device_id: &'a str,
    id: &'a str,
    status: &'a str,
    detail: &'a str,
    /// Base64 of the device's result payload, if it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<String>,
    ts_ms: i64,
}

#[derive(Serialize)]
struct StatusJson<'a> {
    status: &'a str,
    ts_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    firmware_version: Option<&'a str>,
}

fn ts(device_ms: u64, received_ms: i64) -> i64 {
    if device_ms == 0 {
        received_ms
    } else {
        device_ms as i64
    }
}

fn severity_name(severity: i32) -> String {
    Severity::try_from(severity)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SEVERITY_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| severity.to_string())
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    // Serializing these plain structs to a Vec cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A command outcome, as published on the results topic.
pub fn command_result_json(
    device_id: &str,
    id: &str,
    status: &str,
    detail: &str,
    payload: &[u8],
    ts_ms: i64,
) -> Vec<u8> {
    to_json(&CommandResultJson {
        device_id,
        id,
        status,
        detail,
        payload: (!payload.is_empty())
            .then(|| base64::engine::general_purpose::STANDARD.encode(payload)),
        ts_ms,
    })
}

/// The outcome name of a device's `CommandResult.Status`.
pub fn status_name(result: &CommandResult) -> &'static str {
    use proto::v1::command_result::Status;
    match Status::try_from(result.status) {
        Ok(Status::Ok) => "ok",
        Ok(Status::Rejected) => "rejected",
        Ok(Status::Error) | Ok(Status::Unspecified) | Err(_) => "error",
    }
}

/// A device's retained status.
pub fn status_json(
    online: bool,
    ts_ms: i64,
    link: Option<&str>,
    firmware_version: Option<&str>,
) -> Vec<u8> {
    to_json(&StatusJson {
        status: if online { "online" } else { "offline" },
        ts_ms,
        link,
        firmware_version,
    })
}

/// Renders a stored row for publishing. `Err` when a stored body does not decode (the row is
/// then skipped and counted by the caller).
pub fn render(row: &OutboxRow, format: PayloadFormat) -> Result<Vec<u8>, prost::DecodeError> {
    let epoch = u64_from_sql(row.epoch);
    let seq = u64_from_sql(row.seq);
    match (row.kind, format) {
        (Kind::CommandResult, _) => Ok(row.body.clone()),
        (Kind::Telemetry, PayloadFormat::Json) => {
            let t = Telemetry::decode(row.body.as_slice())?;
            Ok(to_json(&TelemetryJson {
                device_id: &row.device_id,
                epoch,
                seq,
                received_ms: row.received_ms,
                readings: t
                    .readings
                    .iter()
                    .map(|r| ReadingJson {
                        sensor: &r.sensor,
                        value: r.value,
                        ts_ms: ts(r.timestamp_ms, row.received_ms),
                    })
                    .collect(),
            }))
        }
        (Kind::Event, PayloadFormat::Json) => {
            let e = Event::decode(row.body.as_slice())?;
            Ok(to_json(&EventJson {
                device_id: &row.device_id,
                epoch,
                seq,
                received_ms: row.received_ms,
                kind: &e.kind,
                message: &e.message,
                severity: severity_name(e.severity),
                ts_ms: ts(e.timestamp_ms, row.received_ms),
            }))
        }
        (Kind::Telemetry | Kind::Event, PayloadFormat::Protobuf) => {
            let body = if row.kind == Kind::Telemetry {
                uplink::Body::Telemetry(Telemetry::decode(row.body.as_slice())?)
            } else {
                uplink::Body::Event(Event::decode(row.body.as_slice())?)
            };
            Ok(Uplink {
                device_id: row.device_id.clone(),
                epoch,
                seq,
                received_ms: row.received_ms.max(0) as u64,
                body: Some(body),
            }
            .encode_to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::Reading;

    fn row(kind: Kind, body: Vec<u8>) -> OutboxRow {
        OutboxRow {
            id: 1,
            kind,
            device_id: "d1".into(),
            epoch: 7,
            seq: 3,
            received_ms: 1000,
            body,
        }
    }

    #[test]
    fn telemetry_json_has_the_documented_fields_and_fills_zero_timestamps() {
        let t = Telemetry {
            readings: vec![
                Reading {
                    sensor: "t".into(),
                    value: 1.5,
                    timestamp_ms: 0,
                },
                Reading {
                    sensor: "h".into(),
                    value: f64::NAN,
                    timestamp_ms: 5,
                },
            ],
        };
        let json: serde_json::Value = serde_json::from_slice(
            &render(
                &row(Kind::Telemetry, t.encode_to_vec()),
                PayloadFormat::Json,
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "device_id": "d1", "epoch": 7, "seq": 3, "received_ms": 1000,
                "readings": [
                    {"sensor": "t", "value": 1.5, "ts_ms": 1000},
                    {"sensor": "h", "value": null, "ts_ms": 5}
                ]
            })
        );
    }

    #[test]
    fn event_json_names_the_severity() {
        let e = Event {
            kind: "door".into(),
            message: "open".into(),
            severity: Severity::Critical as i32,
            timestamp_ms: 9,
        };
        let json: serde_json::Value = serde_json::from_slice(
            &render(&row(Kind::Event, e.encode_to_vec()), PayloadFormat::Json).unwrap(),
        )
        .unwrap();
        assert_eq!(json["severity"], "critical");
        assert_eq!(json["kind"], "door");
        assert_eq!(json["ts_ms"], 9);
    }

    #[test]
    fn protobuf_payload_is_an_uplink_envelope() {
        let t = Telemetry {
            readings: vec![Reading {
                sensor: "t".into(),
                value: 2.0,
                timestamp_ms: 1,
            }],
        };
        let bytes = render(
            &row(Kind::Telemetry, t.encode_to_vec()),
            PayloadFormat::Protobuf,
        )
        .unwrap();
        let up = Uplink::decode(bytes.as_slice()).unwrap();
        assert_eq!((up.device_id.as_str(), up.epoch, up.seq), ("d1", 7, 3));
        assert_eq!(up.body, Some(uplink::Body::Telemetry(t)));
    }

    #[test]
    fn a_corrupt_body_is_an_error_not_a_panic() {
        assert!(render(&row(Kind::Telemetry, vec![0xff, 0xff]), PayloadFormat::Json).is_err());
    }

    #[test]
    fn command_results_carry_a_base64_payload() {
        let json: serde_json::Value =
            serde_json::from_slice(&command_result_json("d", "c1", "ok", "", b"hi", 5)).unwrap();
        assert_eq!(json["payload"], "aGk=");
        assert_eq!(json["status"], "ok");
    }
}
