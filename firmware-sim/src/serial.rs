//! One simulated device on a serial port, with line noise.
//!
//! Same behaviour as over TCP (Hello, resend after HelloAck, keep every unacknowledged frame)
//! plus what a serial line needs: frames are COBS + CRC-32 ([`proto::serial`]), the device
//! numbers its frames without gaps, and when no ack has come for `ACK_TIMEOUT` it resends
//! everything unacknowledged from the oldest, because a frame (or an ack) can be lost to
//! noise. `Noise` flips and drops bytes of what it sends, so that is testable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use proto::serial::{encode_frame, SerialCodec};
use proto::v1::{device_message::Body, gateway_message, DeviceMessage, GatewayMessage, Ping};
use rand::Rng;
use tokio::io::AsyncWriteExt;
use tokio::time::{sleep_until, Instant};
use tokio_serial::SerialPortBuilderExt;
use tokio_util::codec::Framed;

use crate::device::{Device, DeviceOutcome, LinkEnd, Timing};
use crate::timeline::Action;

/// With no ack for this long, resend everything unacknowledged.
pub const ACK_TIMEOUT: Duration = Duration::from_millis(250);

/// Most unacknowledged frames on a serial line: after a loss the gateway skips everything
/// past the gap, so a small window keeps each resend short.
pub const SERIAL_WINDOW: usize = 16;

/// Damage done to the bytes the device sends.
#[derive(Debug, Clone, Copy, Default)]
pub struct Noise {
    /// Share of bytes flipped (XOR with a random non-zero byte).
    pub corrupt: f64,
    /// Share of bytes dropped.
    pub drop: f64,
}

impl Noise {
    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        if self.corrupt <= 0.0 && self.drop <= 0.0 {
            return bytes.to_vec();
        }
        let mut rng = rand::rng();
        let mut out = Vec::with_capacity(bytes.len());
        for &b in bytes {
            if self.drop > 0.0 && rng.random_bool(self.drop.min(1.0)) {
                continue;
            }
            if self.corrupt > 0.0 && rng.random_bool(self.corrupt.min(1.0)) {
                out.push(b ^ rng.random_range(1..=255u8));
            } else {
                out.push(b);
            }
        }
        out
    }
}

/// A serial frame for a message already encoded length-delimited (as frames are kept).
fn reframe(delimited: &[u8]) -> BytesMut {
    let mut raw = delimited;
    let len = prost::decode_length_delimiter(&mut raw).unwrap_or(0);
    let msg = &raw[..len.min(raw.len())];
    // Re-encode: serial frames carry the bare message with its CRC.
    let mut out = BytesMut::new();
    match <DeviceMessage as prost::Message>::decode(msg) {
        Ok(m) => encode_frame(&m, &mut out),
        Err(_) => out.extend_from_slice(&[0]),
    }
    out
}

type Port = Framed<tokio_serial::SerialStream, SerialCodec<GatewayMessage>>;

impl Device {
    /// Runs the device on the serial port at `path` until its timing says stop.
    pub async fn run_serial(
        mut self,
        path: &Path,
        baud: u32,
        noise: Noise,
        timing: Timing,
    ) -> Vec<DeviceOutcome> {
        self.plan(timing.origin);
        sleep_until(timing.start_at).await;
        let mut first = true;
        loop {
            if Instant::now() >= timing.drain_until
                || (Instant::now() >= timing.stop_at && self.pending.is_empty())
            {
                break;
            }
            if !first {
                self.stats.inc_reconnects();
            }
            first = false;
            match self.serial_link(path, baud, noise, timing).await {
                LinkEnd::Done => break,
                LinkEnd::Refused(code) => {
                    self.outcome.gave_up = Some(code);
                    break;
                }
                LinkEnd::Lost => {
                    // A fault (cable pulled, reboot) says when to come back.
                    let until = self
                        .hold_until
                        .take()
                        .unwrap_or_else(|| Instant::now() + Duration::from_millis(200));
                    tokio::select! {
                        _ = sleep_until(until) => {}
                        _ = sleep_until(timing.drain_until) => break,
                    }
                }
            }
        }
        self.finish()
    }

    async fn send_noisy(port: &mut Port, noise: Noise, frame: &[u8]) -> bool {
        port.get_mut().write_all(&noise.apply(frame)).await.is_ok()
    }

    async fn serial_link(
        &mut self,
        path: &Path,
        baud: u32,
        noise: Noise,
        timing: Timing,
    ) -> LinkEnd {
        let Ok(stream) = tokio_serial::new(path.to_string_lossy(), baud).open_native_async() else {
            return LinkEnd::Lost;
        };
        let mut port: Port = Framed::new(stream, SerialCodec::default());
        let mut hello_frame = BytesMut::new();
        encode_frame(&self.hello(), &mut hello_frame);
        // Hello (again, if noise ate it or its answer) until HelloAck.
        let last_seq = loop {
            if Instant::now() >= timing.drain_until {
                return LinkEnd::Done;
            }
            if !Self::send_noisy(&mut port, noise, &hello_frame).await {
                return LinkEnd::Lost;
            }
            let deadline = Instant::now() + Duration::from_secs(1);
            let answer = loop {
                tokio::select! {
                    _ = sleep_until(deadline) => break None,
                    msg = port.next() => match msg {
                        Some(Ok(Ok(GatewayMessage { body: Some(gateway_message::Body::HelloAck(a)) }))) => break Some(a.last_seq),
                        Some(Ok(Ok(GatewayMessage { body: Some(gateway_message::Body::Error(e)) }))) => return self.on_error(&e),
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return LinkEnd::Lost,
                    },
                }
            };
            if let Some(last_seq) = answer {
                break last_seq;
            }
        };
        self.new_session();
        self.acked(last_seq);
        let mut last_progress = Instant::now();
        if !self.resend_all(&mut port, noise).await {
            return LinkEnd::Lost;
        }
        let period = (self.spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / self.spec.rate));
        let mut next_send = Instant::now();
        let mut last_write = Instant::now();
        loop {
            let producing = Instant::now() < timing.stop_at;
            if !producing && self.pending.is_empty() && self.answers.is_empty() {
                return LinkEnd::Done;
            }
            let window = self.spec.window.min(SERIAL_WINDOW);
            let can_send = producing && self.pending.len() < window;
            let answer_ready = !self.answers.is_empty() && self.pending.len() < window;
            let answer_due = self.answers.front().map_or_else(Instant::now, |a| a.0);
            let resend_due = last_progress + ACK_TIMEOUT;
            let now = Instant::now();
            let fault_at = self.next_fault_at();
            let slow_until = self.slow_until.filter(|u| *u > now);
            tokio::select! {
                biased;
                _ = sleep_until(fault_at.unwrap_or(now)), if fault_at.is_some() => {
                    let Some(action) = self.take_fault() else { continue };
                    if let Some(end) = self.serial_fault(action, &mut port).await {
                        return end;
                    }
                    if matches!(action, Action::Burst(_)) {
                        next_send = Instant::now();
                    }
                }
                _ = sleep_until(slow_until.unwrap_or(now)), if slow_until.is_some() => {}
                msg = port.next(), if slow_until.is_none() => match msg {
                    Some(Ok(Ok(GatewayMessage { body: Some(gateway_message::Body::Ack(ack)) }))) => {
                        let before = self.pending.len();
                        self.acked(ack.seq);
                        if self.pending.len() < before {
                            last_progress = Instant::now();
                        }
                    }
                    Some(Ok(Ok(GatewayMessage { body: Some(gateway_message::Body::Error(e)) }))) => return self.on_error(&e),
                    Some(Ok(Ok(GatewayMessage { body: Some(gateway_message::Body::Command(c)) }))) => self.on_command(c),
                    Some(Ok(Ok(GatewayMessage { body: Some(gateway_message::Body::ConfigUpdate(c)) }))) => self.on_config(&c),
                    Some(Ok(_)) => {} // a pong, or a frame damaged on the way back
                    Some(Err(_)) | None => return LinkEnd::Lost,
                },
                _ = sleep_until(timing.drain_until) => return LinkEnd::Done,
                _ = sleep_until(resend_due), if !self.pending.is_empty() => {
                    if !self.resend_all(&mut port, noise).await {
                        return LinkEnd::Lost;
                    }
                    last_progress = Instant::now();
                }
                _ = sleep_until(timing.stop_at), if producing => {}
                _ = sleep_until(answer_due), if answer_ready => {
                    if let Some((_, result)) = self.answers.pop_front() {
                        let frame = self.data_frame(Body::CommandResult(result), None);
                        self.outcome.result_seqs.push(frame.seq);
                        if !self.send_new_serial(&mut port, noise, frame).await {
                            return LinkEnd::Lost;
                        }
                        last_write = Instant::now();
                    }
                }
                _ = sleep_until(next_send), if can_send => {
                    if let Some(frame) = self.next_frame() {
                        if !self.send_new_serial(&mut port, noise, frame).await {
                            return LinkEnd::Lost;
                        }
                        last_write = Instant::now();
                    }
                    next_send = self.next_send_at(next_send, period);
                }
                _ = sleep_until(last_write + self.spec.keepalive) => {
                    let mut ping = BytesMut::new();
                    encode_frame(&DeviceMessage { seq: 0, body: Some(Body::Ping(Ping {})) }, &mut ping);
                    if !Self::send_noisy(&mut port, noise, &ping).await {
                        return LinkEnd::Lost;
                    }
                    last_write = Instant::now();
                }
            }
        }
    }

    /// A fault on a serial line. Garbage and oversize frames end with the terminator, so
    /// the gateway drops them as one bad frame each; the rest are as over TCP (a storm is the
    /// cable pulled for `down`, a reboot says Hello again in a new epoch).
    async fn serial_fault(&mut self, action: Action, port: &mut Port) -> Option<LinkEnd> {
        let junk = match action {
            Action::Corrupt => vec![0x04, 0x0F, 0xFF, 0xFF, 0xFF, 0x00],
            // Larger than any gateway's serial frame limit.
            Action::Oversize => {
                let mut big = vec![0x55; 80 * 1024];
                big.push(0x00);
                big
            }
            _ => return self.commit(action, port.get_mut()).await,
        };
        port.get_mut()
            .write_all(&junk)
            .await
            .err()
            .map(|_| LinkEnd::Lost)
    }

    async fn send_new_serial(
        &mut self,
        port: &mut Port,
        noise: Noise,
        frame: crate::device::Pending,
    ) -> bool {
        let ok = Self::send_noisy(port, noise, &reframe(&frame.bytes)).await;
        self.outcome.frames_sent += 1;
        self.stats.add_sent(1);
        self.pending.push_back(frame);
        ok
    }

    /// Resends every unacknowledged frame, oldest first.
    async fn resend_all(&mut self, port: &mut Port, noise: Noise) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let mut bytes = BytesMut::new();
        for p in &self.pending {
            bytes.extend_from_slice(&reframe(&p.bytes));
        }
        self.stats.add_resent(self.pending.len() as u64);
        Self::send_noisy(port, noise, &bytes).await
    }
}

/// Where a serial device runs.
#[derive(Debug, Clone)]
pub struct SerialTarget {
    /// The port.
    pub path: PathBuf,
    /// Its speed.
    pub baud: u32,
    /// Noise on what the device sends.
    pub noise: Noise,
}
