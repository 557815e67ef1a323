//! The task that runs one device link: reads frames, feeds them to the [`SessionState`],
//! authenticates, queues data to the store writer, and sends `Ack`s as commits land.
//!
//! Generic over the link (any `Stream` of decoded messages and `Sink` of replies), so TCP and
//! serial share it. It owns the link's timers (Hello timeout, idle timeout, write timeout)
//! and its shutdown: on cancellation it stops reading, waits (bounded) for its queued frames
//! to commit, sends the final `Ack` and `ERROR_CODE_SHUTTING_DOWN`, and closes.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::{Sink, SinkExt, Stream, StreamExt};
use proto::v1::{
    gateway_message, Ack, Command, ConfigUpdate, ErrorCode, GatewayMessage, Hello, HelloAck,
};
use proto::CodecError;
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use tracing::Instrument;

use super::state::{SessionState, Step};
use super::{LinkKind, Shared};
use crate::auth::AuthError;
use crate::bridge::StatusChange;
use crate::limits::{Limit, RateGate};
use crate::live::LiveEvent;
use crate::registry::{LinkInfo, Registration};
use crate::store::commands;
use crate::store::devices::HelloRecord;
use crate::store::writer::{Durable, FrameBody, Queued, WriteFrame, WriterStopped};
use crate::store::{devices, now_ms};

/// Why a link ended (for the log line and the error frame).
struct Closed {
    code: Option<ErrorCode>,
    reason: String,
}

impl Closed {
    fn with(code: ErrorCode, reason: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            reason: reason.into(),
        }
    }
    fn quietly(reason: impl Into<String>) -> Self {
        Self {
            code: None,
            reason: reason.into(),
        }
    }
}

/// How one session of a link ended.
enum Ended {
    /// The link is done.
    Closed(Closed),
    /// The device said Hello again on the same link (a serial device that restarted).
    HelloAgain(Hello),
}

fn codec_error_code(e: &CodecError) -> Option<ErrorCode> {
    match e {
        CodecError::BadFraming | CodecError::NoisyLine(_) => Some(ErrorCode::BadFraming),
        CodecError::FrameTooLarge { .. } => Some(ErrorCode::FrameTooLarge),
        CodecError::Malformed(_) => Some(ErrorCode::MalformedMessage),
        CodecError::Io(_) => None,
    }
}

fn message(body: gateway_message::Body) -> GatewayMessage {
    GatewayMessage { body: Some(body) }
}

/// Runs one link to its end. `kind` decides the seq rules and shows in device status;
/// `peer` is its address (`127.0.0.1:5555`, or the serial port's path) for logs and the API.
///
/// Not an `async fn`, nor is `run_in`: an `async fn` keeps its arguments twice in its state
/// (as passed and as moved into its body), and this state is what every idle link costs.
pub fn run<L>(
    shared: Arc<Shared>,
    link: L,
    kind: LinkKind,
    peer: String,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()>
where
    L: Stream<Item = Result<proto::v1::DeviceMessage, CodecError>>
        + Sink<GatewayMessage, Error = CodecError>
        + Unpin,
{
    // Every line a link logs names its peer and, once known, its device. Info level, so a
    // warning about a bad frame says whose it was.
    let span =
        tracing::info_span!("link", link = kind.as_str(), %peer, device = tracing::field::Empty);
    shared.metrics.record_connection(kind.as_str());
    run_in(shared, link, kind, Arc::from(peer), shutdown, span.clone()).instrument(span)
}

fn run_in<L>(
    shared: Arc<Shared>,
    link: L,
    kind: LinkKind,
    peer: Arc<str>,
    shutdown: CancellationToken,
    span: tracing::Span,
) -> impl std::future::Future<Output = ()>
where
    L: Stream<Item = Result<proto::v1::DeviceMessage, CodecError>>
        + Sink<GatewayMessage, Error = CodecError>
        + Unpin,
{
    let mut link = link;
    async move {
        let addr = peer.parse::<std::net::SocketAddr>().ok().map(|a| a.ip());
        let mut session = Session {
            shared: &shared,
            kind: kind.as_str(),
            claimed: None,
            peer,
            source: addr,
            // A serial port is dedicated to its device, which may boot long after the port
            // opens: only TCP links must say Hello in time.
            hello_timeout: match kind {
                LinkKind::Tcp | LinkKind::Tls => shared.config.hello_timeout,
                LinkKind::Serial => Duration::from_secs(365 * 24 * 3600),
            },
            state: match kind {
                LinkKind::Tcp | LinkKind::Tls => SessionState::new(),
                LinkKind::Serial => SessionState::new_contiguous(),
            },
            last_forwarded: 0,
            last_acked: 0,
            in_flight: VecDeque::new(),
        };
        let refused = addr.and_then(|a| shared.guard.refused(a, now_ms()));
        // Held until the link ends: its place under `limits.max_connections`.
        let slot = match kind {
            LinkKind::Serial => Ok(None),
            LinkKind::Tcp | LinkKind::Tls => shared.limits.connect(addr).map(Some),
        };
        let closed = match (refused, slot) {
            (_, Err(reason)) => Closed::with(ErrorCode::LimitExceeded, reason),
            (Some(left), _) => {
                shared.metrics.security_refused.inc();
                Closed::with(
                    ErrorCode::LimitExceeded,
                    format!(
                        "too many failed links from this address; refused for another {}",
                        humantime::format_duration(Duration::from_secs(left.as_secs().max(1)))
                    ),
                )
            }
            (None, Ok(_slot)) => session.serve(&mut link, &shutdown, &span).await,
        };
        if let (Some(addr), Some(code)) = (addr, closed.code) {
            if counts_against_source(code) {
                shared.guard.failure(
                    addr,
                    code.as_str_name(),
                    session.claimed.as_deref(),
                    now_ms(),
                );
            }
        }
        if let Some(code) = closed.code {
            shared.metrics.record_link_error(code);
            let err = message(gateway_message::Body::Error(proto::v1::Error {
                code: code as i32,
                message: closed.reason.clone(),
            }));
            // Best effort: the peer may already be gone or not reading.
            let _ = timeout(shared.config.write_timeout, link.send(err)).await;
            match code {
                ErrorCode::Superseded | ErrorCode::ShuttingDown => {
                    debug!(code = code.as_str_name(), "link closed: {}", closed.reason)
                }
                _ => match shared.metrics.link_error_to_log(code, now_ms() as u64) {
                    Some(0) => warn!(code = code.as_str_name(), "link closed: {}", closed.reason),
                    Some(unlogged) => warn!(
                    code = code.as_str_name(),
                    unlogged,
                    "link closed: {} (and {unlogged} more with this code since the last such line)",
                    closed.reason
                ),
                    None => debug!(code = code.as_str_name(), "link closed: {}", closed.reason),
                },
            }
        } else {
            debug!("link closed: {}", closed.reason);
        }
        let _ = timeout(Duration::from_secs(1), link.close()).await;
    }
}

/// Whether a link closed with `code` counts as a failure of its source address (bad
/// credentials or bad bytes; not timeouts of a live device, not the gateway's own doing).
fn counts_against_source(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::AuthFailed
            | ErrorCode::BadFraming
            | ErrorCode::FrameTooLarge
            | ErrorCode::MalformedMessage
            | ErrorCode::HelloRequired
            | ErrorCode::HelloTimeout
            | ErrorCode::DeviceRevoked
    )
}

struct Session<'a> {
    shared: &'a Shared,
    /// The device id the link's Hello claimed (before authentication).
    claimed: Option<Arc<str>>,
    /// Link kind, for device status.
    kind: &'static str,
    /// Peer address or serial port, for the device list.
    peer: Arc<str>,
    /// The peer's IP address (`None` on a serial line), for `[limits]`.
    source: Option<std::net::IpAddr>,
    /// How long the link may take to say Hello.
    hello_timeout: Duration,
    state: SessionState,
    /// Highest seq queued to the writer.
    last_forwarded: u64,
    /// Highest seq acknowledged to the device.
    last_acked: u64,
    /// (seq, arrival) of frames queued and not yet acknowledged, oldest first: the ack
    /// latency histogram takes the oldest frame each Ack covers. Empty (no allocation) on
    /// an idle link.
    in_flight: VecDeque<(u64, Instant)>,
}

impl Session<'_> {
    async fn send<L>(&self, link: &mut L, msg: GatewayMessage) -> Result<(), Closed>
    where
        L: Sink<GatewayMessage, Error = CodecError> + Unpin,
    {
        match timeout(self.shared.config.write_timeout, link.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Closed::quietly(format!("write failed: {e}"))),
            Err(_) => Err(Closed::quietly("device stopped reading (write timeout)")),
        }
    }

    async fn serve<L>(
        &mut self,
        link: &mut L,
        shutdown: &CancellationToken,
        span: &tracing::Span,
    ) -> Closed
    where
        L: Stream<Item = Result<proto::v1::DeviceMessage, CodecError>>
            + Sink<GatewayMessage, Error = CodecError>
            + Unpin,
    {
        // Hello phase.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return Closed::with(ErrorCode::ShuttingDown, "gateway is shutting down"),
            r = timeout(self.hello_timeout, link.next()) => r,
        };
        let mut hello = match first {
            Err(_) => {
                return Closed::with(ErrorCode::HelloTimeout, "no Hello within the hello timeout")
            }
            Ok(None) => return Closed::quietly("peer closed before Hello"),
            Ok(Some(Err(e))) => {
                return Closed {
                    code: codec_error_code(&e),
                    reason: e.to_string(),
                }
            }
            Ok(Some(Ok(msg))) => match self.state.on_message(msg, now_ms() as u64) {
                Step::Authenticate(hello) => hello,
                Step::Close(code, reason) => return Closed::with(code, reason),
                Step::Store { .. } | Step::Reply(_) | Step::Repeat(_) | Step::Skip(_) => {
                    return Closed::with(
                        ErrorCode::HelloRequired,
                        "the first message must be Hello",
                    )
                }
            },
        };
        loop {
            match self.session(link, shutdown, span, hello).await {
                Ended::Closed(closed) => return closed,
                Ended::HelloAgain(next) => {
                    debug!("the device said Hello again: a new session on this link");
                    hello = next;
                }
            }
        }
    }

    /// One authenticated session of the link, from its Hello.
    async fn session<L>(
        &mut self,
        link: &mut L,
        shutdown: &CancellationToken,
        span: &tracing::Span,
        hello: Hello,
    ) -> Ended
    where
        L: Stream<Item = Result<proto::v1::DeviceMessage, CodecError>>
            + Sink<GatewayMessage, Error = CodecError>
            + Unpin,
    {
        self.last_forwarded = 0;
        self.last_acked = 0;
        self.in_flight.clear();
        let device: Arc<str> = Arc::from(hello.device_id.as_str());
        span.record("device", &*device);
        self.claimed = Some(device.clone());
        // Before any credential is checked: a source sending Hellos faster than
        // `limits.hellos_per_second_per_source` waits its turn.
        match self.shared.limits.hello(self.source, Instant::now()) {
            Ok(wait) if wait.is_zero() => {}
            Ok(wait) => {
                tokio::select! {
                    _ = Box::pin(sleep(wait)) => {}
                    _ = shutdown.cancelled() => {
                        return Ended::Closed(Closed::with(ErrorCode::ShuttingDown, "gateway is shutting down"))
                    }
                }
            }
            Err(reason) => return Ended::Closed(Closed::with(ErrorCode::LimitExceeded, reason)),
        }
        // A device the store has never seen takes a place under `limits.max_devices`.
        let admit = || self.shared.limits.new_device(&device);
        match self.shared.auth.check(&device, &hello.token, admit).await {
            Ok(()) => {}
            Err(AuthError::Limit(reason)) => {
                return Ended::Closed(Closed::with(ErrorCode::LimitExceeded, reason))
            }
            Err(AuthError::Failed) => {
                return Ended::Closed(Closed::with(
                    ErrorCode::AuthFailed,
                    "unknown device or wrong token",
                ))
            }
            Err(AuthError::Revoked) => {
                return Ended::Closed(Closed::with(ErrorCode::DeviceRevoked, "device is revoked"))
            }
            Err(AuthError::Store(e)) => {
                return Ended::Closed(Closed::with(ErrorCode::Internal, format!("store: {e}")))
            }
        }
        let last_seq = match devices::last_seq(&self.shared.pool, &device, hello.epoch).await {
            Ok(s) => s,
            Err(e) => {
                return Ended::Closed(Closed::with(ErrorCode::Internal, format!("store: {e}")))
            }
        };
        let connected_ms = now_ms();
        let mut registration = self.shared.registry.register(
            &device,
            LinkInfo {
                link: self.kind,
                peer: self.peer.clone(),
                firmware_version: hello.firmware_version.clone(),
                epoch: hello.epoch,
                connected_ms,
            },
        );
        let _ = self.shared.hellos.try_send(HelloRecord {
            device: device.clone(),
            firmware_version: hello.firmware_version.clone(),
            link: self.kind,
            peer: self.peer.clone(),
            ts_ms: connected_ms,
        });
        self.report_status(&device, true, Some(hello.firmware_version.clone()));
        self.state.activate(device.clone(), hello.epoch, last_seq);
        self.shared.metrics.sessions_active.inc_by(1);
        debug!(epoch = hello.epoch, last_seq, firmware = %hello.firmware_version, "device said hello");

        let ended = self
            .active(
                link,
                shutdown,
                &mut registration,
                device.clone(),
                hello.epoch,
                last_seq,
            )
            .await;

        if self.shared.registry.unregister(&device, registration.conn) {
            self.report_status(&device, false, None);
        }
        self.shared.metrics.sessions_active.dec_by(1);
        ended
    }

    /// Tells the bridge (if any) and the live feed that the device came or went.
    fn report_status(&self, device: &Arc<str>, online: bool, firmware_version: Option<String>) {
        let change = StatusChange {
            device: device.clone(),
            online,
            link: self.kind,
            firmware_version,
            ts_ms: now_ms(),
        };
        if self.shared.hub.has_subscribers() {
            self.shared
                .hub
                .publish(LiveEvent::Status(Arc::new(change.clone())));
        }
        if let Some(bridge) = &self.shared.bridge {
            bridge.status(change);
        }
    }

    /// Writes a command to the device and records that it was delivered.
    async fn deliver<L>(&self, link: &mut L, device: &str, command: Command) -> Result<(), Closed>
    where
        L: Sink<GatewayMessage, Error = CodecError> + Unpin,
    {
        let id = command.id.clone();
        self.send(link, message(gateway_message::Body::Command(command)))
            .await?;
        if let Err(e) = commands::mark_sent(&self.shared.pool, device, &id, now_ms()).await {
            warn!(error = %e, command = %id, "recording a command delivery failed");
        }
        Ok(())
    }

    /// The session after Hello: data, acks and commands until the link closes, or until a
    /// new Hello (a serial device that restarted) once what this session queued is durable
    /// and acknowledged.
    async fn active<L>(
        &mut self,
        link: &mut L,
        shutdown: &CancellationToken,
        registration: &mut Registration,
        device: Arc<str>,
        epoch: u64,
        last_seq: u64,
    ) -> Ended
    where
        L: Stream<Item = Result<proto::v1::DeviceMessage, CodecError>>
            + Sink<GatewayMessage, Error = CodecError>
            + Unpin,
    {
        let hello_ack = message(gateway_message::Body::HelloAck(HelloAck {
            last_seq,
            server_time_ms: now_ms() as u64,
        }));
        if let Err(closed) = self.send(link, hello_ack).await {
            return Ended::Closed(closed);
        }
        // Commands that waited for this device (at least once: one may also arrive through
        // the registry; devices treat a repeated id as done). Loaded beside the frame loop:
        // a busy store must not keep the device's first frames unread.
        let mut waiting = self.shared.registry.may_have_commands(&device).then(|| {
            tokio::spawn({
                let pool = self.shared.pool.clone();
                let device = device.clone();
                async move { commands::open_for_device(&pool, &device, now_ms()).await }
            })
        });
        let pace = registration.state.clone();
        let mut told_interval = 0;
        let (ack_tx, mut acks) = watch::channel(Durable::default());
        let ack_tx = Arc::new(ack_tx);
        let idle_timeout = self.shared.config.idle_timeout;
        let mut idle_at = Instant::now() + idle_timeout;
        let limits = self.shared.limits.config();
        // `limits.device_readings_per_second`: while over, the link is not read.
        let mut gate = RateGate::new(limits.device_readings_per_second, Instant::now());
        // One timer, made once and reset when needed (a timer made per loop turn costs every
        // frame; each one kept costs every idle link): the idle deadline, or while `holding`
        // the end of a rate-limit hold.
        let timer = sleep_until(idle_at);
        tokio::pin!(timer);
        let mut holding = false;
        // The device's sensor names, sorted, loaded at its first Telemetry.
        let mut sensors: Option<Vec<Box<str>>> = None;

        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    let drained = Box::pin(self.drain(link, &mut acks)).await;
                    return Ended::Closed(drained.err().unwrap_or_else(|| Closed::with(ErrorCode::ShuttingDown, "gateway is shutting down")));
                }
                _ = registration.ended.cancelled() => {
                    return Ended::Closed(if registration.state.revoked() {
                        Closed::with(ErrorCode::DeviceRevoked, "the device was revoked by an operator")
                    } else {
                        Closed::with(ErrorCode::Superseded, "a newer link of this device connected")
                    });
                }
                Ok(()) = acks.changed() => {
                    if let Err(closed) = self.send_ack(link, &mut acks).await {
                        return Ended::Closed(closed);
                    }
                }
                // The pacer changed this link's interval.
                _ = pace.pace.changed.notified() => {
                    let ms = pace.pace.interval_ms();
                    if ms == told_interval {
                        continue;
                    }
                    told_interval = ms;
                    let update = message(gateway_message::Body::ConfigUpdate(ConfigUpdate {
                        min_report_interval_ms: ms,
                    }));
                    if let Err(closed) = self.send(link, update).await {
                        return Ended::Closed(closed);
                    }
                }
                Some(loaded) = async {
                    match waiting.as_mut() {
                        Some(w) => Some(w.await),
                        None => None,
                    }
                }, if waiting.is_some() => {
                    waiting = None;
                    match loaded {
                        Ok(Ok(commands)) => {
                            for command in commands {
                                if let Err(closed) = Box::pin(self.deliver(link, &device, command)).await {
                                    return Ended::Closed(closed);
                                }
                            }
                        }
                        Ok(Err(e)) => warn!(error = %e, "loading waiting commands failed; they are delivered at the next connection"),
                        Err(_) => {}
                    }
                }
                _ = pace.command_ready.notified() => {
                    while let Some(command) = pace.next_command() {
                        if let Err(closed) = Box::pin(self.deliver(link, &device, *command)).await {
                            return Ended::Closed(closed);
                        }
                    }
                }
                _ = &mut timer => {
                    if !holding {
                        return Ended::Closed(Closed::with(ErrorCode::IdleTimeout, format!("nothing received for {idle_timeout:?}")));
                    }
                    holding = false;
                    timer.as_mut().reset(idle_at);
                }
                frame = link.next(), if !holding => {
                    let msg = match frame {
                        // A device may half-close after its last frame and still read:
                        // answer what it sent before closing our side.
                        None => {
                            let drained = Box::pin(self.drain(link, &mut acks)).await;
                            return Ended::Closed(drained.err().unwrap_or_else(|| Closed::quietly("peer closed the link")));
                        }
                        Some(Err(e)) => return Ended::Closed(Closed { code: codec_error_code(&e), reason: e.to_string() }),
                        Some(Ok(msg)) => msg,
                    };
                    let arrived = Instant::now();
                    idle_at = arrived + idle_timeout;
                    timer.as_mut().reset(idle_at);
                    let received_ms = now_ms();
                    registration.state.last_seen_ms.store(received_ms, Ordering::Relaxed);
                    match self.state.on_message(msg, received_ms as u64) {
                        Step::Store { seq, body } => {
                            if let FrameBody::Telemetry(t) = &body {
                                if let Err(closed) = self.check_telemetry(&device, t, &mut sensors).await {
                                    return Ended::Closed(closed);
                                }
                            }
                            if let Some(gate) = gate.as_mut() {
                                let wait = gate.take(body.readings(), arrived);
                                if !wait.is_zero() {
                                    self.shared.limits.hit(Limit::DeviceRate);
                                    timer.as_mut().reset(arrived + wait);
                                    holding = true;
                                }
                            }
                            pace.pace.frame(body.readings());
                            let frame = WriteFrame {
                                device: device.clone(),
                                epoch,
                                seq,
                                received_ms,
                                body,
                                acks: ack_tx.clone(),
                            };
                            self.in_flight.push_back((seq, arrived));
                            // The queue-full path is boxed (see `WriterHandle::queue`).
                            let queued = match self.shared.writer.queue(frame) {
                                Queued::Done => Ok(()),
                                Queued::Stopped => Err(WriterStopped),
                                Queued::Wait(wait) => wait.await,
                            };
                            if queued.is_err() {
                                return Ended::Closed(Closed::with(ErrorCode::ShuttingDown, "the store is closed"));
                            }
                            self.last_forwarded = seq;
                        }
                        Step::Reply(reply) => {
                            if let Err(closed) = self.send(link, reply).await {
                                return Ended::Closed(closed);
                            }
                        }
                        Step::Close(code, reason) => return Ended::Closed(Closed::with(code, reason)),
                        Step::Repeat(seq) => {
                            // The device missed an ack: say again how far it is durable.
                            if seq <= self.last_acked {
                                let ack = message(gateway_message::Body::Ack(Ack { seq: self.last_acked }));
                                if let Err(closed) = self.send(link, ack).await {
                                    return Ended::Closed(closed);
                                }
                            }
                        }
                        Step::Skip(seq) => {
                            self.shared.metrics.serial_frames_skipped.inc();
                            debug!(seq, "frame past a gap skipped; the device resends from the missing one");
                        }
                        Step::Authenticate(hello) => {
                            // The device restarted (serial): answer what it sent before.
                            return match Box::pin(self.drain(link, &mut acks)).await {
                                Ok(()) => Ended::HelloAgain(hello),
                                Err(closed) => Ended::Closed(closed),
                            };
                        }
                    }
                }
            }
        }
    }

    /// `limits.max_readings_per_frame` and `limits.max_sensors_per_device` for one
    /// Telemetry frame, before it is queued (a refused frame is neither stored nor acked).
    async fn check_telemetry(
        &self,
        device: &str,
        t: &proto::v1::Telemetry,
        sensors: &mut Option<Vec<Box<str>>>,
    ) -> Result<(), Closed> {
        let limits = &self.shared.limits;
        let config = limits.config();
        let max = config.max_readings_per_frame;
        if t.readings.len() > max as usize {
            limits.hit(Limit::ReadingsPerFrame);
            return Err(Closed::with(
                ErrorCode::LimitExceeded,
                format!(
                    "a frame of {} readings (limits.max_readings_per_frame = {max})",
                    t.readings.len()
                ),
            ));
        }
        let known = match sensors {
            Some(known) => known,
            None => {
                // Boxed: the query's state would otherwise sit in every idle session.
                let names = Box::pin(devices::sensor_names(&self.shared.reads, device))
                    .await
                    .map_err(|e| Closed::with(ErrorCode::Internal, format!("store: {e}")))?;
                let mut names: Vec<Box<str>> =
                    names.into_iter().map(String::into_boxed_str).collect();
                names.sort_unstable();
                names.dedup();
                sensors.insert(names)
            }
        };
        let max = config.max_sensors_per_device as usize;
        for r in &t.readings {
            if let Err(at) = known.binary_search_by(|k| (**k).cmp(r.sensor.as_str())) {
                if known.len() >= max {
                    limits.hit(Limit::SensorsPerDevice);
                    return Err(Closed::with(
                        ErrorCode::LimitExceeded,
                        format!(
                            "new sensor {:?}: the device has {} (limits.max_sensors_per_device = {max})",
                            r.sensor,
                            known.len()
                        ),
                    ));
                }
                known.insert(at, r.sensor.as_str().into());
            }
        }
        Ok(())
    }

    /// Sends an `Ack` for the newest durable seq, or closes if the commit failed.
    async fn send_ack<L>(
        &mut self,
        link: &mut L,
        acks: &mut watch::Receiver<Durable>,
    ) -> Result<(), Closed>
    where
        L: Sink<GatewayMessage, Error = CodecError> + Unpin,
    {
        let durable = *acks.borrow_and_update();
        if durable.failed {
            return Err(Closed::with(
                ErrorCode::Internal,
                "the store failed to commit; reconnect and resend",
            ));
        }
        if durable.seq > self.last_acked {
            self.last_acked = durable.seq;
            let mut oldest = None;
            while let Some(&(seq, arrived)) = self.in_flight.front() {
                if seq > durable.seq {
                    break;
                }
                oldest.get_or_insert(arrived);
                self.in_flight.pop_front();
            }
            if let Some(arrived) = oldest {
                self.shared
                    .metrics
                    .ack_latency
                    .observe(arrived.elapsed().as_secs_f64());
            }
            self.send(
                link,
                message(gateway_message::Body::Ack(Ack { seq: durable.seq })),
            )
            .await?;
        }
        Ok(())
    }

    /// The end of a session (shutdown, end of input, a new Hello): stop reading, wait
    /// (bounded) until what was queued is durable, and acknowledge it. `Err` when the link
    /// failed on the way.
    async fn drain<L>(
        &mut self,
        link: &mut L,
        acks: &mut watch::Receiver<Durable>,
    ) -> Result<(), Closed>
    where
        L: Sink<GatewayMessage, Error = CodecError> + Unpin,
    {
        let target = self.last_forwarded;
        let wait = acks.wait_for(|d| d.failed || d.seq >= target);
        if timeout(self.shared.config.drain_timeout, wait)
            .await
            .is_err()
        {
            warn!(
                target,
                "queued frames were not committed in time; the device will resend them"
            );
        }
        self.send_ack(link, acks).await
    }
}
