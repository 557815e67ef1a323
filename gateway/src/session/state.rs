//! A device session's protocol state machine. It does no I/O: it takes a decoded
//! `DeviceMessage` and says what to do ([`Step`]); the task around it ([`super::task`]) does
//! the authenticating, storing and sending.
//!
//! States: waiting for Hello, then active (after the task reports a successful
//! authentication with [`SessionState::activate`]). Every rule of the protocol that can be
//! checked from the frames alone lives here, with a unit test each.

use std::sync::Arc;

use proto::v1::{
    device_message::Body, gateway_message, DeviceMessage, ErrorCode, GatewayMessage, Hello, Pong,
};

use crate::store::writer::FrameBody;

/// Longest device id, sensor name or event kind, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// What the task must do with one received message.
#[derive(Debug)]
pub enum Step {
    /// Check these credentials; on success call [`SessionState::activate`] and send HelloAck.
    Authenticate(Hello),
    /// Store this data frame; acknowledge it once durable.
    Store {
        /// The frame's seq.
        seq: u64,
        /// Its validated data.
        body: FrameBody,
    },
    /// Send this answer.
    Reply(GatewayMessage),
    /// Send an `Error` with this code and text, then close the link.
    Close(ErrorCode, String),
    /// Serial links: a repeat of a frame already forwarded (the device missed its ack).
    /// Re-acknowledge if it is durable; nothing to store.
    Repeat(u64),
    /// Serial links: a frame past a gap (an earlier frame was lost to line noise). Not stored
    /// and not acknowledged, so the device resends from the missing one.
    Skip(u64),
}

#[derive(Debug)]
enum State {
    AwaitingHello,
    Authenticating,
    Active {
        device: Arc<str>,
        epoch: u64,
        /// Highest data seq seen on this link; seqs must rise.
        last_seq: u64,
    },
}

/// One link's protocol state.
#[derive(Debug)]
pub struct SessionState {
    state: State,
    /// Serial links drop corrupted frames, so a cumulative ack past a gap would tell the
    /// device to forget a frame the gateway never got: there, data seqs must follow on
    /// without gaps, repeats are re-acknowledged and frames past a gap are skipped.
    contiguous: bool,
}

impl Default for SessionState {
    fn default() -> Self {
        Self::new()
    }
}

fn close(code: ErrorCode, msg: impl Into<String>) -> Step {
    Step::Close(code, msg.into())
}

/// Checks a name field (device id, sensor, event kind): 1 to [`MAX_NAME_LEN`] bytes, no control characters.
pub fn check_name(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(format!(
            "{field} must be 1 to {MAX_NAME_LEN} bytes, got {}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} must not contain control characters"));
    }
    if field == "device_id" && value.contains(['/', '+', '#']) {
        // It becomes an MQTT topic level.
        return Err(format!("{field} must not contain '/', '+' or '#'"));
    }
    Ok(())
}

fn check_timestamp(field: &str, ts: u64) -> Result<(), String> {
    if ts > i64::MAX as u64 {
        return Err(format!("{field} {ts} is out of range"));
    }
    Ok(())
}

impl SessionState {
    /// A TCP link that has not said Hello yet: seqs must rise, gaps allowed.
    pub fn new() -> Self {
        Self {
            state: State::AwaitingHello,
            contiguous: false,
        }
    }

    /// A serial link that has not said Hello yet: see [`SessionState::contiguous`].
    pub fn new_contiguous() -> Self {
        Self {
            state: State::AwaitingHello,
            contiguous: true,
        }
    }

    /// The authenticated device and epoch, once active.
    pub fn device(&self) -> Option<(&Arc<str>, u64)> {
        match &self.state {
            State::Active { device, epoch, .. } => Some((device, *epoch)),
            _ => None,
        }
    }

    /// The task authenticated the Hello: data may flow. `last_seq` is what HelloAck said is
    /// stored (a serial link continues right after it).
    pub fn activate(&mut self, device: Arc<str>, epoch: u64, last_seq: u64) {
        self.state = State::Active {
            device,
            epoch,
            last_seq: if self.contiguous { last_seq } else { 0 },
        };
    }

    /// Decides what one received message means. `now_ms` is the gateway's clock.
    pub fn on_message(&mut self, msg: DeviceMessage, now_ms: u64) -> Step {
        let Some(body) = msg.body else {
            return close(
                ErrorCode::UnknownMessage,
                "message has no body this gateway knows",
            );
        };
        // A serial port has no connection to lose: a device that restarts (power, watchdog,
        // a new epoch) just says Hello again, and that starts a new session on the port.
        let hello_starts_session = match self.state {
            State::AwaitingHello => true,
            State::Active { .. } => self.contiguous,
            State::Authenticating => false,
        };
        match (&mut self.state, body) {
            (_, Body::Hello(hello)) if hello_starts_session => {
                if let Err(e) = check_name("device_id", &hello.device_id) {
                    return close(ErrorCode::MalformedMessage, e);
                }
                self.state = State::Authenticating;
                Step::Authenticate(hello)
            }
            (State::AwaitingHello | State::Authenticating, _) => {
                close(ErrorCode::HelloRequired, "the first message must be Hello")
            }
            (State::Active { .. }, Body::Hello(_)) => {
                close(ErrorCode::UnexpectedHello, "this link already said Hello")
            }
            (State::Active { .. }, Body::Ping(_)) => Step::Reply(GatewayMessage {
                body: Some(gateway_message::Body::Pong(Pong {
                    server_time_ms: now_ms,
                })),
            }),
            (State::Active { last_seq, .. }, Body::Telemetry(t)) => {
                if let Err(step) = check_seq(msg.seq, last_seq, self.contiguous) {
                    return step;
                }
                for r in &t.readings {
                    if let Err(e) = check_name("reading.sensor", &r.sensor)
                        .and_then(|()| check_timestamp("reading.timestamp_ms", r.timestamp_ms))
                    {
                        return close(ErrorCode::MalformedMessage, e);
                    }
                }
                *last_seq = msg.seq;
                Step::Store {
                    seq: msg.seq,
                    body: FrameBody::Telemetry(t),
                }
            }
            (State::Active { last_seq, .. }, Body::CommandResult(r)) => {
                if let Err(step) = check_seq(msg.seq, last_seq, self.contiguous) {
                    return step;
                }
                if let Err(e) = check_name("command_result.id", &r.id) {
                    return close(ErrorCode::MalformedMessage, e);
                }
                *last_seq = msg.seq;
                Step::Store {
                    seq: msg.seq,
                    body: FrameBody::CommandResult(r),
                }
            }
            (State::Active { last_seq, .. }, Body::Event(e)) => {
                if let Err(step) = check_seq(msg.seq, last_seq, self.contiguous) {
                    return step;
                }
                if let Err(err) = check_name("event.kind", &e.kind)
                    .and_then(|()| check_timestamp("event.timestamp_ms", e.timestamp_ms))
                {
                    return close(ErrorCode::MalformedMessage, err);
                }
                *last_seq = msg.seq;
                Step::Store {
                    seq: msg.seq,
                    body: FrameBody::Event(e),
                }
            }
        }
    }
}

/// A data message's seq must be non-zero and above the previous one on this link (on a
/// contiguous link: exactly the next one; repeats and frames past a gap are not errors).
fn check_seq(seq: u64, last_seq: &u64, contiguous: bool) -> Result<(), Step> {
    if seq == 0 {
        return Err(close(
            ErrorCode::InvalidSeq,
            "data messages need a seq of 1 or more",
        ));
    }
    if contiguous {
        return match seq.cmp(&(*last_seq + 1)) {
            std::cmp::Ordering::Less => Err(Step::Repeat(seq)),
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => Err(Step::Skip(seq)),
        };
    }
    if seq <= *last_seq {
        return Err(close(
            ErrorCode::InvalidSeq,
            format!("seq {seq} does not rise above {last_seq} on this link"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::{Event, Ping, Reading, Telemetry};

    fn msg(seq: u64, body: Body) -> DeviceMessage {
        DeviceMessage {
            seq,
            body: Some(body),
        }
    }

    fn hello(id: &str) -> Body {
        Body::Hello(Hello {
            device_id: id.into(),
            token: "t".into(),
            firmware_version: "1.0".into(),
            epoch: 7,
        })
    }

    fn telemetry(sensor: &str, ts: u64) -> Body {
        Body::Telemetry(Telemetry {
            readings: vec![Reading {
                sensor: sensor.into(),
                value: 1.5,
                timestamp_ms: ts,
            }],
        })
    }

    fn active() -> SessionState {
        let mut s = SessionState::new();
        assert!(matches!(
            s.on_message(msg(0, hello("d1")), 0),
            Step::Authenticate(_)
        ));
        s.activate(Arc::from("d1"), 7, 0);
        s
    }

    fn code(step: Step) -> ErrorCode {
        match step {
            Step::Close(code, _) => code,
            other => panic!("expected Close, got {other:?}"),
        }
    }

    #[test]
    fn hello_asks_for_authentication_and_activation_enables_data() {
        let mut s = active();
        assert_eq!(
            s.device().map(|(d, e)| (d.to_string(), e)),
            Some(("d1".into(), 7))
        );
        assert!(matches!(
            s.on_message(msg(1, telemetry("t", 0)), 0),
            Step::Store { seq: 1, .. }
        ));
    }

    #[test]
    fn data_before_hello_is_refused() {
        let mut s = SessionState::new();
        assert_eq!(
            code(s.on_message(msg(1, telemetry("t", 0)), 0)),
            ErrorCode::HelloRequired
        );
        let mut s = SessionState::new();
        assert_eq!(
            code(s.on_message(msg(0, Body::Ping(Ping {})), 0)),
            ErrorCode::HelloRequired
        );
    }

    #[test]
    fn data_while_authenticating_is_refused() {
        let mut s = SessionState::new();
        assert!(matches!(
            s.on_message(msg(0, hello("d1")), 0),
            Step::Authenticate(_)
        ));
        assert_eq!(
            code(s.on_message(msg(1, telemetry("t", 0)), 0)),
            ErrorCode::HelloRequired
        );
    }

    #[test]
    fn a_hello_with_a_bad_device_id_is_malformed() {
        for id in ["", "a\nb", "a/b", "a+", "#", &"x".repeat(MAX_NAME_LEN + 1)] {
            let mut s = SessionState::new();
            assert_eq!(
                code(s.on_message(msg(0, hello(id)), 0)),
                ErrorCode::MalformedMessage
            );
        }
    }

    #[test]
    fn a_second_hello_on_a_serial_port_starts_a_new_session() {
        let mut s = SessionState::new_contiguous();
        assert!(matches!(
            s.on_message(msg(0, hello("d1")), 0),
            Step::Authenticate(_)
        ));
        s.activate("d1".into(), 7, 0);
        match s.on_message(msg(0, hello("d1")), 0) {
            Step::Authenticate(h) => assert_eq!(h.device_id, "d1"),
            other => panic!("expected a new authentication, got {other:?}"),
        }
        // Until it is authenticated, no data flows.
        assert_eq!(
            code(s.on_message(msg(1, telemetry("t", 0)), 0)),
            ErrorCode::HelloRequired
        );
    }

    #[test]
    fn a_second_hello_is_refused() {
        let mut s = active();
        assert_eq!(
            code(s.on_message(msg(0, hello("d1")), 0)),
            ErrorCode::UnexpectedHello
        );
    }

    #[test]
    fn a_message_without_a_known_body_is_unknown() {
        let mut s = active();
        let step = s.on_message(DeviceMessage { seq: 3, body: None }, 0);
        assert_eq!(code(step), ErrorCode::UnknownMessage);
    }

    #[test]
    fn data_with_seq_zero_is_invalid() {
        let mut s = active();
        assert_eq!(
            code(s.on_message(msg(0, telemetry("t", 0)), 0)),
            ErrorCode::InvalidSeq
        );
    }

    #[test]
    fn seq_must_rise_on_a_link_but_may_skip() {
        let mut s = active();
        assert!(matches!(
            s.on_message(msg(5, telemetry("t", 0)), 0),
            Step::Store { seq: 5, .. }
        ));
        assert!(matches!(
            s.on_message(msg(9, telemetry("t", 0)), 0),
            Step::Store { seq: 9, .. }
        ));
        assert_eq!(
            code(s.on_message(msg(9, telemetry("t", 0)), 0)),
            ErrorCode::InvalidSeq
        );
    }

    #[test]
    fn a_contiguous_link_repeats_and_skips_instead_of_closing() {
        let mut s = SessionState::new_contiguous();
        assert!(matches!(
            s.on_message(msg(0, hello("d1")), 0),
            Step::Authenticate(_)
        ));
        s.activate(Arc::from("d1"), 7, 4); // HelloAck said 4 is stored
        assert!(matches!(
            s.on_message(msg(5, telemetry("t", 0)), 0),
            Step::Store { seq: 5, .. }
        ));
        // 6 was lost to noise: 7 is past the gap.
        assert!(matches!(
            s.on_message(msg(7, telemetry("t", 0)), 0),
            Step::Skip(7)
        ));
        // The device resends from 5 after its ack timeout.
        assert!(matches!(
            s.on_message(msg(5, telemetry("t", 0)), 0),
            Step::Repeat(5)
        ));
        assert!(matches!(
            s.on_message(msg(6, telemetry("t", 0)), 0),
            Step::Store { seq: 6, .. }
        ));
        assert!(matches!(
            s.on_message(msg(7, telemetry("t", 0)), 0),
            Step::Store { seq: 7, .. }
        ));
        assert_eq!(
            code(s.on_message(msg(0, telemetry("t", 0)), 0)),
            ErrorCode::InvalidSeq
        );
    }

    #[test]
    fn ping_gets_pong_with_the_gateway_clock() {
        let mut s = active();
        match s.on_message(msg(0, Body::Ping(Ping {})), 1234) {
            Step::Reply(GatewayMessage {
                body: Some(gateway_message::Body::Pong(Pong { server_time_ms })),
            }) => assert_eq!(server_time_ms, 1234),
            other => panic!("expected Pong, got {other:?}"),
        }
    }

    #[test]
    fn readings_with_bad_sensor_names_or_timestamps_are_malformed() {
        let mut s = active();
        assert_eq!(
            code(s.on_message(msg(1, telemetry("", 0)), 0)),
            ErrorCode::MalformedMessage
        );
        let mut s = active();
        let step = s.on_message(msg(1, telemetry("t", u64::MAX)), 0);
        assert_eq!(code(step), ErrorCode::MalformedMessage);
    }

    #[test]
    fn events_are_stored_and_need_a_kind() {
        let mut s = active();
        let ev = |kind: &str| {
            Body::Event(Event {
                kind: kind.into(),
                message: "m".into(),
                severity: 2,
                timestamp_ms: 0,
            })
        };
        assert!(matches!(
            s.on_message(msg(1, ev("door")), 0),
            Step::Store { seq: 1, .. }
        ));
        assert_eq!(
            code(s.on_message(msg(2, ev("")), 0)),
            ErrorCode::MalformedMessage
        );
    }
}
