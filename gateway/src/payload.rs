//! The JSON shapes of everything the gateway shows about device data: telemetry frames,
//! events, command outcomes, device status and anomalies. One home for them, used by the store (command
//! outcomes queued in the outbox), the MQTT bridge, the HTTP API and the live WebSocket feed,
//! so a consumer sees the same object wherever it reads it. Pure functions over protocol
//! types; the README documents every shape here.

use base64::Engine;
use proto::v1::{CommandResult, Event, Severity, Telemetry};
use serde::Serialize;

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
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<&'a str>,
    status: &'a str,
    ts_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    link: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    firmware_version: Option<&'a str>,
}

/// One anomaly the detector decided, as the store keeps it and every consumer sees it
/// (MQTT, `GET /api/v1/anomalies`, the live feed's `anomaly` messages).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Anomaly {
    /// The detector's id for it (an ongoing anomaly keeps its id when it ends).
    pub id: i64,
    /// The device; `None` for a `security` anomaly about an address that named none.
    pub device_id: Option<String>,
    /// The sensor; `None` for device-level kinds (dropout, traffic, security).
    pub sensor: Option<String>,
    /// spike, drift, stuck, dropout, traffic or security.
    pub kind: String,
    /// Which detector decided.
    pub detector: String,
    /// 0..1: 0.5 at the detector's threshold, towards 1 far beyond.
    pub score: f64,
    /// Timestamp of the first anomalous reading.
    pub ts_ms: i64,
    /// Timestamp of the last (moves when an ongoing anomaly ends).
    pub to_ms: i64,
    /// Timestamp of the reading at which the detector decided.
    pub raised_ts_ms: i64,
    /// The reading's value, where one applies.
    pub value: Option<f64>,
    /// A sentence for people.
    pub detail: String,
    /// The gateway's clock when it decided, Unix ms.
    pub detected_ms: i64,
    /// The source address, for `security`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Still under way: the same id comes again with `ongoing: false` when it ends.
    pub ongoing: bool,
}

/// An anomaly, as published on its topic.
pub fn anomaly_json(a: &Anomaly) -> Vec<u8> {
    to_json(a)
}

/// A reading's or event's timestamp: the device's, or the receive time where it sent 0.
pub fn timestamp(device_ms: u64, received_ms: i64) -> i64 {
    if device_ms == 0 {
        received_ms
    } else {
        // The session rejects timestamps above i64::MAX.
        device_ms as i64
    }
}

/// The lowercase name of an event severity (`info`, `warning`, ...), or its number.
pub fn severity_name(severity: i32) -> String {
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

/// A telemetry frame.
pub fn telemetry_json(
    device_id: &str,
    epoch: u64,
    seq: u64,
    received_ms: i64,
    t: &Telemetry,
) -> Vec<u8> {
    to_json(&TelemetryJson {
        device_id,
        epoch,
        seq,
        received_ms,
        readings: t
            .readings
            .iter()
            .map(|r| ReadingJson {
                sensor: &r.sensor,
                value: r.value,
                ts_ms: timestamp(r.timestamp_ms, received_ms),
            })
            .collect(),
    })
}

/// An event frame.
pub fn event_json(device_id: &str, epoch: u64, seq: u64, received_ms: i64, e: &Event) -> Vec<u8> {
    to_json(&EventJson {
        device_id,
        epoch,
        seq,
        received_ms,
        kind: &e.kind,
        message: &e.message,
        severity: severity_name(e.severity),
        ts_ms: timestamp(e.timestamp_ms, received_ms),
    })
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

/// A device's status. The MQTT topic names the device, so the retained message leaves
/// `device_id` out (`None`); the live feed carries it.
pub fn status_json(
    device_id: Option<&str>,
    online: bool,
    ts_ms: i64,
    link: Option<&str>,
    firmware_version: Option<&str>,
) -> Vec<u8> {
    to_json(&StatusJson {
        device_id,
        status: if online { "online" } else { "offline" },
        ts_ms,
        link,
        firmware_version,
    })
}

/// One of the objects above with a leading `"type"` member, for feeds that carry several
/// kinds (the live WebSocket): `{"type":"telemetry", ...the same members...}`.
pub fn typed(kind: &str, json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + kind.len() + 12);
    out.extend_from_slice(b"{\"type\":");
    out.extend_from_slice(&to_json(&kind));
    match json.get(1..) {
        // Every shape here is an object with at least one member.
        Some(rest) if json.first() == Some(&b'{') && rest != b"}" => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
        _ => out.push(b'}'),
    }
    out
}

/// Several of the objects above (each already typed) as one object:
/// `{"type":"batch","messages":[...]}`, for feed clients that take a commit at a time.
pub fn batch<'a>(messages: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = b"{\"type\":\"batch\",\"messages\":[".to_vec();
    for (i, m) in messages.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m);
    }
    out.extend_from_slice(b"]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::Reading;

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
        let json: serde_json::Value =
            serde_json::from_slice(&telemetry_json("d1", 7, 3, 1000, &t)).unwrap();
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
        let json: serde_json::Value =
            serde_json::from_slice(&event_json("d1", 7, 3, 1000, &e)).unwrap();
        assert_eq!(json["severity"], "critical");
        assert_eq!(json["kind"], "door");
        assert_eq!(json["ts_ms"], 9);
    }

    #[test]
    fn command_results_carry_a_base64_payload() {
        let json: serde_json::Value =
            serde_json::from_slice(&command_result_json("d", "c1", "ok", "", b"hi", 5)).unwrap();
        assert_eq!(json["payload"], "aGk=");
        assert_eq!(json["status"], "ok");
    }

    #[test]
    fn a_typed_object_is_the_same_object_with_its_type_first() {
        let plain = status_json(Some("d1"), true, 5, Some("tcp"), Some("1.2"));
        let both = typed("status", &plain);
        let mut expected: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        expected["type"] = "status".into();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&both).unwrap(),
            expected
        );
        assert!(both.starts_with(br#"{"type":"status","#));
        assert_eq!(typed("x", b"{}"), br#"{"type":"x"}"#);
    }

    #[test]
    fn a_batch_is_one_object_holding_the_messages_in_order() {
        let a = typed("status", &status_json(Some("a"), true, 1, None, None));
        let b = typed("status", &status_json(Some("b"), false, 2, None, None));
        let joined: serde_json::Value =
            serde_json::from_slice(&batch([&a[..], &b[..]].into_iter())).unwrap();
        assert_eq!(joined["type"], "batch");
        assert_eq!(joined["messages"][1]["device_id"], "b");
        let empty: serde_json::Value = serde_json::from_slice(&batch(std::iter::empty())).unwrap();
        assert_eq!(empty["messages"], serde_json::json!([]));
    }
}
