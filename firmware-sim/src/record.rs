//! Recording device traffic and playing it back.
//!
//! A recording is JSON lines: a header, then one line per event of a device connection, in
//! the order they happened, each with microseconds since the recording began:
//!
//! ```text
//! {"format":"firmware-sim-record","version":1}
//! {"t_us":1200,"conn":0,"event":"open"}
//! {"t_us":1350,"conn":0,"data":"CgQIARIA..."}      (base64 of bytes the device sent)
//! {"t_us":98000,"conn":0,"event":"close"}
//! ```
//!
//! Only what devices send is recorded: replaying it to a gateway recreates their side of the
//! conversation (Hello, frames, resends, garbage) at the original pace or faster, and the
//! gateway answers as it does. `--record` on a simulated run and `firmware-sim proxy` in
//! front of real devices both write this format.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine;
use futures::StreamExt;
use prost::Message;
use proto::v1::{device_message, gateway_message, DeviceMessage, ErrorCode, GatewayMessage};
use proto::DelimitedCodec;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

use crate::tls::Io;

const FORMAT: &str = "firmware-sim-record";

/// After a replayed connection's last bytes, how long to wait for the gateway to answer
/// them and close (closing sooner could cut off frames it has not read yet).
const LINGER: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct Line {
    t_us: u64,
    conn: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<String>,
}

/// Writes a recording. Shared by every connection; each line is written whole, in order.
/// Writing is synchronous into a buffer: a slow disk slows the devices (backpressure), it
/// never drops what they sent.
pub struct Recorder {
    out: Mutex<std::io::BufWriter<std::fs::File>>,
    start: Instant,
    next_conn: AtomicU64,
    error: Mutex<Option<std::io::Error>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    /// Creates (or truncates) the recording at `path`.
    pub fn create(path: &Path) -> anyhow::Result<Arc<Self>> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("creating the recording {}", path.display()))?;
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
        let header = serde_json::to_string(&Header {
            format: FORMAT.into(),
            version: 1,
        })?;
        writeln!(out, "{header}")?;
        Ok(Arc::new(Self {
            out: Mutex::new(out),
            start: Instant::now(),
            next_conn: AtomicU64::new(0),
            error: Mutex::new(None),
        }))
    }

    fn line(&self, conn: u64, event: Option<&str>, data: Option<&[u8]>) {
        let line = Line {
            t_us: self.start.elapsed().as_micros() as u64,
            conn,
            event: event.map(str::to_owned),
            data: data.map(|d| base64::engine::general_purpose::STANDARD.encode(d)),
        };
        let Ok(text) = serde_json::to_string(&line) else {
            return;
        };
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = writeln!(out, "{text}") {
            self.error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
    }

    /// A new connection: its id for [`Recorder::data`] and [`Recorder::close`].
    pub fn open(&self) -> u64 {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.line(conn, Some("open"), None);
        conn
    }

    /// Bytes a device sent on `conn`.
    pub fn data(&self, conn: u64, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.line(conn, None, Some(bytes));
        }
    }

    /// `conn` ended.
    pub fn close(&self, conn: u64) {
        self.line(conn, Some("close"), None);
    }

    /// Flushes to disk; reports the first write error of the whole recording.
    pub fn finish(&self) -> anyhow::Result<()> {
        if let Some(e) = self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e).context("writing the recording");
        }
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        out.flush().context("writing the recording")?;
        out.get_ref().sync_all().context("syncing the recording")
    }
}

/// A writer that records what passes through it (a device's side of a connection).
pub struct Tap<W> {
    inner: W,
    recording: Option<(Arc<Recorder>, u64)>,
}

impl<W> Tap<W> {
    /// Records what is written to `inner` as connection `conn` when `recorder` is set.
    pub fn new(inner: W, recorder: Option<&Arc<Recorder>>) -> Self {
        Self {
            inner,
            recording: recorder.map(|r| (r.clone(), r.open())),
        }
    }
}

impl<W> Drop for Tap<W> {
    fn drop(&mut self) {
        if let Some((r, conn)) = &self.recording {
            r.close(*conn);
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Tap<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some((r, conn))) = (&poll, &self.recording) {
            r.data(*conn, &buf[..*n]);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One connection of a recording: when it opened and closed, and what was sent when.
#[derive(Debug, Default)]
struct Conn {
    open_us: u64,
    chunks: Vec<(u64, Vec<u8>)>,
    close_us: Option<u64>,
}

impl Conn {
    /// The `device_id` of the Hello this connection starts with, if it does.
    fn device_id(&self) -> Option<String> {
        let mut head = Vec::new();
        for (_, data) in &self.chunks {
            head.extend_from_slice(data);
            if let Ok(msg) = DeviceMessage::decode_length_delimited(&head[..]) {
                return match msg.body {
                    Some(device_message::Body::Hello(h)) => Some(h.device_id),
                    _ => None,
                };
            }
            if head.len() > 64 * 1024 {
                return None;
            }
        }
        None
    }
}

/// A recording read back.
#[derive(Debug)]
pub struct Recording {
    conns: BTreeMap<u64, Conn>,
}

impl Recording {
    /// Reads a recording; errors name the line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening the recording {}", path.display()))?;
        let mut lines = std::io::BufReader::new(file).lines();
        let header: Header = match lines.next() {
            Some(line) => serde_json::from_str(&line?)
                .with_context(|| format!("{}: line 1 is not a recording header", path.display()))?,
            None => anyhow::bail!("{}: empty recording", path.display()),
        };
        anyhow::ensure!(
            header.format == FORMAT && header.version == 1,
            "{}: not a firmware-sim recording (format {:?} version {})",
            path.display(),
            header.format,
            header.version
        );
        let mut conns: BTreeMap<u64, Conn> = BTreeMap::new();
        for (n, line) in lines.enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{}: line {}", path.display(), n + 2);
            let l: Line = serde_json::from_str(&line).with_context(at)?;
            let conn = conns.entry(l.conn).or_default();
            match (l.event.as_deref(), l.data) {
                (Some("open"), None) => conn.open_us = l.t_us,
                (Some("close"), None) => conn.close_us = Some(l.t_us),
                (None, Some(data)) => conn.chunks.push((
                    l.t_us,
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .with_context(at)?,
                )),
                _ => anyhow::bail!("{}: expected an open, close or data event", at()),
            }
        }
        Ok(Self { conns })
    }

    /// Connections in the recording.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Bytes in the recording.
    pub fn bytes(&self) -> u64 {
        self.conns
            .values()
            .flat_map(|c| c.chunks.iter())
            .map(|(_, d)| d.len() as u64)
            .sum()
    }
}

/// What a replay saw from the gateway.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    /// Connections replayed.
    pub connections: u64,
    /// Connections that could not be opened.
    pub connect_failures: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// HelloAcks received.
    pub hello_acks: u64,
    /// Acks received.
    pub acks: u64,
    /// Error frames received, by code name.
    pub errors: BTreeMap<String, u64>,
    /// Wall time, in seconds.
    pub elapsed_s: f64,
}

/// Plays `recording` to the gateway at `gateway`, `speed` times the original pace (0 or
/// infinity: as fast as possible). After a connection's recorded close, it waits up to 10 s
/// for the gateway's last answers. As fast as possible, one device's connections (known by
/// the `device_id` of their Hello) run one after another in recorded order: started together,
/// a later connection's resends could be stored first and an earlier one's frames then
/// count as already stored.
pub async fn replay(recording: Recording, gateway: &str, speed: f64) -> ReplayReport {
    replay_with(recording, gateway, speed, None).await
}

/// [`replay`], over TLS to the gateway when `tls` is set.
pub async fn replay_with(
    recording: Recording,
    gateway: &str,
    speed: f64,
    tls: Option<crate::tls::TlsClient>,
) -> ReplayReport {
    let start = Instant::now();
    let paced = speed > 0.0 && speed.is_finite();
    let at = move |t_us: u64| {
        if paced {
            start + Duration::from_micros(t_us).div_f64(speed)
        } else {
            start
        }
    };
    let mut groups: BTreeMap<String, Vec<Conn>> = BTreeMap::new();
    for (id, conn) in recording.conns {
        let key = match (paced, conn.device_id()) {
            (false, Some(device)) => format!("device {device}"),
            _ => format!("connection {id}"),
        };
        groups.entry(key).or_default().push(conn);
    }
    let totals = Arc::new(Mutex::new(ReplayReport::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for (_, mut conns) in groups {
        conns.sort_by_key(|c| c.open_us);
        let gateway = gateway.to_owned();
        let totals = totals.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            for conn in conns {
                replay_connection(conn, &gateway, tls.as_ref(), at, &totals).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let mut report = std::mem::take(&mut *totals.lock().unwrap_or_else(|e| e.into_inner()));
    report.elapsed_s = start.elapsed().as_secs_f64();
    report
}

async fn replay_connection(
    conn: Conn,
    gateway: &str,
    tls: Option<&crate::tls::TlsClient>,
    at: impl Fn(u64) -> Instant,
    totals: &Mutex<ReplayReport>,
) {
    tokio::time::sleep_until(at(conn.open_us)).await;
    let failed = || {
        totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connect_failures += 1;
    };
    let Ok(stream) = TcpStream::connect(gateway).await else {
        return failed();
    };
    let Ok(stream) = crate::tls::over(tls, stream).await else {
        return failed();
    };
    let (read, mut write) = tokio::io::split(stream);
    let answers = tokio::spawn(count_answers(read));
    let mut sent = 0u64;
    for (t, data) in &conn.chunks {
        tokio::time::sleep_until(at(*t)).await;
        if write.write_all(data).await.is_err() {
            break;
        }
        sent += data.len() as u64;
    }
    if let Some(close) = conn.close_us {
        tokio::time::sleep_until(at(close)).await;
    }
    let _ = write.shutdown().await;
    let seen = tokio::time::timeout(LINGER, answers).await;
    let mut totals = totals.lock().unwrap_or_else(|e| e.into_inner());
    totals.connections += 1;
    totals.bytes_sent += sent;
    if let Ok(Ok(seen)) = seen {
        totals.hello_acks += seen.hello_acks;
        totals.acks += seen.acks;
        for (k, v) in seen.errors {
            *totals.errors.entry(k).or_default() += v;
        }
    }
}

async fn count_answers(read: impl AsyncRead + Unpin) -> ReplayReport {
    let mut seen = ReplayReport::default();
    let mut frames = FramedRead::new(read, DelimitedCodec::<GatewayMessage>::default());
    while let Some(Ok(msg)) = frames.next().await {
        match msg.body {
            Some(gateway_message::Body::HelloAck(_)) => seen.hello_acks += 1,
            Some(gateway_message::Body::Ack(_)) => seen.acks += 1,
            Some(gateway_message::Body::Error(e)) => {
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                *seen
                    .errors
                    .entry(code.as_str_name().to_owned())
                    .or_default() += 1;
            }
            _ => {}
        }
    }
    seen
}

/// TLS on either side of the proxy.
#[derive(Clone, Default)]
pub struct ProxyTls {
    /// Devices connect with TLS, terminated here with this certificate, so what they send
    /// is recorded in the clear.
    pub devices: Option<tokio_rustls::TlsAcceptor>,
    /// The proxy connects to the gateway with TLS.
    pub upstream: Option<crate::tls::TlsClient>,
}

/// Relays device connections accepted on `listener` to `upstream`, recording what each
/// device sends, until `stop` resolves. Returns how many connections it relayed.
pub async fn proxy(
    listener: TcpListener,
    upstream: &str,
    tls: ProxyTls,
    recorder: Arc<Recorder>,
    stop: impl std::future::Future<Output = ()>,
) -> u64 {
    let mut links = tokio::task::JoinSet::new();
    let relayed = Arc::new(AtomicU64::new(0));
    // Each kind of failure is logged once, not once per device.
    let warned: Arc<Mutex<HashMap<&'static str, u64>>> = Arc::default();
    tokio::pin!(stop);
    loop {
        let (device, peer) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (recorder, relayed, warned) = (recorder.clone(), relayed.clone(), warned.clone());
        let (upstream, tls) = (upstream.to_owned(), tls.clone());
        // Handshakes and the upstream connect run in the link's task, never in this loop.
        links.spawn(async move {
            let warn_once = |kind: &'static str, error: &dyn std::fmt::Display| {
                let mut warned = warned.lock().unwrap_or_else(|e| e.into_inner());
                let n = warned.entry(kind).or_default();
                *n += 1;
                if *n == 1 {
                    tracing::warn!(%peer, %error, "proxy: {kind} (logged once)");
                }
            };
            let _ = device.set_nodelay(true);
            let device: Box<dyn Io> = match &tls.devices {
                None => Box::new(device),
                Some(acceptor) => {
                    let handshake = acceptor.accept(device);
                    match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => return warn_once("a device's TLS handshake failed", &e),
                        Err(_) => return warn_once("a device's TLS handshake timed out", &"10 s"),
                    }
                }
            };
            let gateway = match TcpStream::connect(&upstream).await {
                Ok(s) => s,
                Err(e) => {
                    return warn_once(
                        "cannot reach the gateway; dropping devices until it is back",
                        &e,
                    )
                }
            };
            let gateway = match crate::tls::over(tls.upstream.as_ref(), gateway).await {
                Ok(s) => s,
                Err(e) => return warn_once("TLS to the gateway failed", &e),
            };
            relayed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "proxy: device connected");
            let (mut device_read, mut device_write) = tokio::io::split(device);
            let (mut gateway_read, gateway_write) = tokio::io::split(gateway);
            let mut up = Tap::new(gateway_write, Some(&recorder));
            let upward = tokio::io::copy(&mut device_read, &mut up);
            let downward = tokio::io::copy(&mut gateway_read, &mut device_write);
            // Either side closing ends the link, as it would without the proxy.
            tokio::select! {
                _ = upward => {}
                _ = downward => {}
            }
            let _ = up.shutdown().await;
        });
    }
    links.abort_all();
    while links.join_next().await.is_some() {}
    relayed.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_recording_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let r = Recorder::create(&path).unwrap();
        let a = r.open();
        r.data(a, b"hello");
        let b = r.open();
        r.data(b, &[0, 1, 2]);
        r.close(a);
        r.finish().unwrap();
        let rec = Recording::load(&path).unwrap();
        assert_eq!(rec.connections(), 2);
        assert_eq!(rec.bytes(), 8);
        assert_eq!(rec.conns[&a].chunks[0].1, b"hello");
        assert!(rec.conns[&a].close_us.is_some() && rec.conns[&b].close_us.is_none());
    }

    #[test]
    fn a_broken_recording_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        std::fs::write(
            &path,
            "{\"format\":\"firmware-sim-record\",\"version\":1}\n{\"t_us\":1,\"conn\":0,\"data\":\"!!\"}\n",
        )
        .unwrap();
        let err = format!("{:#}", Recording::load(&path).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
        std::fs::write(&path, "{\"format\":\"pcap\",\"version\":1}\n").unwrap();
        let err = format!("{:#}", Recording::load(&path).unwrap_err());
        assert!(err.contains("not a firmware-sim recording"), "{err}");
    }
}
