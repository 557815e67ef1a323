//! Test helpers: a gateway in-process or as a real child process, raw protocol clients, and
//! the store check every fleet test ends with.
#![allow(dead_code)] // each test binary uses its own subset

pub mod mqtt;
pub mod pki;
pub mod pty;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use firmware_sim::Report;
use futures::{SinkExt, StreamExt};
use gateway::config::Config;
use gateway::metrics::Metrics;
use prost::Message;
use proto::v1::{
    device_message::Body, gateway_message, DeviceMessage, ErrorCode, GatewayMessage, Hello,
};
use proto::DelimitedCodec;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-fleet-secret";
/// The API token of test gateways.
pub const API_TOKEN: &str = "test-api-token-0123456789";

/// A gateway running inside the test process.
pub struct TestGateway {
    pub addr: SocketAddr,
    /// The operator API.
    pub http: SocketAddr,
    pub db: PathBuf,
    pub dir: tempfile::TempDir,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
    pub metrics: Arc<Metrics>,
}

impl TestGateway {
    /// Starts a gateway on 127.0.0.1:0 with a fresh store and fleet secret [`SECRET`].
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::default();
        config.data_dir.0 = dir.path().to_path_buf();
        config.mqtt.enabled = false; // tests that bridge say so
        config.mqtt.gateway_id = "test-gw".into();
        tweak(&mut config);
        config.validate().expect("valid test config");
        let db = config.db_path();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let http = http_listener.local_addr().expect("http addr");
        let shutdown = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let task = tokio::spawn(gateway::app::serve(
            gateway::app::Inputs {
                config,
                listener,
                fleet_secret: Some(SECRET.as_bytes().to_vec()),
                metrics: metrics.clone(),
                http: Some((http_listener, API_TOKEN.to_owned())),
                reloads: None,
                log: None,
            },
            shutdown.clone(),
        ));
        Self {
            addr,
            http,
            db,
            dir,
            shutdown,
            task,
            metrics,
        }
    }

    /// Graceful stop; panics if the gateway returned an error.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task
            .await
            .expect("gateway task")
            .expect("gateway ran cleanly");
    }
}

/// A fleet config pointed at `addr` with the test fleet secret.
pub fn fleet(addr: SocketAddr) -> firmware_sim::FleetConfig {
    firmware_sim::FleetConfig {
        gateway: addr.to_string(),
        fleet_secret: Some(SECRET.into()),
        ..Default::default()
    }
}

/// Opens the store file read-write (WAL readers need the -shm) for checks.
pub async fn open_db(db: &Path) -> sqlx::SqliteConnection {
    SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .expect("open store for checks")
}

/// Every frame the fleet saw acknowledged is in the store exactly once, with all its
/// readings, and the store holds nothing else for these devices.
pub async fn assert_stored_exactly_once(db: &Path, report: &Report, readings_per_frame: u64) {
    let mut conn = open_db(db).await;
    for o in &report.outcomes {
        let (frames, rows, max_seq): (i64, i64, Option<i64>) = sqlx::query_as(
            "SELECT COUNT(DISTINCT seq), COUNT(*), MAX(seq) FROM telemetry WHERE device_id = ? AND epoch = ?",
        )
        .bind(&o.device_id)
        .bind(o.epoch as i64)
        .fetch_one(&mut conn)
        .await
        .expect("query telemetry");
        assert_eq!(
            frames as u64, o.frames_acked,
            "{}: distinct frames stored vs acked",
            o.device_id
        );
        assert_eq!(
            rows as u64, o.readings_acked,
            "{}: readings stored vs acked",
            o.device_id
        );
        assert_eq!(
            max_seq.unwrap_or(0) as u64,
            o.last_acked_seq,
            "{}: highest seq",
            o.device_id
        );
    }
    // Each frame holds exactly the readings it carried (batched frames carry more than
    // `readings_per_frame`; the device's outcome knows how many).
    let mut bad = Vec::new();
    for o in &report.outcomes {
        let counts: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT seq, COUNT(*) FROM telemetry WHERE device_id = ? AND epoch = ? GROUP BY seq",
        )
        .bind(&o.device_id)
        .bind(o.epoch as i64)
        .fetch_all(&mut conn)
        .await
        .expect("query rows per frame");
        for (seq, rows) in counts {
            let expected = o.readings_of(seq as u64);
            if rows as u64 != expected && bad.len() < 10 {
                bad.push((o.device_id.clone(), seq, rows, expected));
            }
        }
        assert_eq!(
            o.readings_per_frame, readings_per_frame,
            "{}: readings per sample",
            o.device_id
        );
    }
    assert!(
        bad.is_empty(),
        "frames with a wrong number of rows (device, seq, rows, expected): {bad:?}"
    );
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM telemetry")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(
        total as u64, report.readings_acked,
        "total rows vs readings acked"
    );
    conn.close().await.ok();
}

/// A raw protocol client for sending whatever a test wants.
pub struct RawClient {
    pub framed: Framed<TcpStream, DelimitedCodec<GatewayMessage>>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self {
            framed: Framed::new(stream, DelimitedCodec::default()),
        }
    }

    pub async fn send(&mut self, msg: DeviceMessage) {
        self.framed.send(msg).await.expect("send");
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let stream = self.framed.get_mut();
        stream.write_all(bytes).await.expect("write raw");
    }

    /// The next message, or `None` at end of stream. Panics after 10 s of silence.
    pub async fn recv(&mut self) -> Option<GatewayMessage> {
        match tokio::time::timeout(Duration::from_secs(10), self.framed.next()).await {
            Ok(Some(Ok(m))) => Some(m),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("no message from the gateway within 10 s"),
        }
    }

    /// Hello with the fleet token; returns HelloAck's last_seq.
    pub async fn hello(&mut self, device_id: &str, epoch: u64) -> u64 {
        self.send(hello(
            device_id,
            &proto::token::fleet_token(SECRET.as_bytes(), device_id),
            epoch,
        ))
        .await;
        match self.recv().await {
            Some(GatewayMessage {
                body: Some(gateway_message::Body::HelloAck(a)),
            }) => a.last_seq,
            other => panic!("expected HelloAck, got {other:?}"),
        }
    }

    /// Reads until an Error frame and the end of the stream; returns the error's code.
    pub async fn expect_error_and_close(&mut self) -> ErrorCode {
        let mut code = None;
        while let Some(msg) = self.recv().await {
            if let Some(gateway_message::Body::Error(e)) = msg.body {
                code = Some(ErrorCode::try_from(e.code).expect("known code"));
            }
        }
        code.expect("an Error frame before the link closed")
    }
}

pub fn hello(device_id: &str, token: &str, epoch: u64) -> DeviceMessage {
    DeviceMessage {
        seq: 0,
        body: Some(Body::Hello(Hello {
            device_id: device_id.into(),
            token: token.into(),
            firmware_version: "test".into(),
            epoch,
        })),
    }
}

pub fn telemetry(seq: u64, readings: &[(&str, f64)]) -> DeviceMessage {
    DeviceMessage {
        seq,
        body: Some(Body::Telemetry(proto::v1::Telemetry {
            readings: readings
                .iter()
                .map(|(s, v)| proto::v1::Reading {
                    sensor: (*s).into(),
                    value: *v,
                    timestamp_ms: 0,
                })
                .collect(),
        })),
    }
}

/// A message encoded with its length prefix, as raw bytes.
pub fn delimited(msg: &impl Message) -> Vec<u8> {
    let mut buf = BytesMut::new();
    msg.encode_length_delimited(&mut buf).expect("encode");
    buf.to_vec()
}

/// The `gateway` binary as a child process.
pub struct GatewayProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    /// The operator API (its token is `<db dir>/api.token`).
    pub http: SocketAddr,
}

impl GatewayProcess {
    /// Starts `gateway run` on `listen` with its store at `db` and `extra` arguments
    /// (`--no-mqtt` when empty); waits until it listens.
    pub async fn start(db: &Path, listen: &str, log: &Path, extra: &[&str]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log file");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["run", "--listen", listen, "--fleet-secret", SECRET, "--db"])
            .arg(db)
            .args(if extra.is_empty() {
                &["--no-mqtt"][..]
            } else {
                extra
            })
            .args(if extra.contains(&"--gateway-id") {
                &[][..]
            } else {
                &["--gateway-id", "test-gw"][..]
            })
            .args(if extra.contains(&"--http") {
                &[][..]
            } else {
                &["--http", "127.0.0.1:0"][..]
            })
            .args(["--api-token", API_TOKEN])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn gateway");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let (addr, http) = tokio::time::timeout(Duration::from_secs(30), async {
            let (mut addr, mut http) = (None, None);
            while let Some(line) = lines.next_line().await.expect("read stdout") {
                if let Some(a) = line
                    .strip_prefix("http: listening on http://")
                    .or_else(|| line.strip_prefix("http: listening on https://"))
                {
                    http = Some(a.parse::<SocketAddr>().expect("http address"));
                }
                if let Some(a) = line.strip_prefix("devices: listening on tcp://") {
                    addr = Some(a.parse::<SocketAddr>().expect("address"));
                }
                if let (Some(addr), Some(http)) = (addr, http) {
                    return (addr, http);
                }
            }
            panic!("gateway exited before listening");
        })
        .await
        .expect("gateway listens within 30 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr, http }
    }

    /// SIGKILL: no chance to commit or say goodbye.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// SIGTERM, then the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("send SIGTERM");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("gateway exits within 30 s of SIGTERM")
            .expect("wait")
    }
}

/// `gateway run` on 127.0.0.1:0 without MQTT and HTTP, with `--auth none` and `args`, its
/// stderr in `log`; `env` adds to or (with `None`) removes from its environment. Returns the
/// child and the device address it printed (TCP or TLS).
pub async fn spawn_gateway(
    args: &[&std::ffi::OsStr],
    env: &[(&str, Option<&std::ffi::OsStr>)],
    log: &Path,
) -> (tokio::process::Child, SocketAddr) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(["run", "--listen", "127.0.0.1:0", "--no-mqtt", "--no-http"])
        .args(["--auth", "none"])
        .args(args);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn gateway");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    while let Some(line) = lines.next_line().await.expect("read stdout") {
        let addr = line
            .strip_prefix("devices: listening on tcp://")
            .or_else(|| line.strip_prefix("devices: listening on tls://"));
        if let Some(a) = addr {
            return (child, a.parse().expect("address"));
        }
    }
    panic!("the gateway exited before listening; see {}", log.display());
}

/// GET an operator API path with the test token: the status and the JSON body.
pub async fn api_get(http: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("http client")
        .get(format!("http://{http}{path}"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("GET");
    let status = r.status().as_u16();
    (status, r.json().await.expect("JSON body"))
}

/// A free TCP port on 127.0.0.1 (bound and released, so a restarted gateway can reuse it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Scrapes `/metrics` and parses it with a Prometheus text parser: each sample's value by
/// metric name and sorted `label=value` pairs (`name{a="x"}` as `name{a=x}`).
pub async fn scrape(http: SocketAddr) -> std::collections::BTreeMap<String, f64> {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("a Prometheus text exposition");
    scrape
        .samples
        .into_iter()
        .filter_map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => return None,
            };
            let mut labels: Vec<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let key = if labels.is_empty() {
                s.metric
            } else {
                format!("{}{{{}}}", s.metric, labels.join(","))
            };
            Some((key, value))
        })
        .collect()
}
