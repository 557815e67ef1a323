//! The `firmware-sim` command line end to end, against the workspace's `gateway` binary:
//! a scenario with every output (--verify-db, --labels, --record, --json), its recording
//! replayed into a second gateway, and the errors a user gets for bad input.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const SIM: &str = env!("CARGO_BIN_EXE_firmware-sim");

/// The gateway binary cargo built next to this one (`cargo test --workspace` builds it).
fn gateway_bin() -> PathBuf {
    let bin = Path::new(SIM).with_file_name("gateway");
    assert!(
        bin.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace)",
        bin.display()
    );
    bin
}

/// `gateway run` on a free port with its store in `dir`; killed on drop.
struct Gateway {
    child: Child,
    addr: String,
    db: PathBuf,
}

impl Gateway {
    fn start(dir: &Path) -> Self {
        let db = dir.join("gateway.db");
        let mut child = Command::new(gateway_bin())
            .args([
                "run",
                "--listen",
                "127.0.0.1:0",
                "--no-mqtt",
                "--no-http",
                "--fleet-secret",
                "s",
                "--db",
            ])
            .arg(&db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway");
        let stdout = child.stdout.take().expect("stdout");
        let addr = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("devices: listening on tcp://")
                    .map(str::to_owned)
            })
            .expect("the gateway says where it listens");
        Self { child, addr, db }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sim(args: &[&str]) -> Output {
    Command::new(SIM)
        .args(args)
        .output()
        .expect("run firmware-sim")
}

fn scenario(name: &str) -> String {
    format!("{}/scenarios/{name}.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn a_scenario_run_writes_labels_and_a_recording_that_replays() {
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(dir.path());
    let labels = dir.path().join("labels.jsonl");
    let record = dir.path().join("run.jsonl");
    let out = sim(&[
        "scenario",
        &scenario("anomalies"),
        "--gateway",
        &gw.addr,
        "--fleet-secret",
        "s",
        "--verify-db",
        gw.db.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verify_db"]["frames_missing"], 0);
    assert_eq!(report["verify_db"]["frames_duplicated"], 0);
    assert_eq!(
        report["verify_db"]["frames_checked"],
        report["frames_acked"]
    );
    // The scenario's seed picks the same devices every time.
    assert_eq!(report["anomalies"], 46);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&labels)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 46);
    assert!(lines
        .iter()
        .all(|l| l["from_ms"].as_u64() <= l["to_ms"].as_u64()));

    // The gateway's detector against those labels, through `score`.
    let out = sim(&[
        "score",
        "--labels",
        labels.to_str().unwrap(),
        "--db",
        gw.db.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let score: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(score["overall"]["labels"], 46);
    for kind in ["spike", "drift", "stuck", "dropout"] {
        let f1 = score["kinds"][kind]["f1"].as_f64().unwrap();
        assert!(f1 >= 0.9, "{kind}: {score}");
    }
    let table = sim(&[
        "score",
        "--labels",
        labels.to_str().unwrap(),
        "--db",
        gw.db.to_str().unwrap(),
    ]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("precision") && table.contains("false positives per device-hour"),
        "{table}"
    );

    let replica_dir = tempfile::tempdir().unwrap();
    let replica = Gateway::start(replica_dir.path());
    let out = sim(&[
        "replay",
        record.to_str().unwrap(),
        "--gateway",
        &replica.addr,
        "--speed",
        "10",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(replayed["connections"], 18);
    assert_eq!(replayed["hello_acks"], 18);
    assert_eq!(replayed["errors"], serde_json::json!({}));
}

#[test]
fn bad_input_gets_a_clear_error_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"x\"\nduration = \"1s\"\n[[profile]]\nname = \"p\"\ncount = 1\nrate = 1.0\n[[profile.sensor]]\nname = \"t\"\nwaveform = { kind = \"constant\", value = 1.0 }\n[[fault]]\nkind = \"burst\"\nat = \"1s\"\n",
    )
    .unwrap();
    let out = sim(&["scenario", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fault 1 (burst): needs `frames`"), "{err}");

    let out = sim(&["replay", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1 is not a recording header"), "{err}");

    let out = sim(&[
        "scenario",
        &scenario("broker-outage"),
        "--gateway",
        "127.0.0.1:9",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--broker-gate"), "{err}");

    let out = sim(&["run", "--tls-ca", bad.to_str().unwrap(), "--duration", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CA file") && err.contains("bad.toml: no certificates"),
        "{err}"
    );

    // score: a labels file that is not labels, and a store that is not there.
    let out = sim(&["score", "--labels", bad.to_str().unwrap(), "--db", "x.db"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml line 1"), "{err}");
    let labels = dir.path().join("labels.jsonl");
    std::fs::write(&labels, "").unwrap();
    let missing = dir.path().join("missing.db");
    let out = sim(&[
        "score",
        "--labels",
        labels.to_str().unwrap(),
        "--db",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.db"), "{err}");
}
