//! The processes a bench drives: the real `gateway` binary (its address, CPU seconds and
//! memory from `/proc`), Mosquitto, and `gateway bench-store` for the SQLite ceiling.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The API token bench gateways are started with.
pub const API_TOKEN: &str = "bench-api-token-0123456789";

/// A running `gateway run`.
pub struct Gateway {
    child: Child,
    pid: u32,
    /// Its device listener.
    pub addr: SocketAddr,
    /// Its HTTP API (token [`API_TOKEN`]).
    pub http: Option<SocketAddr>,
    /// From spawn to its "listening" line.
    pub startup: Duration,
}

/// `/proc/PID/stat` utime + stime, in seconds (USER_HZ is 100 on Linux).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// A `/proc/PID/status` field in KiB (`VmHWM` peak, `VmRSS` now).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

impl Gateway {
    /// Starts `bin run` with its store in `dir` and `args`, pacing off (the benches measure
    /// capacity: devices that slow down when asked would measure the pacing instead); waits
    /// until it listens.
    pub async fn start(bin: &Path, dir: &Path, args: &[String]) -> anyhow::Result<Self> {
        let mut all = vec!["--no-pacing".to_owned()];
        all.extend_from_slice(args);
        Self::start_paced(bin, dir, &all).await
    }

    /// [`Gateway::start`] with the gateway's own pacing (its defaults).
    pub async fn start_paced(bin: &Path, dir: &Path, args: &[String]) -> anyhow::Result<Self> {
        let base = [
            "--listen",
            "127.0.0.1:0",
            "--auth",
            "none",
            "--gateway-id",
            "bench",
        ];
        Self::launch(bin, dir, &base, args).await
    }

    /// Starts `bin run` with `base` (which must give `--listen`, `--auth` and
    /// `--gateway-id`), its store and log in `dir`, the HTTP API on a free port, then
    /// `args`; waits until it listens.
    pub async fn launch(
        bin: &Path,
        dir: &Path,
        base: &[&str],
        args: &[String],
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("gateway.log"))
            .context("gateway log file")?;
        let started = Instant::now();
        let mut child = Command::new(bin)
            .arg("run")
            .args(base)
            .args([
                // The HTTP API is on by default, so it is on here too (with nobody using it
                // unless the bench says so).
                "--http",
                "127.0.0.1:0",
                "--api-token",
                API_TOKEN,
                "--data-dir",
            ])
            .arg(dir)
            .arg("--db")
            .arg(dir.join("gateway.db"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("gateway pid")?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (addr, http) = tokio::time::timeout(Duration::from_secs(60), async {
            let mut http = None;
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line.strip_prefix("http: listening on http://") {
                    http = Some(a.parse::<SocketAddr>()?);
                }
                if let Some(addr) = line.strip_prefix("devices: listening on tcp://") {
                    return Ok::<_, anyhow::Error>((addr.parse::<SocketAddr>()?, http));
                }
            }
            bail!(
                "the gateway exited before listening; see {}",
                dir.join("gateway.log").display()
            )
        })
        .await
        .context("the gateway did not listen within 60 s")??;
        let startup = started.elapsed();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            pid,
            addr,
            http,
            startup,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether it has exited by itself, and how.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, as a crash or a power cut would end it, and reap it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM and wait (bounded).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("the gateway exited with {status}");
                }
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the gateway did not stop within 30 s of SIGTERM")
            }
        }
    }
}

/// `gateway bench-store` on a fresh file: the insert ceiling in rows/s.
pub async fn store_ceiling(
    bin: &Path,
    db: &Path,
    devices: usize,
    readings: usize,
    frames: u64,
) -> anyhow::Result<f64> {
    let out = Command::new(bin)
        .args(["bench-store", "--db"])
        .arg(db)
        .args([
            "--devices",
            &devices.to_string(),
            "--readings",
            &readings.to_string(),
            "--frames",
            &frames.to_string(),
            "--batch-frames",
            "2048",
        ])
        .output()
        .await
        .context("running gateway bench-store")?;
    if !out.status.success() {
        bail!(
            "gateway bench-store failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bench-store output")?;
    v["rows_per_s"]
        .as_f64()
        .context("bench-store gave no rows_per_s")
}

/// A Mosquitto process on 127.0.0.1.
pub struct Mosquitto {
    child: Child,
    /// Its port.
    pub port: u16,
}

fn mosquitto_bin() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl Mosquitto {
    /// Starts Mosquitto on `port` with its config in `dir`.
    pub async fn start(dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with(dir, port, false).await
    }

    /// [`Mosquitto::start`]; with `persistent`, it keeps its sessions and their queued
    /// messages in `dir` across a stop ([`Mosquitto::stop_gracefully`]) and a start, as a
    /// broker of a site would.
    pub async fn start_with(dir: &Path, port: u16, persistent: bool) -> anyhow::Result<Self> {
        let bin =
            mosquitto_bin().context("mosquitto is not installed (apt-get install mosquitto)")?;
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let persistence = if persistent {
            // Started as root, Mosquitto switches to its own user unless told not to, and
            // could then not write its sessions into `dir`.
            let user = if nix::unistd::Uid::effective().is_root() {
                "user root\n"
            } else {
                ""
            };
            format!(
                "persistence true\npersistence_location {}/\npersistence_file mosquitto-{port}.db\n{user}",
                dir.display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}max_queued_messages 1000000\nmax_inflight_messages 1000\n"),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting mosquitto")?;
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Self { child, port });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("mosquitto did not listen on port {port}")
    }

    /// Stops it.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM (a persistent broker saves its sessions) and wait, at most 10 s.
    pub async fn stop_gracefully(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A free port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
