//! The gateway's configuration: a serde tree read from TOML, every field documented with
//! its unit and default, validated once at start with errors that name the field.
//!
//! This module only parses and checks; reading the file and applying command-line
//! overrides happen in `main.rs`. `gateway.example.toml` at the repository root is the
//! commented reference, and a test parses it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused. The message names the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML did not parse or did not match the schema.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A field has a value outside its allowed range.
    #[error("invalid value for `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `store.batch_max_frames`.
        field: &'static str,
        /// What is wrong and what is allowed.
        reason: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the gateway keeps its files (the SQLite store and the generated fleet secret)
    /// unless a path below says otherwise. Default `gateway-data`, relative to the working
    /// directory.
    pub data_dir: DataDir,
    /// Device links over TCP.
    pub tcp: TcpConfig,
    /// How devices prove who they are.
    pub auth: AuthConfig,
    /// The SQLite store and its batching writer.
    pub store: StoreConfig,
    /// Keepalive and timeouts of device sessions.
    pub session: SessionConfig,
    /// Graceful shutdown on SIGINT/SIGTERM.
    pub shutdown: ShutdownConfig,
    /// The MQTT bridge: uplink of stored data, device status, commands down.
    pub mqtt: MqttConfig,
    /// Serial ports, one device session each (`[[serial]]`, any number).
    pub serial: Vec<SerialPortConfig>,
    /// The operator API, metrics and live feed.
    pub http: crate::api::config::HttpConfig,
    /// Streaming anomaly detection.
    pub anomaly: crate::anomaly::config::AnomalyConfig,
    /// How devices are slowed when the gateway falls behind.
    pub pacing: crate::pacing::PacingConfig,
    /// What one source, device or the whole fleet may take of the gateway.
    pub limits: crate::limits::LimitsConfig,
    /// Logging.
    pub log: LogConfig,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// What is logged: a level (`error`, `warn`, `info`, `debug`, `trace`) or `tracing`
    /// directives such as `"info,gateway::pacing=debug"`. `RUST_LOG`, when set, decides
    /// instead. Default `"info"`. Changed by a reload (SIGHUP).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// Parity of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    /// No parity bit (default).
    None,
    /// Odd parity.
    Odd,
    /// Even parity.
    Even,
}

/// Flow control of a serial line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    /// None (default).
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

/// `[[serial]]`: one serial port carrying one device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPortConfig {
    /// The device node, e.g. `/dev/ttyUSB0`.
    pub path: PathBuf,
    /// Bits per second. Default 115200.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5, 6, 7 or 8. Default 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none` (default), `odd` or `even`.
    #[serde(default = "default_parity")]
    pub parity: Parity,
    /// 1 or 2. Default 1.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// `none` (default), `software` or `hardware`.
    #[serde(default = "default_flow_control")]
    pub flow_control: FlowControl,
    /// Bad frames in a row (bad COBS or CRC, oversize, undecodable) after which the link is
    /// closed and the port reopened. Default 20; each bad frame alone is only dropped.
    #[serde(default = "default_max_bad_frames")]
    pub max_bad_frames: u32,
    /// Longest wait between attempts to open a missing or unplugged port. Default 30s.
    #[serde(default = "default_reopen_max", with = "humantime_serde")]
    pub reopen_max: Duration,
}

fn default_baud() -> u32 {
    115_200
}
fn default_data_bits() -> u8 {
    8
}
fn default_parity() -> Parity {
    Parity::None
}
fn default_stop_bits() -> u8 {
    1
}
fn default_flow_control() -> FlowControl {
    FlowControl::None
}
fn default_max_bad_frames() -> u32 {
    20
}
fn default_reopen_max() -> Duration {
    Duration::from_secs(30)
}

impl SerialPortConfig {
    /// A port at `path` with the defaults.
    pub fn new(path: PathBuf, baud: u32) -> Self {
        Self {
            path,
            baud,
            data_bits: default_data_bits(),
            parity: default_parity(),
            stop_bits: default_stop_bits(),
            flow_control: default_flow_control(),
            max_bad_frames: default_max_bad_frames(),
            reopen_max: default_reopen_max(),
        }
    }

    /// Parses `PATH[@BAUD]` from the command line.
    pub fn from_arg(arg: &str) -> Result<Self, String> {
        let (path, baud) = match arg.rsplit_once('@') {
            Some((path, baud)) => (
                path,
                baud.parse()
                    .map_err(|_| format!("--serial {arg:?}: BAUD must be a number"))?,
            ),
            None => (arg, default_baud()),
        };
        if path.is_empty() {
            return Err(format!("--serial {arg:?}: expected PATH[@BAUD]"));
        }
        Ok(Self::new(PathBuf::from(path), baud))
    }
}

/// A directory path with a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct DataDir(pub PathBuf);

impl Default for DataDir {
    fn default() -> Self {
        Self(PathBuf::from("gateway-data"))
    }
}

/// `[tcp]`: the device TCP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// Address the device listener binds. Default `127.0.0.1:7700` (this box only); use
    /// `0.0.0.0:7700` to accept devices from the site network.
    pub listen: SocketAddr,
    /// Largest frame a device may send, in bytes (the length prefix excluded). Default
    /// 65536. A larger frame gets `ERROR_CODE_FRAME_TOO_LARGE` and the link closes.
    pub max_frame_bytes: usize,
    /// `[tcp.tls]`: devices connect with TLS instead of plain TCP. Unset: plain TCP.
    pub tls: Option<TcpTlsConfig>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            max_frame_bytes: proto::DEFAULT_MAX_FRAME_LEN,
            tls: None,
        }
    }
}

/// `[tcp.tls]`: the device listener's certificate. Devices still authenticate with their
/// token in Hello; TLS keeps tokens and readings private on the site network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpTlsConfig {
    /// PEM file with the gateway's certificate, then any intermediates.
    pub cert_file: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// How a Hello's token is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// A device must present its provisioned token or its fleet token.
    Token,
    /// Any device is accepted with any token. For benches and closed labs only; the gateway
    /// logs a warning at start.
    None,
}

/// `[auth]`: device authentication.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `token` (default) or `none`.
    pub mode: AuthMode,
    /// Fleet secret: a device's token may be the lowercase hex HMAC-SHA256(secret,
    /// device_id). Overrides `fleet_secret_file`.
    pub fleet_secret: Option<String>,
    /// File holding the fleet secret (surrounding whitespace ignored). Default
    /// `<data_dir>/fleet.secret`, created with a random secret on first start if missing.
    pub fleet_secret_file: Option<PathBuf>,
    /// Whether fleet tokens are accepted at all. Default true; false leaves only tokens from
    /// `gateway devices add`.
    pub fleet_tokens: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Token,
            fleet_secret: None,
            fleet_secret_file: None,
            fleet_tokens: true,
        }
    }
}

/// How hard a commit tries to survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Acknowledged data survives a crash of the gateway process (WAL, `synchronous=NORMAL`).
    ProcessCrash,
    /// Acknowledged data also survives power loss (WAL, `synchronous=FULL`: an fsync per
    /// commit).
    PowerLoss,
}

/// `[store]`: the SQLite file and its writer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite file. Default `<data_dir>/gateway.db`.
    pub path: Option<PathBuf>,
    /// `process-crash` (default) or `power-loss`; see [`Durability`].
    pub durability: Durability,
    /// Most frames one transaction commits. Default 2048. Frames that arrive while a commit
    /// runs wait for the next one, so batches grow with load without a linger timer.
    pub batch_max_frames: usize,
    /// Frames waiting for the writer, across all devices. Default 8192. When full, sessions
    /// wait to enqueue and so stop reading their sockets: devices are slowed, never dropped.
    pub queue_frames: usize,
    /// Most readings one transaction commits. Default 32768. A batch with more is cut after
    /// the frame that reaches it, so one commit of big frames cannot hold every ack behind it.
    pub batch_max_readings: usize,
    /// Readings waiting for the writer, across all devices. Default 65536 (about a sixth of
    /// a second of the writer's work on the reference machine). Big frames (a paced device
    /// batches its samples) fill it before `queue_frames` does; full, it waits the same way.
    pub queue_readings: usize,
    /// Keep readings and events this long, by their timestamp (e.g. "30d"), and finished
    /// commands and ended anomalies this long after their outcome or decision; older ones
    /// are deleted by the writer in small steps between batches. At least 1 minute.
    /// Default: unset, keep everything.
    #[serde(with = "humantime_serde")]
    pub retention: Option<Duration>,
    /// Run `PRAGMA quick_check` on the store at start, before anything writes to it, and
    /// refuse a damaged file. It reads the whole file: on this project's test machine 1.5 s
    /// for 10 million readings (365 MB) with the file in the page cache, 10 s from disk.
    /// Default true.
    pub check_at_start: bool,
    /// The most bytes the database file may take (SQLite's `max_page_count` on the writer's
    /// connection; the WAL adds up to 256 MiB). At the limit the store is full, as on a full
    /// disk: nothing more is acknowledged until space returns (retention deletes old rows,
    /// or the limit is raised). Default: unset, the disk is the limit.
    pub max_bytes: Option<u64>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: None,
            durability: Durability::ProcessCrash,
            batch_max_frames: 2048,
            queue_frames: 8192,
            queue_readings: 65_536,
            batch_max_readings: 32_768,
            retention: None,
            check_at_start: true,
            max_bytes: None,
        }
    }
}

/// `[session]`: device session timers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// How long a new link may take to send its Hello. Default 10s.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// A link that sends nothing (not even Ping) for this long is closed with
    /// `ERROR_CODE_IDLE_TIMEOUT`. Default 90s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long one write to a device may block (a device that stops reading) before the
    /// link is closed. Default 30s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Deprecated: `pacing.max_interval` ("0s" here sets `pacing.enabled = false`). Unset by
    /// default.
    #[serde(with = "humantime_serde")]
    pub slow_report_interval: Option<Duration>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            write_timeout: Duration::from_secs(30),
            slow_report_interval: None,
        }
    }
}

/// `[shutdown]`: what happens on SIGINT/SIGTERM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Upper bound on a graceful shutdown: stop accepting, commit and acknowledge what is in
    /// flight, close links. Default 10s. A second signal exits at once.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
        }
    }
}

/// How stored frames are encoded when published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// JSON objects (see the README).
    Json,
    /// `gateway.v1.Uplink` protobuf messages.
    Protobuf,
}

/// What happens when the unpublished backlog reaches its disk budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BacklogPolicy {
    /// Stop taking new frames until the broker catches up: devices are slowed (their acks
    /// wait), nothing is dropped.
    Slow,
    /// Drop the oldest unpublished frames from the uplink (they stay in the store), counted
    /// in `uplink_dropped_frames` and logged.
    DropOldest,
}

/// `[mqtt.topics]`: topic templates. `{gateway_id}` and `{device_id}` are replaced; each
/// must fill a whole topic level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// Telemetry frames. Default `gateway/{gateway_id}/devices/{device_id}/telemetry`.
    pub telemetry: String,
    /// Events. Default `gateway/{gateway_id}/devices/{device_id}/events`.
    pub events: String,
    /// Retained device status. Default `gateway/{gateway_id}/devices/{device_id}/status`.
    pub status: String,
    /// Commands in. Default `gateway/{gateway_id}/devices/{device_id}/commands`.
    pub commands: String,
    /// Command outcomes out. Default
    /// `gateway/{gateway_id}/devices/{device_id}/commands/results`.
    pub command_results: String,
    /// Retained gateway status, `online`/`offline` (the Last Will). Default
    /// `gateway/{gateway_id}/status`.
    pub gateway_status: String,
    /// Anomalies the detector raised about a device. Default
    /// `gateway/{gateway_id}/devices/{device_id}/anomalies`.
    pub anomalies: String,
    /// Anomalies about no device (a source address guessing tokens). Default
    /// `gateway/{gateway_id}/anomalies`.
    pub gateway_anomalies: String,
    /// Which gateway a device is on, shared by every gateway on the broker (no
    /// `{gateway_id}`): retained `{"gateway_id":..}`, published when a device connects. Used
    /// only when `commands` has no `{gateway_id}`: a gateway that sees another claim one of
    /// its devices stops taking that device's commands. Default `devices/{device_id}/owner`.
    pub owner: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        let device = |leaf: &str| format!("gateway/{{gateway_id}}/devices/{{device_id}}/{leaf}");
        Self {
            telemetry: device("telemetry"),
            events: device("events"),
            status: device("status"),
            commands: device("commands"),
            command_results: device("commands/results"),
            gateway_status: "gateway/{gateway_id}/status".into(),
            anomalies: device("anomalies"),
            gateway_anomalies: "gateway/{gateway_id}/anomalies".into(),
            owner: "devices/{device_id}/owner".into(),
        }
    }
}

/// `[mqtt.backlog]`: the store-and-forward budget.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BacklogConfig {
    /// Most bytes of unpublished frames kept for the broker. Default 268435456 (256 MiB).
    pub max_bytes: u64,
    /// `slow` (default) or `drop-oldest`; see [`BacklogPolicy`].
    pub when_full: BacklogPolicy,
}

impl Default for BacklogConfig {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024 * 1024,
            when_full: BacklogPolicy::Slow,
        }
    }
}

/// `[mqtt.embedded]`: the broker started inside the gateway when no `mqtt.url` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBrokerConfig {
    /// Start it (only when `mqtt.url` is unset). Default true.
    pub enabled: bool,
    /// Its MQTT listener. Default `127.0.0.1:1883`.
    pub listen: SocketAddr,
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
        }
    }
}

/// `[mqtt]`: the bridge to an MQTT broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Bridge to MQTT at all. Default true. When false, nothing is kept for publishing.
    pub enabled: bool,
    /// Broker URL, `mqtt://host:port` or `mqtts://host:port` (TLS). Unset: the embedded
    /// broker.
    pub url: Option<String>,
    /// This gateway's name in topics and the default client id. Default: the host name.
    pub gateway_id: String,
    /// MQTT client id. Default `gateway-<gateway_id>`.
    pub client_id: Option<String>,
    /// Broker user name.
    pub username: Option<String>,
    /// Broker password (needs `username`).
    pub password: Option<String>,
    /// PEM file of CA certificates to trust for `mqtts://`. Default: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for `mqtts://` (needs `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// MQTT keepalive. Default 30s.
    #[serde(with = "humantime_serde")]
    pub keepalive: Duration,
    /// First reconnect delay; doubles per failure (with jitter) up to `reconnect_max`.
    /// Default 500ms.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay. Default 30s.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Most QoS 1 publishes awaiting PUBACK. Default 100.
    pub inflight: u16,
    /// `json` (default) or `protobuf` for telemetry and events; command results are JSON.
    pub payload: PayloadFormat,
    /// Used for commands that give no `timeout_ms`. Default 60s.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Topic templates.
    pub topics: TopicsConfig,
    /// Store-and-forward budget.
    pub backlog: BacklogConfig,
    /// The embedded broker.
    pub embedded: EmbeddedBrokerConfig,
}

/// The host name, made safe for a topic level; `gateway` if unknown.
fn default_gateway_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() {
        "gateway".into()
    } else {
        id
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            url: None,
            gateway_id: default_gateway_id(),
            client_id: None,
            username: None,
            password: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keepalive: Duration::from_secs(30),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            inflight: 100,
            payload: PayloadFormat::Json,
            command_timeout: Duration::from_secs(60),
            topics: TopicsConfig::default(),
            backlog: BacklogConfig::default(),
            embedded: EmbeddedBrokerConfig::default(),
        }
    }
}

impl MqttConfig {
    /// The client id: `client_id`, or `gateway-<gateway_id>`.
    pub fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("gateway-{}", self.gateway_id))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, reason: String| ConfigError::Invalid { field, reason };
        if self.gateway_id.is_empty() || self.gateway_id.contains(['/', '+', '#']) {
            return Err(invalid(
                "mqtt.gateway_id",
                "must be non-empty and free of '/', '+' and '#'".into(),
            ));
        }
        if let Some(url) = &self.url {
            if !(url.starts_with("mqtt://") || url.starts_with("mqtts://")) {
                return Err(invalid(
                    "mqtt.url",
                    format!("{url:?} must start with mqtt:// or mqtts://"),
                ));
            }
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(invalid("mqtt.password", "needs mqtt.username".into()));
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(invalid(
                "mqtt.client_cert",
                "client_cert and client_key go together".into(),
            ));
        }
        if self.inflight == 0 {
            return Err(invalid("mqtt.inflight", "must be at least 1".into()));
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return Err(invalid(
                "mqtt.reconnect_min",
                "must be above zero and at most mqtt.reconnect_max".into(),
            ));
        }
        let t = &self.topics;
        for (field, template) in [
            ("mqtt.topics.telemetry", &t.telemetry),
            ("mqtt.topics.events", &t.events),
            ("mqtt.topics.status", &t.status),
            ("mqtt.topics.commands", &t.commands),
            ("mqtt.topics.command_results", &t.command_results),
            ("mqtt.topics.anomalies", &t.anomalies),
            ("mqtt.topics.owner", &t.owner),
        ] {
            check_template(template, true).map_err(|reason| invalid(field, reason))?;
        }
        if t.owner.contains("{gateway_id}") {
            return Err(invalid(
                "mqtt.topics.owner",
                "is shared by every gateway on the broker and must not contain {gateway_id}".into(),
            ));
        }
        if t.owner == t.commands {
            return Err(invalid(
                "mqtt.topics.owner",
                "must differ from mqtt.topics.commands".into(),
            ));
        }
        check_template(&t.gateway_status, false)
            .map_err(|reason| invalid("mqtt.topics.gateway_status", reason))?;
        check_template(&t.gateway_anomalies, false)
            .map_err(|reason| invalid("mqtt.topics.gateway_anomalies", reason))?;
        Ok(())
    }
}

/// A topic template: placeholders fill whole levels, `{device_id}` present exactly when
/// wanted, no wildcards.
fn check_template(template: &str, per_device: bool) -> Result<(), String> {
    if template.contains(['+', '#']) {
        return Err(format!("{template:?} must not contain MQTT wildcards"));
    }
    let mut device_levels = 0;
    for level in template.split('/') {
        match level {
            "{device_id}" => device_levels += 1,
            "{gateway_id}" => {}
            other if other.contains('{') || other.contains('}') => {
                return Err(format!(
                    "{template:?}: a placeholder must fill a whole level; known: {{gateway_id}}, {{device_id}}"
                ))
            }
            _ => {}
        }
    }
    match (per_device, device_levels) {
        (true, 1) | (false, 0) => Ok(()),
        (true, _) => Err(format!("{template:?} must contain {{device_id}} once")),
        (false, _) => Err(format!("{template:?} must not contain {{device_id}}")),
    }
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text)?;
        config.apply_deprecated();
        config.validate()?;
        Ok(config)
    }

    /// Moves deprecated settings to where they live now (the caller logs the warning).
    fn apply_deprecated(&mut self) {
        if let Some(interval) = self.session.slow_report_interval {
            self.set_max_report_interval(interval);
        }
    }

    /// `pacing.max_interval`, where "0s" turns pacing off (`--slow-report-interval` and the
    /// deprecated `session.slow_report_interval`).
    pub fn set_max_report_interval(&mut self, interval: Duration) {
        if interval.is_zero() {
            self.pacing.enabled = false;
        } else {
            self.pacing.max_interval = interval;
        }
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                field,
                reason: reason.into(),
            }
        }
        if !(64..=16 * 1024 * 1024).contains(&self.tcp.max_frame_bytes) {
            return Err(invalid(
                "tcp.max_frame_bytes",
                "must be between 64 and 16777216 bytes",
            ));
        }
        if !(1..=100_000).contains(&self.store.batch_max_frames) {
            return Err(invalid(
                "store.batch_max_frames",
                "must be between 1 and 100000",
            ));
        }
        if self.store.queue_frames < 1 {
            return Err(invalid("store.queue_frames", "must be at least 1"));
        }
        if self.store.max_bytes.is_some_and(|b| b < 1024 * 1024) {
            return Err(invalid(
                "store.max_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        if !(256..=1_000_000).contains(&self.store.batch_max_readings) {
            return Err(invalid(
                "store.batch_max_readings",
                "must be between 256 and 1000000",
            ));
        }
        if !(1024..=(u32::MAX as usize >> 3)).contains(&self.store.queue_readings) {
            return Err(invalid(
                "store.queue_readings",
                "must be between 1024 and 536870911",
            ));
        }
        self.pacing
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        self.limits
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", e.to_string()));
        }
        if self
            .store
            .retention
            .is_some_and(|r| r < Duration::from_secs(60))
        {
            return Err(invalid("store.retention", "must be at least 1 minute"));
        }
        for (field, d) in [
            ("session.hello_timeout", self.session.hello_timeout),
            ("session.idle_timeout", self.session.idle_timeout),
            ("session.write_timeout", self.session.write_timeout),
            ("shutdown.timeout", self.shutdown.timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be longer than zero"));
            }
        }
        if self.auth.fleet_secret.as_deref() == Some("") {
            return Err(invalid("auth.fleet_secret", "must not be empty"));
        }
        for port in &self.serial {
            if !(5..=8).contains(&port.data_bits) {
                return Err(invalid(
                    "serial.data_bits",
                    format!("{}: must be 5 to 8", port.path.display()),
                ));
            }
            if !(1..=2).contains(&port.stop_bits) {
                return Err(invalid(
                    "serial.stop_bits",
                    format!("{}: must be 1 or 2", port.path.display()),
                ));
            }
            if port.baud == 0 {
                return Err(invalid(
                    "serial.baud",
                    format!("{}: must be above zero", port.path.display()),
                ));
            }
            if port.max_bad_frames == 0 {
                return Err(invalid(
                    "serial.max_bad_frames",
                    format!("{}: must be at least 1", port.path.display()),
                ));
            }
        }
        self.http.validate()?;
        self.anomaly.validate()?;
        self.mqtt.validate()
    }

    /// The API token file: `http.token_file`, or `<data_dir>/api.token`.
    pub fn api_token_path(&self) -> PathBuf {
        self.http
            .token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.0.join("api.token"))
    }

    /// The SQLite file: `store.path`, or `<data_dir>/gateway.db`.
    pub fn db_path(&self) -> PathBuf {
        self.store
            .path
            .clone()
            .unwrap_or_else(|| self.data_dir.0.join("gateway.db"))
    }

    /// The fleet secret file: `auth.fleet_secret_file`, or `<data_dir>/fleet.secret`.
    pub fn fleet_secret_path(&self) -> PathBuf {
        self.auth
            .fleet_secret_file
            .clone()
            .unwrap_or_else(|| self.data_dir.0.join("fleet.secret"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_settings_are_checked_and_the_old_interval_still_works() {
        let err = Config::from_toml("[pacing]\ntarget_queue_fill = 1.5\n").unwrap_err();
        assert!(
            err.to_string().contains("pacing.target_queue_fill"),
            "{err}"
        );
        let err = Config::from_toml("[pacing]\nmax_interval = \"1ms\"\n").unwrap_err();
        assert!(err.to_string().contains("pacing.max_interval"), "{err}");
        let err = Config::from_toml("[store]\nqueue_readings = 10\n").unwrap_err();
        assert!(err.to_string().contains("store.queue_readings"), "{err}");
        let old = Config::from_toml("[session]\nslow_report_interval = \"5s\"\n").unwrap();
        assert_eq!(old.pacing.max_interval, Duration::from_secs(5));
        assert!(old.pacing.enabled);
        let off = Config::from_toml("[session]\nslow_report_interval = \"0s\"\n").unwrap();
        assert!(!off.pacing.enabled);
    }

    #[test]
    fn the_shipped_example_config_parses_and_matches_the_defaults() {
        let text = include_str!("../../gateway.example.toml");
        let config = Config::from_toml(text).expect("example config parses");
        let defaults = Config::default();
        assert_eq!(config.tcp.listen, defaults.tcp.listen);
        assert_eq!(config.tcp.max_frame_bytes, defaults.tcp.max_frame_bytes);
        assert_eq!(config.store.durability, defaults.store.durability);
        assert_eq!(
            config.store.batch_max_frames,
            defaults.store.batch_max_frames
        );
        assert_eq!(config.session.idle_timeout, defaults.session.idle_timeout);
        assert_eq!(config.store.queue_readings, defaults.store.queue_readings);
        assert_eq!(
            config.store.batch_max_readings,
            defaults.store.batch_max_readings
        );
        assert_eq!(config.pacing.enabled, defaults.pacing.enabled);
        assert_eq!(
            config.pacing.target_queue_fill,
            defaults.pacing.target_queue_fill
        );
        assert_eq!(
            config.pacing.target_ack_latency,
            defaults.pacing.target_ack_latency
        );
        assert_eq!(config.pacing.max_interval, defaults.pacing.max_interval);
        assert_eq!(config.shutdown.timeout, defaults.shutdown.timeout);
        assert_eq!(config.limits, defaults.limits);
        assert_eq!(config.log, defaults.log);
        assert_eq!(config.mqtt.url, defaults.mqtt.url);
        assert_eq!(config.mqtt.inflight, defaults.mqtt.inflight);
        assert_eq!(config.mqtt.topics.telemetry, defaults.mqtt.topics.telemetry);
        assert_eq!(
            config.mqtt.topics.command_results,
            defaults.mqtt.topics.command_results
        );
        assert_eq!(
            config.mqtt.backlog.max_bytes,
            defaults.mqtt.backlog.max_bytes
        );
        assert_eq!(
            config.mqtt.backlog.when_full,
            defaults.mqtt.backlog.when_full
        );
        assert_eq!(config.mqtt.embedded.listen, defaults.mqtt.embedded.listen);
        assert_eq!(config.mqtt.reconnect_max, defaults.mqtt.reconnect_max);
        assert_eq!(config.http.listen, defaults.http.listen);
        assert_eq!(config.http.enabled, defaults.http.enabled);
        assert_eq!(config.http.protect_all, defaults.http.protect_all);
        assert_eq!(config.http.live_buffer, defaults.http.live_buffer);
        assert_eq!(config.http.max_live_clients, defaults.http.max_live_clients);
        assert_eq!(config.http.live_ping, defaults.http.live_ping);
        assert_eq!(
            config.http.live_max_bytes_per_s,
            defaults.http.live_max_bytes_per_s
        );
    }

    #[test]
    fn limits_are_checked_with_the_field_named() {
        let err = Config::from_toml("[limits]\nmax_devices = 0\n").unwrap_err();
        assert!(err.to_string().contains("limits.max_devices"), "{err}");
        let err = Config::from_toml("[limits]\nmax_sensors = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_sensors"), "{err}");
    }

    #[test]
    fn http_settings_are_checked_with_the_field_named() {
        let err = Config::from_toml("[http]\ntoken = \"short\"\n").unwrap_err();
        assert!(err.to_string().contains("http.token"), "{err}");
        let err = Config::from_toml("[http]\nlive_buffer = 1\n").unwrap_err();
        assert!(err.to_string().contains("http.live_buffer"), "{err}");
        let err = Config::from_toml("[http]\nlisten = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let c = Config::from_toml("[http]\nenabled = false\n").unwrap();
        assert!(!c.http.enabled);
        assert_eq!(c.api_token_path(), PathBuf::from("gateway-data/api.token"));
    }

    #[test]
    fn an_empty_file_gives_the_embedded_defaults() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.db_path(), PathBuf::from("gateway-data/gateway.db"));
        assert_eq!(config.auth.mode, AuthMode::Token);
        assert_eq!(config.session.hello_timeout, Duration::from_secs(10));
    }

    #[test]
    fn an_unknown_field_is_named_in_the_error() {
        let err = Config::from_toml("[store]\nbatch_size = 5\n").unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
    }

    #[test]
    fn a_bad_duration_is_named_in_the_error() {
        let err = Config::from_toml("[session]\nidle_timeout = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("idle_timeout"), "{err}");
    }

    #[test]
    fn an_out_of_range_value_names_its_field() {
        let err = Config::from_toml("[store]\nretention = \"30s\"\n").unwrap_err();
        assert!(err.to_string().contains("store.retention"), "{err}");
        let kept = Config::from_toml("[store]\nretention = \"30d\"\n").unwrap();
        assert_eq!(
            kept.store.retention,
            Some(Duration::from_secs(30 * 24 * 3600))
        );
        let err = Config::from_toml("[store]\nbatch_max_frames = 0\n").unwrap_err();
        assert!(err.to_string().contains("store.batch_max_frames"), "{err}");
        let err = Config::from_toml("[session]\nhello_timeout = \"0s\"\n").unwrap_err();
        assert!(err.to_string().contains("session.hello_timeout"), "{err}");
    }

    #[test]
    fn topic_templates_are_checked() {
        let err = Config::from_toml("[mqtt.topics]\ntelemetry = \"t/{device_id}x\"\n").unwrap_err();
        assert!(err.to_string().contains("mqtt.topics.telemetry"), "{err}");
        let err = Config::from_toml("[mqtt.topics]\nevents = \"e/all\"\n").unwrap_err();
        assert!(err.to_string().contains("mqtt.topics.events"), "{err}");
        let err =
            Config::from_toml("[mqtt.topics]\ngateway_status = \"g/{device_id}\"\n").unwrap_err();
        assert!(
            err.to_string().contains("mqtt.topics.gateway_status"),
            "{err}"
        );
        assert!(Config::from_toml("[mqtt.topics]\ncommands = \"cmd/{device_id}\"\n").is_ok());
    }

    #[test]
    fn a_bad_mqtt_url_is_named() {
        let err = Config::from_toml("[mqtt]\nurl = \"tcp://x:1\"\n").unwrap_err();
        assert!(err.to_string().contains("mqtt.url"), "{err}");
    }

    #[test]
    fn serial_ports_parse_with_defaults_and_from_the_command_line() {
        let c = Config::from_toml("[[serial]]\npath = \"/dev/ttyUSB0\"\n[[serial]]\npath = \"/dev/ttyS1\"\nbaud = 9600\nparity = \"even\"\n").unwrap();
        assert_eq!(c.serial.len(), 2);
        assert_eq!(
            (
                c.serial[0].baud,
                c.serial[0].data_bits,
                c.serial[0].stop_bits
            ),
            (115_200, 8, 1)
        );
        assert_eq!((c.serial[1].baud, c.serial[1].parity), (9600, Parity::Even));
        let err = Config::from_toml("[[serial]]\npath = \"/dev/x\"\ndata_bits = 9\n").unwrap_err();
        assert!(err.to_string().contains("serial.data_bits"), "{err}");
        assert_eq!(
            SerialPortConfig::from_arg("/dev/ttyACM0@57600")
                .unwrap()
                .baud,
            57600
        );
        assert_eq!(
            SerialPortConfig::from_arg("/dev/ttyACM0").unwrap().baud,
            115_200
        );
        assert!(SerialPortConfig::from_arg("/dev/x@fast").is_err());
    }

    #[test]
    fn durability_power_loss_parses() {
        let config = Config::from_toml("[store]\ndurability = \"power-loss\"\n").unwrap();
        assert_eq!(config.store.durability, Durability::PowerLoss);
    }
}
