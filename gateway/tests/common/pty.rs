//! Linked pseudo-terminal pairs from socat, for serial tests. With `CI` set a missing socat
//! fails; otherwise the tests that need it skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A pair of linked ptys: the gateway opens `gw`, the simulated device `dev`.
pub struct PtyPair {
    child: Option<tokio::process::Child>,
    pub gw: PathBuf,
    pub dev: PathBuf,
}

pub fn socat() -> Option<&'static str> {
    ["/usr/bin/socat", "/usr/local/bin/socat"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

impl PtyPair {
    /// Links `dir/gw` and `dir/dev`; `None` (skip) when socat is missing outside CI.
    pub async fn start(dir: &Path) -> Option<Self> {
        Self::named(dir, "gw", "dev").await
    }

    /// Links `dir/<gw>` and `dir/<dev>`.
    pub async fn named(dir: &Path, gw: &str, dev: &str) -> Option<Self> {
        if socat().is_none() {
            assert!(
                std::env::var_os("CI").is_none(),
                "socat is not installed, and CI is set (.ci/run installs it)"
            );
            eprintln!("SKIPPED: socat is not installed (apt-get install socat)");
            return None;
        }
        let mut pair = Self {
            child: None,
            gw: dir.join(gw),
            dev: dir.join(dev),
        };
        pair.restart().await;
        Some(pair)
    }

    pub async fn restart(&mut self) {
        let link = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
        let child = tokio::process::Command::new(socat().unwrap())
            .args([link(&self.gw), link(&self.dev)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start socat");
        self.child = Some(child);
        for _ in 0..500 {
            if self.gw.exists() && self.dev.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("socat did not create the ptys");
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
        for _ in 0..500 {
            if !self.gw.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
