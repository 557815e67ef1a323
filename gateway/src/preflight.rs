//! What `gateway run` checks before it starts anything, and all that `gateway check-config`
//! does: the files a configuration names (certificates, keys, secret files, the store's
//! directory, serial ports) exist and parse. Every failure names the config field and the
//! file. Nothing here binds a socket, opens the store or creates a file.

use std::path::Path;

use anyhow::{bail, Context};

use crate::config::{AuthMode, Config};

/// What a check found that does not stop the gateway (it would create a missing secret
/// file; a serial adapter may be plugged in later).
#[derive(Debug, Default)]
pub struct Findings {
    /// One line each, for the operator.
    pub notes: Vec<String>,
}

/// Checks the files `config` names. Errors name the field and the file.
pub fn check_files(config: &Config) -> anyhow::Result<Findings> {
    let mut found = Findings::default();
    if let Some(tls) = &config.tcp.tls {
        crate::tls::server_config(&tls.cert_file, &tls.key_file)?;
    }
    if let Some(tls) = config.http.tls.as_ref().filter(|_| config.http.enabled) {
        crate::tls::server_config_for("http.tls", &tls.cert_file, &tls.key_file)?;
    }
    if config.mqtt.enabled {
        if let Some(url) = &config.mqtt.url {
            // Builds the client options as the bridge will (CA file, client certificate).
            crate::bridge::options::mqtt_options(&config.mqtt, url, "check")
                .context("mqtt settings")?;
        }
    }
    let fleet_tokens = config.auth.mode != AuthMode::None
        && config.auth.fleet_tokens
        && config.auth.fleet_secret.is_none();
    if fleet_tokens {
        secret_file(
            &config.fleet_secret_path(),
            "auth.fleet_secret_file",
            &mut found,
        )?;
    }
    if config.http.enabled && config.http.token.is_none() {
        secret_file(&config.api_token_path(), "http.token_file", &mut found)?;
    }
    let db = config.db_path();
    match db.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) if !dir.exists() => found.notes.push(format!(
            "store.path: the directory {} does not exist yet; the gateway creates it",
            dir.display()
        )),
        Some(dir) if !dir.is_dir() => bail!(
            "store.path: {} is not a directory (the store would be {})",
            dir.display(),
            db.display()
        ),
        _ => {}
    }
    if db.is_dir() {
        bail!("store.path: {} is a directory, not a file", db.display());
    }
    for port in &config.serial {
        if !port.path.exists() {
            found.notes.push(format!(
                "serial: {} does not exist now; the gateway keeps retrying it",
                port.path.display()
            ));
        }
    }
    Ok(found)
}

/// A secret file the gateway reads, or creates when missing.
fn secret_file(path: &Path, field: &str, found: &mut Findings) -> anyhow::Result<()> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => {
            bail!("{field}: the file {} is empty", path.display())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            found.notes.push(format!(
                "{field}: {} does not exist yet; the gateway creates it with a new random secret",
                path.display()
            ));
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("{field}: reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_certificate_names_the_field_and_the_file() {
        let config = Config::from_toml(
            "[tcp.tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n",
        )
        .unwrap();
        let err = format!("{:#}", check_files(&config).unwrap_err());
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
        assert!(err.contains("tcp.tls"), "{err}");
    }

    #[test]
    fn an_empty_secret_file_is_refused_and_a_missing_one_is_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.data_dir.0 = dir.path().to_path_buf();
        let found = check_files(&config).unwrap();
        assert!(
            found.notes.iter().any(|n| n.contains("fleet.secret")),
            "{:?}",
            found.notes
        );
        std::fs::write(dir.path().join("api.token"), "  \n").unwrap();
        let err = format!("{:#}", check_files(&config).unwrap_err());
        assert!(err.contains("http.token_file"), "{err}");
        assert!(err.contains("api.token"), "{err}");
    }
}
