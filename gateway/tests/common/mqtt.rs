//! Real MQTT brokers for tests, as child processes that can be stopped and restarted on the
//! same port: the gateway's embedded broker (`gateway broker`) and Debian's Mosquitto. And a
//! subscriber that records everything and reconnects at once after an outage.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::process::{Child, Command};

use super::free_port;

/// Which broker a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// rumqttd inside `gateway broker`.
    Embedded,
    /// Debian's `mosquitto`.
    Mosquitto,
}

/// A broker process on 127.0.0.1.
pub struct TestBroker {
    pub kind: BrokerKind,
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

fn mosquitto_path() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Whether Mosquitto is installed; without it a test skips (saying so), unless `CI` is set:
/// then a missing Mosquitto fails the test.
pub fn mosquitto_or_skip(what: &str) -> bool {
    if mosquitto_path().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "mosquitto is not installed, and CI is set: install Debian's `mosquitto` (.ci/run does)"
    );
    eprintln!("SKIPPED {what}: mosquitto is not installed (apt-get install mosquitto)");
    false
}

impl TestBroker {
    /// Starts a broker of `kind` on a free port. `None` (with a note) when Mosquitto is not
    /// installed, unless `CI` is set: then a missing Mosquitto fails the test.
    pub async fn start(kind: BrokerKind) -> Option<Self> {
        if kind == BrokerKind::Mosquitto && mosquitto_path().is_none() {
            if std::env::var_os("CI").is_some() {
                panic!("mosquitto is not installed, and CI is set: install Debian's `mosquitto` (.ci/run does)");
            }
            eprintln!(
                "SKIPPED against Mosquitto: mosquitto is not installed (apt-get install mosquitto)"
            );
            return None;
        }
        let mut broker = Self {
            kind,
            port: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        broker.restart().await;
        Some(broker)
    }

    /// The URL a gateway bridges to.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the process on the same port and waits until it accepts connections.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let mut cmd = match self.kind {
            BrokerKind::Embedded => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_gateway"));
                c.args(["broker", "--listen", &format!("127.0.0.1:{}", self.port)]);
                c
            }
            BrokerKind::Mosquitto => {
                let conf = self.dir.path().join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n",
                        self.port
                    ),
                )
                .expect("write mosquitto.conf");
                let mut c = Command::new(mosquitto_path().expect("mosquitto"));
                c.arg("-c").arg(conf);
                c
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start broker");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{:?} broker did not listen on {addr}", self.kind);
    }

    /// Stops the process (SIGTERM) and waits for it.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("broker running");
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

/// Everything a subscriber received: (topic, payload).
pub type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A subscriber that records every message, reconnecting every 20 ms while the broker is
/// away and subscribing again on every ConnAck.
pub struct Subscriber {
    pub client: AsyncClient,
    pub received: Received,
    /// SubAcks so far: one per (re)subscription.
    pub subacks: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects to the broker on `port`, subscribes to `filter`, and waits for the SubAck.
    pub async fn start(port: u16, filter: &str) -> Self {
        let mut options = MqttOptions::new(format!("test-sub-{}", free_port()), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        let received: Received = Arc::default();
        let subacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = {
            let client = client.clone();
            let received = received.clone();
            let subacks = subacks.clone();
            let filter = filter.to_owned();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if let Some(tx) = ready_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            received
                                .lock()
                                .unwrap()
                                .push((p.topic.clone(), p.payload.to_vec()));
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("subscribed within 10 s")
            .expect("subscriber task alive");
        Self {
            client,
            received,
            subacks,
            task,
        }
    }

    /// Waits until the subscriber has subscribed `n` times in all (after a broker restart).
    pub async fn wait_subscribed(&self, n: usize) {
        for _ in 0..1000 {
            if self.subacks.load(std::sync::atomic::Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the subscriber did not resubscribe within 10 s");
    }

    /// A copy of what arrived so far.
    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what arrived, up to `limit`; returns the messages.
    pub async fn wait_until(
        &self,
        limit: Duration,
        mut done: impl FnMut(&[(String, Vec<u8>)]) -> bool,
    ) -> Vec<(String, Vec<u8>)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let messages = self.messages();
            if done(&messages) || tokio::time::Instant::now() > deadline {
                return messages;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}
