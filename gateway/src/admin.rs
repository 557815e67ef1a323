//! Admin actions that act at once on live links, whoever takes them.
//!
//! The API's revoke closes the device's link itself (through the registry). The CLI
//! (`gateway devices revoke`) is another process: it only writes `revoked_at_ms` to the
//! store. This watcher reads recent revocations from the store every second and closes the
//! links of those devices, so a revoke from the CLI also reaches a running gateway within a
//! second or two.

use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;
use crate::store::now_ms;

/// How often the store is asked.
const POLL: Duration = Duration::from_secs(1);
/// Revocations this far back are looked at again each poll (covers clock steps and a slow
/// poll); closing an already closed link is a no-op.
const OVERLAP_MS: i64 = 10_000;

/// Closes the live links of devices revoked in the store, until `shutdown`.
pub async fn watch_revocations(
    pool: SqlitePool,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let mut since = now_ms() - OVERLAP_MS;
    let mut tick = tokio::time::interval(POLL);
    let mut failure_logged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if registry.is_empty() {
            continue;
        }
        let checked_at = now_ms();
        let revoked: Result<Vec<String>, _> =
            sqlx::query_scalar("SELECT device_id FROM devices WHERE revoked_at_ms >= ?")
                .bind(since)
                .fetch_all(&pool)
                .await;
        match revoked {
            Ok(devices) => {
                failure_logged = false;
                for device in devices {
                    if registry.revoke(&device) {
                        tracing::info!(%device, "device revoked in the store: closing its link");
                    }
                }
                since = checked_at - OVERLAP_MS;
            }
            Err(e) if !failure_logged => {
                failure_logged = true;
                tracing::warn!(error = %e, "reading revocations failed; retrying");
            }
            Err(_) => {}
        }
    }
}
