//! A power cut with `store.durability = "power-loss"`: the gateway runs on an ext4 file
//! system on a loop device; mid-load it is SIGKILLed and, at that instant, the loop device's
//! backing file is copied. The copy holds only what the file system had written to its
//! "disk" (what was fsynced, plus whatever writeback had happened): everything still in the
//! page cache is lost, as in a power cut. The copy is then mounted (ext4 replays its journal)
//! and every reading acknowledged to a device must be in it.
//!
//! Needs root, `mkfs.ext4` and loop devices; the test says so and skips where the machine
//! does not allow it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{fleet, GatewayProcess};

/// A file system image attached to a loop device and mounted; detached when dropped.
struct Mounted {
    dev: String,
    dir: PathBuf,
}

impl Mounted {
    fn attach(image: &Path, dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let mounted = Command::new("mount")
            .arg(&dev)
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
            return Err(format!("mounting {dev} failed"));
        }
        Ok(Self {
            dev,
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

fn make_fs(image: &Path) -> Result<(), String> {
    let file = std::fs::File::create(image).map_err(|e| e.to_string())?;
    file.set_len(128 * 1024 * 1024).map_err(|e| e.to_string())?;
    let ok = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(image)
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(()).ok_or_else(|| "mkfs.ext4 failed".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acked_reading_survives_a_power_cut_with_power_loss_durability() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let live =
        match make_fs(&image).and_then(|()| Mounted::attach(&image, &dir.path().join("live"))) {
            Ok(m) => m,
            Err(e) => {
                println!(
                "skipped: no loop-mounted ext4 here ({e}); needs root, mkfs.ext4 and loop devices"
            );
                return;
            }
        };
    println!(
        "store on ext4 on {}; the cut: SIGKILL, then a copy of the backing file",
        live.dev
    );
    let conf = dir.path().join("gateway.toml");
    std::fs::write(&conf, "[store]\ndurability = \"power-loss\"\n").unwrap();
    let db = live.dir.join("g.db");
    let log = dir.path().join("gateway.log");
    let gw = GatewayProcess::start(
        &db,
        "127.0.0.1:0",
        &log,
        &["--no-mqtt", "--config", conf.to_str().unwrap()],
    )
    .await;

    let fleet_task = tokio::spawn(firmware_sim::run_fleet(firmware_sim::FleetConfig {
        devices: 20,
        rate: 50.0,
        readings: 4,
        duration: Duration::from_secs(5),
        drain: Duration::from_secs(1),
        ..fleet(gw.addr)
    }));
    tokio::time::sleep(Duration::from_secs(3)).await;
    gw.kill().await;
    // The power cut: what the file system had written to its disk, nothing more.
    let cut = dir.path().join("cut.img");
    std::fs::copy(&image, &cut).unwrap();
    let report = fleet_task.await.unwrap();
    drop(live);
    assert!(report.frames_acked > 100, "{}", report.to_table());

    let after = Mounted::attach(&cut, &dir.path().join("after")).expect("mount the cut image");
    let mut conn = common::open_db(&after.dir.join("g.db")).await;
    let mut missing = Vec::new();
    for o in &report.outcomes {
        let stored: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT seq, COUNT(*) FROM telemetry WHERE device_id = ? AND epoch = ? AND seq <= ? GROUP BY seq",
        )
        .bind(&o.device_id)
        .bind(o.epoch as i64)
        .bind(o.last_acked_seq as i64)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let whole = stored
            .iter()
            .filter(|(seq, rows)| *rows as u64 == o.readings_of(*seq as u64))
            .count() as u64;
        if whole != o.frames_acked {
            missing.push((o.device_id.clone(), o.frames_acked, whole));
        }
    }
    assert!(
        missing.is_empty(),
        "acked frames lost in the power cut (device, acked, stored whole): {missing:?}"
    );
    sqlx::Connection::close(conn).await.unwrap();
    drop(after);
}
