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
