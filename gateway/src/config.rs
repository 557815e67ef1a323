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
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            max_frame_bytes: proto::DEFAULT_MAX_FRAME_LEN,
        }
    }
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
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: None,
            durability: Durability::ProcessCrash,
            batch_max_frames: 2048,
            queue_frames: 8192,
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
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            write_timeout: Duration::from_secs(30),
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

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
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
        Ok(())
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
        assert_eq!(config.shutdown.timeout, defaults.shutdown.timeout);
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
        let err = Config::from_toml("[store]\nbatch_max_frames = 0\n").unwrap_err();
        assert!(err.to_string().contains("store.batch_max_frames"), "{err}");
        let err = Config::from_toml("[session]\nhello_timeout = \"0s\"\n").unwrap_err();
        assert!(err.to_string().contains("session.hello_timeout"), "{err}");
    }

    #[test]
    fn durability_power_loss_parses() {
        let config = Config::from_toml("[store]\ndurability = \"power-loss\"\n").unwrap();
        assert_eq!(config.store.durability, Durability::PowerLoss);
    }
}
