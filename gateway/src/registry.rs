//! The device registry: which link currently speaks for each device, what it said at Hello,
//! and how to reach it.
//!
//! The newest connection wins: registering a device that already has a link cancels the old
//! link's `ended` token, and that link closes with `ERROR_CODE_SUPERSEDED`. An operator's
//! revoke marks the link revoked and cancels the same token, and it closes with
//! `ERROR_CODE_DEVICE_REVOKED` at once. Each entry shares one small allocation with its link:
//! the last-heard clock, the revoked mark, the pacing state and a bounded queue of commands
//! (empty, it allocates nothing: state per idle link is counted in bytes). Short critical
//! sections under a mutex; nothing awaits while holding it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proto::v1::Command;
use tokio_util::sync::CancellationToken;

/// Commands waiting to be written to one link. Full-policy: the command stays open in the
/// store and is delivered at the device's next connection (or expires).
const COMMAND_QUEUE: usize = 64;

/// What a link said about itself at Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// `tcp`, `tls` or `serial`.
    pub link: &'static str,
    /// The peer address, or the serial port's path.
    pub peer: Arc<str>,
    /// Firmware version from Hello.
    pub firmware_version: String,
    /// The epoch of its session.
    pub epoch: u64,
    /// When it said Hello, Unix ms.
    pub connected_ms: i64,
}

/// A device's current link as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    /// What it said at Hello.
    pub info: LinkInfo,
    /// When anything was last received on it, Unix ms.
    pub last_seen_ms: i64,
    /// The report interval the pacer asked of it, ms (0: none).
    pub report_interval_ms: u32,
}

/// What a link and its registry entry share.
#[derive(Debug, Default)]
pub struct LinkState {
    /// When anything was last received on the link, Unix ms.
    pub last_seen_ms: AtomicI64,
    /// Set (before `ended` is cancelled) when an operator revoked the device.
    revoked: AtomicBool,
    /// Its frame rate as the pacer sees it, and the interval it was asked to keep.
    pub pace: crate::pacing::LinkPace,
    /// Commands routed to this link while it is current, at most [`COMMAND_QUEUE`].
    commands: Mutex<std::collections::VecDeque<Box<Command>>>,
    /// Wakes the link when a command is queued (a permit waits if it is busy).
    pub command_ready: tokio::sync::Notify,
}

impl LinkState {
    /// Whether the link ended because the device was revoked (else: superseded).
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Queues a command for the link; false when its queue is full.
    fn queue_command(&self, command: Command) -> bool {
        let mut queue = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() >= COMMAND_QUEUE {
            return false;
        }
        queue.push_back(Box::new(command));
        drop(queue);
        self.command_ready.notify_one();
        true
    }

    /// The oldest command queued for the link.
    pub fn next_command(&self) -> Option<Box<Command>> {
        let mut queue = self.commands.lock().unwrap_or_else(|e| e.into_inner());
        let command = queue.pop_front();
        if queue.is_empty() && queue.capacity() > 0 {
            *queue = Default::default(); // an idle link keeps no buffer
        }
        command
    }
}

struct Entry {
    conn: u64,
    info: LinkInfo,
    state: Arc<LinkState>,
    ended: CancellationToken,
}

/// Device id to current link.
#[derive(Default)]
pub struct Registry {
    next_conn: AtomicU64,
    sessions: Mutex<HashMap<Arc<str>, Entry>>,
    /// Devices that may have commands waiting in the store: those with open commands at
    /// start, and every device a command was submitted for since. Only these look for
    /// waiting commands when they connect, so a fleet that is never sent commands costs no
    /// query per connection (and no memory for one during a reconnect storm).
    commanded: Mutex<std::collections::HashSet<Arc<str>>>,
}

/// A link's place in the registry.
pub struct Registration {
    /// Identifies this link among the device's links.
    pub conn: u64,
    /// Cancelled when a newer link of the same device registers, or when an operator
    /// revokes the device (then [`LinkState::revoked`] says so).
    pub ended: CancellationToken,
    /// The link stores the time of each message it receives here.
    pub state: Arc<LinkState>,
}

impl Registry {
    /// Makes this link the device's current one, superseding any older link.
    pub fn register(&self, device: &Arc<str>, info: LinkInfo) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let ended = CancellationToken::new();
        let state = Arc::new(LinkState {
            last_seen_ms: AtomicI64::new(info.connected_ms),
            ..LinkState::default()
        });
        let old = self.lock().insert(
            device.clone(),
            Entry {
                conn,
                info,
                state: state.clone(),
                ended: ended.clone(),
            },
        );
        if let Some(old) = old {
            old.ended.cancel();
        }
        Registration { conn, ended, state }
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

    /// Closes the device's current link with `DEVICE_REVOKED`; false if it has none.
    pub fn revoke(&self, device: &str) -> bool {
        self.lock().get(device).is_some_and(|e| {
            e.state.revoked.store(true, Ordering::Release);
            e.ended.cancel();
            true
        })
    }

    /// Hands a command to the device's current link; false if it has none or its queue is
    /// full (the command then waits in the store for the next connection).
    pub fn send_command(&self, device: &str, command: Command) -> bool {
        self.lock()
            .get(device)
            .is_some_and(|e| e.state.queue_command(command))
    }

    /// Devices with a link now, and the link kind.
    pub fn online(&self) -> Vec<(Arc<str>, &'static str)> {
        self.lock()
            .iter()
            .map(|(d, e)| (d.clone(), e.info.link))
            .collect()
    }

    /// The device's current link, if it has one.
    pub fn get(&self, device: &str) -> Option<Online> {
        self.lock().get(device).map(|e| Online {
            info: e.info.clone(),
            last_seen_ms: e.state.last_seen_ms.load(Ordering::Relaxed),
            report_interval_ms: e.state.pace.interval_ms(),
        })
    }

    /// Every current link's shared state (for the pacer).
    pub fn pace_states(&self) -> Vec<Arc<LinkState>> {
        self.lock().values().map(|e| e.state.clone()).collect()
    }

    /// How many devices have a link now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no device has a link.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many devices have a link now, by link kind.
    pub fn count_by_link(&self) -> HashMap<&'static str, usize> {
        let mut counts = HashMap::new();
        for e in self.lock().values() {
            *counts.entry(e.info.link).or_default() += 1;
        }
        counts
    }

    /// Notes that `device` may have a command waiting in the store; called before the
    /// command is stored, so a link registering after [`Registry::send_command`] missed it
    /// looks for it.
    pub fn expect_commands(&self, device: &str) {
        let mut commanded = self.commanded.lock().unwrap_or_else(|e| e.into_inner());
        if !commanded.contains(device) {
            commanded.insert(Arc::from(device));
        }
    }

    /// Whether `device` may have commands waiting in the store.
    pub fn may_have_commands(&self, device: &str) -> bool {
        self.commanded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(device)
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

    fn info(link: &'static str) -> LinkInfo {
        LinkInfo {
            link,
            peer: Arc::from("127.0.0.1:1"),
            firmware_version: "1.0".into(),
            epoch: 1,
            connected_ms: 5,
        }
    }

    #[test]
    fn the_newest_link_supersedes_the_older_one() {
        let registry = Registry::default();
        let dev: Arc<str> = Arc::from("meter-1");
        let first = registry.register(&dev, info("tcp"));
        let second = registry.register(&dev, info("tcp"));
        assert!(first.ended.is_cancelled() && !first.state.revoked());
        assert!(!second.ended.is_cancelled());
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
        let first = registry.register(&dev, info("tcp"));
        let second = registry.register(&dev, info("serial"));
        let cmd = Command {
            id: "c1".into(),
            ..Default::default()
        };
        assert!(registry.send_command("meter-1", cmd.clone()));
        assert!(!registry.send_command("nobody", cmd));
        assert_eq!(
            second.state.next_command().map(|c| c.id).as_deref(),
            Some("c1")
        );
        assert!(second.state.next_command().is_none());
        assert!(first.state.next_command().is_none());
        for i in 0..COMMAND_QUEUE {
            assert!(registry.send_command(
                "meter-1",
                Command {
                    id: format!("q{i}"),
                    ..Default::default()
                }
            ));
        }
        assert!(
            !registry.send_command("meter-1", Command::default()),
            "a full queue refuses: the command waits in the store"
        );
        assert_eq!(registry.online(), vec![(dev, "serial")]);
    }

    #[test]
    fn revoking_cancels_the_current_link_and_shows_its_last_message_time() {
        let registry = Registry::default();
        let dev: Arc<str> = Arc::from("meter-1");
        let reg = registry.register(&dev, info("tls"));
        reg.state.last_seen_ms.store(42, Ordering::Relaxed);
        let online = registry.get("meter-1").expect("online");
        assert_eq!((online.info.link, online.last_seen_ms), ("tls", 42));
        assert!(!registry.revoke("nobody"));
        assert!(registry.revoke("meter-1"));
        assert!(reg.ended.is_cancelled());
        assert!(reg.state.revoked());
        assert_eq!(registry.count_by_link().get("tls"), Some(&1));
    }
}
