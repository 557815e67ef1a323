//! What the bridge publishes for a stored outbox row: the shared JSON shapes of
//! [`crate::payload`] (the default), or `gateway.v1.Uplink` protobuf messages.

use prost::Message;
use proto::v1::{uplink, Event, Telemetry, Uplink};

use crate::config::PayloadFormat;
use crate::payload;
use crate::store::outbox::{Kind, OutboxRow};
use crate::store::u64_from_sql;

/// Renders a stored row for publishing. `Err` when a stored body does not decode (the row is
/// then skipped and counted by the caller).
pub fn render(row: &OutboxRow, format: PayloadFormat) -> Result<Vec<u8>, prost::DecodeError> {
    let epoch = u64_from_sql(row.epoch);
    let seq = u64_from_sql(row.seq);
    let device = row.device_id.as_str();
    match (row.kind, format) {
        // Both are stored as their JSON; `gateway.v1.Uplink` has no body for them.
        (Kind::CommandResult | Kind::Anomaly, _) => Ok(row.body.clone()),
        (Kind::Telemetry, PayloadFormat::Json) => {
            let t = Telemetry::decode(row.body.as_slice())?;
            Ok(payload::telemetry_json(
                device,
                epoch,
                seq,
                row.received_ms,
                &t,
            ))
        }
        (Kind::Event, PayloadFormat::Json) => {
            let e = Event::decode(row.body.as_slice())?;
            Ok(payload::event_json(device, epoch, seq, row.received_ms, &e))
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
    fn a_json_row_is_the_shared_telemetry_shape() {
        let t = Telemetry {
            readings: vec![Reading {
                sensor: "t".into(),
                value: 1.5,
                timestamp_ms: 0,
            }],
        };
        let out = render(
            &row(Kind::Telemetry, t.encode_to_vec()),
            PayloadFormat::Json,
        )
        .unwrap();
        assert_eq!(out, payload::telemetry_json("d1", 7, 3, 1000, &t));
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
}
