//! The service manager (systemd): `READY=1` once the store is open and every listener is up,
//! `STOPPING=1` when a graceful stop begins, and the watchdog, pinged only while the store
//! writer makes progress. Every call is a no-op when the gateway does not run under a
//! service manager (`NOTIFY_SOCKET` unset).

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::store::writer::QueueProbe;

fn notify(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::debug!(error = %e, "telling the service manager failed");
    }
}

/// Start-up is finished: the store is open and the device listeners accept.
pub fn ready() {
    notify(NotifyState::Ready);
}

/// A graceful stop began.
pub fn stopping() {
    notify(NotifyState::Stopping);
}

/// Whether a writer that has been committing for `running` (`None`: idle) is stalled
/// under a watchdog of `period`: stuck in one commit for half of it.
pub fn stalled(running: Option<Duration>, period: Duration) -> bool {
    running.is_some_and(|r| r >= period / 2)
}

/// Pings the watchdog every quarter of its period (`WATCHDOG_USEC`) while the writer is
/// alive and not stuck in a commit for half the period. A stuck writer (a disk that stopped
/// answering, a lock held by another process) stops the pings, so systemd restarts the
/// gateway; devices resend what was not acknowledged. Returns at once when no watchdog is
/// asked for.
pub async fn watchdog(writer: QueueProbe, shutdown: CancellationToken) {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    tracing::info!(
        ?period,
        "systemd watchdog on: pinged while the store writer makes progress"
    );
    let mut tick = tokio::time::interval(period / 4);
    let mut withheld = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let running = writer.commit_running_for();
        if writer.writer_alive() && !stalled(running, period) {
            if withheld {
                tracing::info!("the store writer is committing again: watchdog pings resumed");
                withheld = false;
            }
            notify(NotifyState::Watchdog);
        } else if !withheld {
            withheld = true;
            tracing::error!(
                commit_running_ms = running.map(|r| r.as_millis() as u64),
                "the store writer is stuck: not pinging the systemd watchdog (it restarts the gateway if this lasts)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_is_stalled_only_when_one_commit_outlasts_half_the_period() {
        let period = Duration::from_secs(60);
        assert!(!stalled(None, period));
        assert!(!stalled(Some(Duration::from_secs(29)), period));
        assert!(stalled(Some(Duration::from_secs(30)), period));
    }
}
