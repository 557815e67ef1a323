//! The device registry: which link currently speaks for each device.
//!
//! The newest connection wins: registering a device that already has a link cancels the old
//! link's `superseded` token, and that link closes with `ERROR_CODE_SUPERSEDED`. A short
//! critical section under a mutex; nothing awaits while holding it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

struct Entry {
    conn: u64,
    superseded: CancellationToken,
}

/// Device id to current link.
#[derive(Default)]
pub struct Registry {
    next_conn: AtomicU64,
    sessions: Mutex<HashMap<Arc<str>, Entry>>,
}

/// A link's place in the registry.
pub struct Registration {
    /// Identifies this link among the device's links.
    pub conn: u64,
    /// Cancelled when a newer link of the same device registers.
    pub superseded: CancellationToken,
}

impl Registry {
    /// Makes this link the device's current one, superseding any older link.
    pub fn register(&self, device: &Arc<str>) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let superseded = CancellationToken::new();
        let old = self.lock().insert(
            device.clone(),
            Entry {
                conn,
                superseded: superseded.clone(),
            },
        );
        if let Some(old) = old {
            old.superseded.cancel();
        }
        Registration { conn, superseded }
    }

    /// Removes the device's entry if it is still this link's.
    pub fn unregister(&self, device: &Arc<str>, conn: u64) {
        let mut sessions = self.lock();
        if sessions.get(device).is_some_and(|e| e.conn == conn) {
            sessions.remove(device);
        }
    }

    /// How many devices have a link now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no device has a link.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (single
        // insert/remove calls), so a poisoned lock is still usable.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_link_supersedes_the_older_one() {
        let registry = Registry::default();
        let dev: Arc<str> = Arc::from("meter-1");
        let first = registry.register(&dev);
        let second = registry.register(&dev);
        assert!(first.superseded.is_cancelled());
        assert!(!second.superseded.is_cancelled());
        // The old link leaving does not remove the new one.
        registry.unregister(&dev, first.conn);
        assert_eq!(registry.len(), 1);
        registry.unregister(&dev, second.conn);
        assert!(registry.is_empty());
    }
}
