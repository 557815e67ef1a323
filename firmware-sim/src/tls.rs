//! TLS toward the gateway (`--tls-ca`: a CA to trust and the name to check on the gateway's
//! certificate), and the proxy's own certificate for devices that connect to it with TLS.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How a simulated device opens TLS to the gateway.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsClient {
    /// Trusts the certificates in the PEM file `ca_file` and checks the gateway's certificate
    /// for `server_name` (a DNS name or an IP address).
    pub fn new(ca_file: &Path, server_name: &str) -> anyhow::Result<Self> {
        let pem =
            std::fs::read(ca_file).with_context(|| format!("CA file {}", ca_file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.with_context(|| format!("CA file {}", ca_file.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("CA file {}", ca_file.display()))?;
        }
        anyhow::ensure!(
            !roots.is_empty(),
            "CA file {}: no certificates in the file",
            ca_file.display()
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = ServerName::try_from(server_name.to_owned())
            .with_context(|| format!("TLS server name {server_name:?}"))?;
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The host part of a `HOST:PORT` gateway address, the default name to check.
    pub fn host_of(gateway: &str) -> &str {
        let host = gateway.rsplit_once(':').map_or(gateway, |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// TLS over a connected stream.
    pub async fn connect(&self, stream: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector
            .connect(self.server_name.clone(), stream)
            .await
    }
}

/// A byte stream to or from a device or the gateway: plain TCP or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Longest a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `stream` as it is (`tls` unset), or with TLS set up over it (within
/// [`HANDSHAKE_TIMEOUT`]). `Err` when the handshake fails or times out.
pub async fn over(tls: Option<&TlsClient>, stream: TcpStream) -> std::io::Result<Box<dyn Io>> {
    let _ = stream.set_nodelay(true);
    match tls {
        None => Ok(Box::new(stream)),
        Some(client) => match tokio::time::timeout(HANDSHAKE_TIMEOUT, client.connect(stream)).await
        {
            Ok(Ok(stream)) => Ok(Box::new(stream)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        },
    }
}

/// A TLS server setup for the proxy's device side, from a certificate chain and its key (PEM).
pub fn acceptor(cert_file: &Path, key_file: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let cert_pem =
        std::fs::read(cert_file).with_context(|| format!("--tls-cert {}", cert_file.display()))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--tls-cert {}", cert_file.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "--tls-cert {}: no certificates in the file",
        cert_file.display()
    );
    let key_pem =
        std::fs::read(key_file).with_context(|| format!("--tls-key {}", key_file.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .with_context(|| format!("--tls-key {}", key_file.display()))?
        .with_context(|| {
            format!(
                "--tls-key {}: no private key in the file",
                key_file.display()
            )
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-cert/--tls-key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
