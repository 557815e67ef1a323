//! A TCP relay that can be shut: between a gateway and its MQTT broker it plays a network
//! outage on cue (`broker-outage` faults, and tests that sequence a reconnection). Closed, it
//! cuts every relayed connection and refuses new ones; open, it relays bytes both ways.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A relay from a local port to `upstream`, open or closed.
pub struct Gate {
    addr: std::net::SocketAddr,
    open: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Gate {
    /// Listens on `listen` and relays to `upstream` (`HOST:PORT`) while open.
    pub async fn start(listen: &str, upstream: &str, open: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let is_open = Arc::new(AtomicBool::new(open));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let task = {
            let is_open = is_open.clone();
            let links = links.clone();
            let upstream = upstream.to_owned();
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        // Out of descriptors or similar: try again shortly.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    };
                    if !is_open.load(Ordering::SeqCst) {
                        continue; // dropped: the peer sees the connection close
                    }
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let mut links = links.lock().unwrap_or_else(|e| e.into_inner());
                    links.retain(|l| !l.is_finished());
                    links.push(tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }));
                }
            })
        };
        Ok(Self {
            addr,
            open: is_open,
            links,
            task,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// The URL an MQTT client uses to reach the broker through the gate.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// Cuts every link and refuses new ones.
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        for link in self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            link.abort();
        }
    }

    /// Lets connections through again.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.close();
        self.task.abort();
    }
}
