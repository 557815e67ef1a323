//! The device registry: which link currently speaks for each device, and how to reach it.
//!
//! The newest connection wins: registering a device that already has a link cancels the old
//! link's `superseded` token, and that link closes with `ERROR_CODE_SUPERSEDED`. Each entry
//! holds a bounded sender of commands for the link. Short critical sections under a mutex;
//! nothing awaits while holding it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proto::v1::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Commands waiting to be written to one link. Full-policy: the command stays open in the
/// store and is delivered at the device's next connection (or expires).
const COMMAND_QUEUE: usize = 64;

struct Entry {
    conn: u64,
    link: &'static str,
    superseded: CancellationToken,
    /// Boxed: the channel allocates its first block of slots up front, per link.
    commands: mpsc::Sender<Box<Command>>,
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
    /// Commands routed to this link while it is current.
    pub commands: mpsc::Receiver<Box<Command>>,
}

impl Registry {
    /// Makes this link (of kind `link`, e.g. "tcp") the device's current one, superseding any
    /// older link.
    pub fn register(&self, device: &Arc<str>, link: &'static str) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let superseded = CancellationToken::new();
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let old = self.lock().insert(
            device.clone(),
            Entry {
                conn,
                link,
                superseded: superseded.clone(),
                commands: tx,
            },
        );
        if let Some(old) = old {
            old.superseded.cancel();
        }
        Registration {
            conn,
            superseded,
            commands,
        }
    }

    /// Removes the device's entry if it is still this link's; says whether it was.
    pub fn unregister(&self, device: &Arc<str>, conn: u64) -> bool {
        let mut sessions = self.lock();
        if sessions.get(device).is_some_and(|e| e.conn == conn) {
            sessions.remove(device);
            true
        } else {
            false
        }
    }

    /// Hands a command to the device's current link; false if it has none or its queue is
    /// full (the command then waits in the store for the next connection).
    pub fn send_command(&self, device: &str, command: Command) -> bool {
        self.lock()
            .get(device)
            .is_some_and(|e| e.commands.try_send(Box::new(command)).is_ok())
    }

    /// Devices with a link now, and the link kind.
    pub fn online(&self) -> Vec<(Arc<str>, &'static str)> {
        self.lock()
            .iter()
            .map(|(d, e)| (d.clone(), e.link))
            .collect()
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
        let first = registry.register(&dev, "tcp");
        let second = registry.register(&dev, "tcp");
        assert!(first.superseded.is_cancelled());
        assert!(!second.superseded.is_cancelled());
        // The old link leaving does not remove the new one.
        assert!(!registry.unregister(&dev, first.conn));
        assert_eq!(registry.len(), 1);
        assert!(registry.unregister(&dev, second.conn));
        assert!(registry.is_empty());
    }

    #[test]
    fn commands_reach_the_current_link_only() {
        let registry = Registry::default();
        let dev: Arc<str> = Arc::from("meter-1");
        let mut first = registry.register(&dev, "tcp");
        let mut second = registry.register(&dev, "serial");
        let cmd = Command {
            id: "c1".into(),
            ..Default::default()
        };
        assert!(registry.send_command("meter-1", cmd.clone()));
        assert!(!registry.send_command("nobody", cmd));
        assert_eq!(
            second.commands.try_recv().map(|c| c.id).ok().as_deref(),
            Some("c1")
        );
        assert!(first.commands.try_recv().is_err());
        assert_eq!(registry.online(), vec![(dev, "serial")]);
    }
}
