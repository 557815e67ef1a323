//! The `gateway` binary's own commands: device administration, config errors, and opening
//! one store from several processes at once.

use std::process::Command;

fn gateway(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run gateway")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn devices_add_list_and_revoke_work_on_the_store_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let db = db.to_str().unwrap();

    let out = gateway(&["devices", "--db", db, "add", "boiler-1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim().to_owned();
    assert_eq!(token.len(), 48, "a 24-byte hex token: {token:?}");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()));

    let again = gateway(&["devices", "--db", db, "add", "boiler-1"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("--force"),
        "{}",
        text(&again.stderr)
    );

    let list = gateway(&["devices", "--db", db, "list"]);
    assert!(
        text(&list.stdout).contains("boiler-1"),
        "{}",
        text(&list.stdout)
    );

    assert!(gateway(&["devices", "--db", db, "revoke", "boiler-1"])
        .status
        .success());
    let unknown = gateway(&["devices", "--db", db, "revoke", "nobody"]);
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("nobody"));

    // A revoked device may be provisioned again with a new token.
    let readd = gateway(&["devices", "--db", db, "add", "boiler-1"]);
    assert!(readd.status.success(), "{}", text(&readd.stderr));
    assert_ne!(text(&readd.stdout).trim(), token);

    let bad = gateway(&["devices", "--db", db, "add", "bad\nid"]);
    assert!(!bad.status.success());
}

#[test]
fn a_broken_config_file_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "[store]\nbatch_max_frames = \"lots\"\n").unwrap();
    let out = gateway(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("batch_max_frames") && err.contains("gateway.toml"),
        "{err}"
    );

    let missing = gateway(&["run", "--config", "/nonexistent/gateway.toml"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("/nonexistent/gateway.toml"));

    // `run` is the default command, options included.
    let bare = gateway(&["--config", "/nonexistent/gateway.toml"]);
    assert_eq!(bare.status.code(), Some(1));
    assert!(text(&bare.stderr).contains("/nonexistent/gateway.toml"));
}

#[test]
fn check_config_names_the_field_or_file_and_starts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = dir.path().join("gateway.toml");
    let check = |toml: &str| {
        std::fs::write(&path, toml).unwrap();
        gateway(&["check-config", path.to_str().unwrap()])
    };

    // The shipped example is valid as it stands.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../gateway.example.toml");
    let out = gateway(&["check-config", example]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("config OK"),
        "{}",
        text(&out.stdout)
    );

    let good = format!("data_dir = {:?}\n", data.to_str().unwrap());
    let out = check(&good);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Missing secret files are created by the gateway: a note, not an error, and nothing
    // is created by the check itself.
    assert!(
        text(&out.stdout).contains("fleet.secret"),
        "{}",
        text(&out.stdout)
    );
    assert!(!data.exists(), "check-config created the data directory");

    let out = check(&format!("{good}[store]\nqueue_readings = 3\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("store.queue_readings"),
        "{}",
        text(&out.stderr)
    );

    let out = check(&format!("{good}[tcp]\nlisten = \"nowhere\"\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("listen"),
        "{}",
        text(&out.stderr)
    );

    let out = check(&format!(
        "{good}[tcp.tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n"
    ));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("tcp.tls") && err.contains("/nonexistent/cert.pem"),
        "{err}"
    );

    let garbage = dir.path().join("ca.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let out = check(&format!(
        "{good}[mqtt]\nurl = \"mqtts://broker.example:8883\"\nca_file = {:?}\n",
        garbage.to_str().unwrap()
    ));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("mqtt.ca_file") && err.contains("ca.pem"),
        "{err}"
    );

    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("api.token"), "\n").unwrap();
    let out = check(&good);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("http.token_file") && err.contains("api.token"),
        "{err}"
    );

    // --config works as well as the positional file.
    let out = gateway(&["check-config", "--config", "/nonexistent/gateway.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/gateway.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_opening_a_fresh_store_at_once_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fresh.db");
    let opens = (0..6).map(|i| {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_gateway"))
                .args([
                    "devices",
                    "--db",
                    db.to_str().unwrap(),
                    "add",
                    &format!("d{i}"),
                ])
                .output()
                .expect("run gateway")
        })
    });
    for out in futures::future::join_all(opens).await {
        let out = out.unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
}

/// `gateway run` on `db`: its exit code and stderr, or a failure if it is still running
/// after 30 s (it should have refused the store at once).
fn run_on(db: &std::path::Path) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["run", "--no-mqtt", "--no-http", "--auth", "none"])
        .args(["--listen", "127.0.0.1:0", "--db"])
        .arg(db)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run gateway");
    for _ in 0..300 {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut err)
                .expect("read stderr");
            return (status.code(), err);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the gateway kept running on {}", db.display());
}

/// A store made by the gateway itself (`devices add`), in `dir`.
fn seeded_store(dir: &std::path::Path) -> std::path::PathBuf {
    let db = dir.join("g.db");
    let out = gateway(&["devices", "--db", db.to_str().unwrap(), "add", "seed"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    db
}

#[test]
fn a_damaged_store_stops_the_gateway_naming_the_file_and_is_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let db = seeded_store(dir.path());
    // Enough rows for a table of many pages, then a page in its middle overwritten.
    let mut conn = rusqlite::Connection::open(&db).unwrap();
    let tx = conn.transaction().unwrap();
    for i in 0..5000 {
        tx.execute(
            "INSERT INTO devices (device_id, created_at_ms) VALUES (?1, 0)",
            [format!("device-with-a-longish-name-{i:05}")],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    drop(conn);
    let mut bytes = std::fs::read(&db).unwrap();
    let page = 4096;
    let at = (pages as usize - 3) * page;
    bytes[at..at + page].fill(0xa5);
    std::fs::write(&db, &bytes).unwrap();

    let (code, err) = run_on(&db);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("damaged") && err.contains(db.to_str().unwrap()) && err.contains(".recover"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&db).unwrap(),
        bytes,
        "the damaged file was written to"
    );

    // Not a database at all: the same, and not recreated.
    let junk = dir.path().join("junk.db");
    let garbage =
        b"this is not an SQLite file, but it is long enough to have a header.....".repeat(80);
    std::fs::write(&junk, &garbage).unwrap();
    let (code, err) = run_on(&junk);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("damaged") && err.contains("junk.db"), "{err}");
    assert_eq!(std::fs::read(&junk).unwrap(), garbage);
}

#[test]
fn a_store_from_a_newer_gateway_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = seeded_store(dir.path());
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (29991231000000, 'from the future', 1, x'00', 0)",
        [],
    )
    .unwrap();
    drop(conn);
    let (code, err) = run_on(&db);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(db.to_str().unwrap()) && err.contains("newer gateway"),
        "{err}"
    );
}
