//! The embedded MQTT broker (rumqttd), started when no `mqtt.url` is configured so that a
//! fresh install works end to end: `mosquitto_sub -h 127.0.0.1 -t 'gateway/#' -v` shows the
//! traffic.
//!
//! rumqttd runs on threads of its own for the life of the process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Why the embedded broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Its address is taken (another broker?) or not bindable.
    #[error("the embedded MQTT broker cannot listen on {addr}: {source}; set [mqtt.embedded] listen, or point mqtt.url at your broker")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Its configuration was refused.
    #[error("embedded MQTT broker configuration: {0}")]
    Config(#[from] toml::de::Error),
    /// It did not start listening in time.
    #[error("the embedded MQTT broker did not start listening on {0}")]
    NotListening(SocketAddr),
    /// Its thread could not be started.
    #[error("starting the embedded MQTT broker: {0}")]
    Thread(std::io::Error),
}

/// Starts rumqttd on `listen` and waits until it accepts connections. Returns the URL to
/// bridge to.
pub fn start(listen: SocketAddr) -> Result<String, BrokerError> {
    // A clear error beats a broker thread that logs and dies.
    drop(
        std::net::TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
            addr: listen,
            source,
        })?,
    );
    let config: rumqttd::Config = toml::from_str(&format!(
        r#"
        id = 0
        [router]
        max_connections = 10010
        max_outgoing_packet_count = 200
        max_segment_size = 10485760
        max_segment_count = 10
        [v4.1]
        name = "embedded"
        listen = "{listen}"
        next_connection_delay_ms = 1
        [v4.1.connections]
        connection_timeout_ms = 60000
        max_payload_size = 1048576
        max_inflight_count = 500
        dynamic_filters = true
        "#
    ))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the embedded MQTT broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            return Err(BrokerError::NotListening(listen));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(format!("mqtt://{listen}"))
}
