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
