//! `[http]`: the operator API, `/metrics`, `/healthz` and the live WebSocket feed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, TcpTlsConfig};

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve HTTP at all. Default true.
    pub enabled: bool,
    /// Address the HTTP listener binds. Default `127.0.0.1:8080` (this box only); to reach
    /// it from the site network use `0.0.0.0:8080` with `[http.tls]`.
    pub listen: SocketAddr,
    /// The API token (`Authorization: Bearer TOKEN`); overrides `token_file`. At least 16
    /// characters.
    pub token: Option<String>,
    /// File holding the API token (surrounding whitespace ignored). Default
    /// `<data_dir>/api.token`, created with a random token on first start if missing.
    pub token_file: Option<PathBuf>,
    /// Require the token on `/healthz` and `/metrics` too. Default false: they are open, as
    /// load balancers, systemd and Prometheus expect.
    pub protect_all: bool,
    /// `[http.tls]`: serve HTTPS with this certificate. Unset: plain HTTP.
    pub tls: Option<TcpTlsConfig>,
    /// Live-feed messages kept for the slowest WebSocket client (one message is a committed
    /// batch of frames, a status change or a command outcome). Default 1024. A client further
    /// behind is sent `{"type":"lagged","skipped":N}` and goes on from live.
    pub live_buffer: usize,
    /// Most WebSocket clients of the live feed at once; more get 503. Default 64.
    pub max_live_clients: usize,
    /// Bytes per second the live feed may send, all clients together; 0: unlimited. Default
    /// 8388608 (8 MiB/s). Clients that want more fall behind and are told they lagged, so
    /// dashboards can never take the cores ingest needs.
    pub live_max_bytes_per_s: u64,
    /// Ping interval of idle WebSocket clients. Default 20s.
    #[serde(with = "humantime_serde")]
    pub live_ping: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            token_file: None,
            protect_all: false,
            tls: None,
            live_buffer: 1024,
            max_live_clients: 64,
            live_max_bytes_per_s: 8 * 1024 * 1024,
            live_ping: Duration::from_secs(20),
        }
    }
}

impl HttpConfig {
    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.into(),
        };
        if self.token.as_ref().is_some_and(|t| t.trim().len() < 16) {
            return Err(invalid("http.token", "must be at least 16 characters"));
        }
        if !(16..=1_000_000).contains(&self.live_buffer) {
            return Err(invalid(
                "http.live_buffer",
                "must be between 16 and 1000000",
            ));
        }
        if self.max_live_clients == 0 {
            return Err(invalid("http.max_live_clients", "must be at least 1"));
        }
        if self.live_ping.is_zero() {
            return Err(invalid("http.live_ping", "must be longer than zero"));
        }
        Ok(())
    }
}
