//! PEM files for TLS, shared by the device listener (`[tcp.tls]`) and the MQTT bridge
//! (`mqtt.ca_file`, client certificates). Errors name the config field and the file.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate or key file that could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{field} {path}: {reason}")]
pub struct PemError {
    /// The config field naming the file.
    pub field: &'static str,
    /// The file.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

impl PemError {
    fn new(field: &'static str, path: &Path, reason: impl ToString) -> Self {
        Self {
            field,
            path: path.display().to_string(),
            reason: reason.to_string(),
        }
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, PemError> {
    std::fs::read(path).map_err(|e| PemError::new(field, path, e))
}

/// Every certificate in the PEM file at `path` (at least one).
pub fn certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(field, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::new(field, path, e))?;
    if certs.is_empty() {
        return Err(PemError::new(field, path, "no certificates in the file"));
    }
    Ok(certs)
}

/// The first private key in the PEM file at `path`.
pub fn private_key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read(field, path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| PemError::new(field, path, e))?
        .ok_or_else(|| PemError::new(field, path, "no private key in the file"))
}

/// Why the device listener's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerTlsError {
    /// A file could not be read or parsed.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the certificate or key.
    #[error("tcp.tls: {0}")]
    Tls(#[from] rustls::Error),
}

/// The device listener's TLS setup from a certificate chain and its key (PEM files).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, ServerTlsError> {
    server_config_for("tcp.tls", cert_file, key_file)
}

/// [`server_config`] for the config section `section` (`tcp.tls`, `http.tls`), whose
/// name errors carry.
pub fn server_config_for(
    section: &'static str,
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, ServerTlsError> {
    let (cert_field, key_field) = match section {
        "http.tls" => ("http.tls.cert_file", "http.tls.key_file"),
        _ => ("tcp.tls.cert_file", "tcp.tls.key_file"),
    };
    let certs = certificates(cert_field, cert_file)?;
    let key = private_key(key_field, key_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_names_its_field() {
        let err = server_config(Path::new("/nonexistent/cert.pem"), Path::new("/x")).unwrap_err();
        assert!(err.to_string().contains("tcp.tls.cert_file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = certificates("tcp.tls.cert_file", &empty).unwrap_err();
        assert!(err.to_string().contains("no certificates"), "{err}");
        let err = private_key("tcp.tls.key_file", &empty).unwrap_err();
        assert!(err.to_string().contains("tcp.tls.key_file"), "{err}");
    }
}
