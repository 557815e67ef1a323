//! SIGHUP: what a running gateway takes from its changed config file without dropping a
//! link: the log level, `[limits]`, the device listener's TLS certificate and key (read
//! again from their files, so a renewed certificate at the same path is picked up), and
//! `store.retention`. Everything else is reported as needing a restart. A file that does
//! not parse or validate, or names certificates that do not load, is refused by the caller
//! (`main.rs`) and the running settings stay.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::limits::Limits;

/// Sets the log filter (`log.level`); `Err` names what is wrong with the directive.
pub type LogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The device listener's TLS acceptor, replaced by a reload.
pub type SharedAcceptor = Arc<RwLock<TlsAcceptor>>;

/// The parts a reload changes, and the settings now.
pub struct Reloader {
    /// The settings in force.
    pub current: Config,
    /// `[limits]`.
    pub limits: Arc<Limits>,
    /// `[tcp.tls]`, when the listener is TLS.
    pub tls: Option<SharedAcceptor>,
    /// `store.retention`, read by the writer.
    pub retention: watch::Sender<Option<Duration>>,
    /// `log.level`; `None` when `RUST_LOG` decides.
    pub log: Option<LogFilter>,
}

impl Reloader {
    /// Applies `new` and returns what changed, one line each (and what waits for a
    /// restart). `Err`: nothing was applied.
    pub fn apply(&mut self, new: Config) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        // Everything that can fail first, so a failure changes nothing.
        let acceptor = match (&self.tls, &new.tcp.tls) {
            (Some(_), Some(t)) => Some(
                crate::tls::server_config(&t.cert_file, &t.key_file)
                    .map(TlsAcceptor::from)
                    .map_err(|e| e.to_string())?,
            ),
            _ => None,
        };
        if new.log.level != self.current.log.level {
            match &self.log {
                Some(set) => {
                    set(&new.log.level).map_err(|e| format!("log.level: {e}"))?;
                    done.push(format!(
                        "log.level: {:?} -> {:?}",
                        self.current.log.level, new.log.level
                    ));
                }
                None => done.push("log.level changed, but RUST_LOG is set and decides".into()),
            }
        }
        if let (Some(shared), Some(acceptor)) = (&self.tls, acceptor) {
            *shared.write().unwrap_or_else(|e| e.into_inner()) = acceptor;
            done.push("tcp.tls: certificate and key read again; new links use them".into());
        }
        if new.limits != self.current.limits {
            self.limits.set_config(new.limits.clone());
            done.push(format!("limits: {:?}", new.limits));
        }
        if new.store.retention != self.current.store.retention {
            self.retention.send_replace(new.store.retention);
            done.push(format!(
                "store.retention: {} -> {}",
                show(self.current.store.retention),
                show(new.store.retention)
            ));
        }
        let restart = needs_restart(&self.current, &new);
        if !restart.is_empty() {
            done.push(format!(
                "changed but applied only at the next restart: {}",
                restart.join(", ")
            ));
        }
        // What waits for a restart keeps its running value, so the next reload still says so.
        self.current.log = new.log;
        self.current.limits = new.limits;
        self.current.store.retention = new.store.retention;
        if let (Some(running), Some(t)) = (&mut self.current.tcp.tls, new.tcp.tls) {
            *running = t;
        }
        Ok(done)
    }

    /// Applies each config from `updates` until it closes, logging the outcome.
    pub async fn run(mut self, mut updates: mpsc::Receiver<Config>) {
        while let Some(new) = updates.recv().await {
            match self.apply(new) {
                Ok(done) if done.is_empty() => {
                    tracing::info!("reload: the config file has no changes")
                }
                Ok(done) => {
                    for line in done {
                        tracing::info!("reload: {line}");
                    }
                }
                Err(e) => tracing::error!("reload refused: {e}; the running settings stay"),
            }
        }
    }
}

fn show(d: Option<Duration>) -> String {
    d.map_or("keep everything".into(), |d| {
        humantime::format_duration(d).to_string()
    })
}

/// The sections of `new` that differ from `old` outside what a reload applies.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut a = old.clone();
    let mut b = new.clone();
    for c in [&mut a, &mut b] {
        c.log = Default::default();
        c.limits = Default::default();
        c.store.retention = None;
    }
    // Certificates: the paths may change, the listener stays TLS or plain.
    if let (Some(x), Some(y)) = (&mut a.tcp.tls, &b.tcp.tls) {
        *x = y.clone();
    }
    let mut out = Vec::new();
    macro_rules! section {
        ($($field:ident),*) => {$(
            if format!("{:?}", a.$field) != format!("{:?}", b.$field) {
                out.push(stringify!($field));
            }
        )*};
    }
    section!(data_dir, tcp, auth, store, session, shutdown, mqtt, serial, http, anomaly, pacing);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn reloader(config: Config) -> (Reloader, watch::Receiver<Option<Duration>>) {
        let (tx, rx) = watch::channel(config.store.retention);
        let limits = Arc::new(Limits::new(
            config.limits.clone(),
            Duration::from_secs(1),
            Arc::new(Metrics::default()),
        ));
        (
            Reloader {
                current: config,
                limits,
                tls: None,
                retention: tx,
                log: None,
            },
            rx,
        )
    }

    #[test]
    fn limits_and_retention_change_and_the_rest_waits_for_a_restart() {
        let (mut r, retention) = reloader(Config::default());
        let new = Config::from_toml(
            "[limits]\nmax_devices = 7\n[store]\nretention = \"2d\"\n[session]\nidle_timeout = \"5m\"\n",
        )
        .unwrap();
        let done = r.apply(new).unwrap();
        assert_eq!(r.limits.config().max_devices, 7);
        assert_eq!(*retention.borrow(), Some(Duration::from_secs(2 * 86400)));
        assert!(
            done.iter().any(|l| l.contains("store.retention")),
            "{done:?}"
        );
        assert!(
            done.iter()
                .any(|l| l.contains("next restart") && l.contains("session")),
            "{done:?}"
        );
        // The same file again: nothing applied, and the session change still waits.
        let again = Config::from_toml(
            "[limits]\nmax_devices = 7\n[store]\nretention = \"2d\"\n[session]\nidle_timeout = \"5m\"\n",
        )
        .unwrap();
        let done = r.apply(again).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(done[0].contains("next restart"), "{done:?}");
        assert_eq!(r.current.session.idle_timeout, Duration::from_secs(90));
    }
}
