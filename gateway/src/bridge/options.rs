//! Turns `[mqtt]` into rumqttc's `MqttOptions`: broker URL, TLS (rustls with the system's
//! roots or a CA file, optional client certificate), credentials, keepalive, in-flight window
//! and the gateway's Last Will. Clean sessions: after every reconnect the bridge replays from
//! its durable cursor, so nothing depends on the broker remembering a session.

use std::sync::Arc;

use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use crate::config::MqttConfig;
use crate::tls::{self, PemError};

/// Why the MQTT settings could not be turned into a connection.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    /// The URL is not `mqtt[s]://host[:port]`.
    #[error("mqtt.url {0:?}: expected mqtt://host[:port] or mqtts://host[:port]")]
    Url(String),
    /// A certificate or key file could not be read or parsed.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the certificates.
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Host, port and whether TLS is on, from a broker URL.
pub fn parse_url(url: &str) -> Result<(String, u16, bool), OptionsError> {
    let bad = || OptionsError::Url(url.to_owned());
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(bad());
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(bad());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            (host, port.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (authority, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port, tls))
}

fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig, OptionsError> {
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            for cert in tls::certificates("mqtt.ca_file", path)? {
                roots.add(cert)?;
            }
        }
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            for e in &loaded.errors {
                tracing::warn!(error = %e, "loading a system CA certificate failed");
            }
            let (added, _ignored) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                tracing::warn!("no system CA certificates found; set mqtt.ca_file for mqtts://");
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    match (&config.client_cert, &config.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let certs = tls::certificates("mqtt.client_cert", cert_path)?;
            let key = tls::private_key("mqtt.client_key", key_path)?;
            Ok(builder.with_client_auth_cert(certs, key)?)
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// rumqttc options for `config`, with `will_topic` as the Last Will (`offline`, retained).
pub fn mqtt_options(
    config: &MqttConfig,
    url: &str,
    will_topic: &str,
) -> Result<MqttOptions, OptionsError> {
    let (host, port, tls) = parse_url(url)?;
    let mut options = MqttOptions::new(config.client_id(), host, port);
    options
        .set_keep_alive(config.keepalive)
        .set_clean_session(true)
        .set_inflight(config.inflight)
        .set_max_packet_size(1024 * 1024, 1024 * 1024)
        .set_last_will(LastWill::new(will_topic, "offline", QoS::AtLeastOnce, true));
    if let Some(user) = &config.username {
        options.set_credentials(user, config.password.clone().unwrap_or_default());
    }
    if tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(config)?),
        )));
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_port_and_tls() {
        assert_eq!(
            parse_url("mqtt://broker:1884").unwrap(),
            ("broker".into(), 1884, false)
        );
        assert_eq!(
            parse_url("mqtts://broker").unwrap(),
            ("broker".into(), 8883, true)
        );
        assert_eq!(
            parse_url("mqtt://127.0.0.1").unwrap(),
            ("127.0.0.1".into(), 1883, false)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1999").unwrap(),
            ("::1".into(), 1999, false)
        );
        for bad in [
            "tcp://x",
            "mqtt://",
            "mqtt://x:notaport",
            "mqtt://x/path",
            "mqtt://u@x",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_ca_file_names_the_field() {
        let config = MqttConfig {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..MqttConfig::default()
        };
        let err = mqtt_options(&config, "mqtts://x", "w").unwrap_err();
        assert!(err.to_string().contains("mqtt.ca_file"), "{err}");
    }

    #[test]
    fn system_roots_build_a_tls_config() {
        assert!(mqtt_options(&MqttConfig::default(), "mqtts://x", "w").is_ok());
    }
}
