//! The chaos soak, short: one minute of the real gateway binary being SIGKILLed and
//! restarted, Mosquitto stopped and started, half the fleet dropping, garbage, wrong tokens,
//! slow readers, a flooding device and strangers, and then every acknowledged reading must
//! be in the store exactly once and published at least once. The 30-minute run is on demand
//! (`firmware-sim chaos --duration 30m`, figures in BENCHMARKS.md).

mod common;

use std::time::Duration;

use firmware_sim::chaos::{self, ChaosOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_chaos_loses_nothing_stores_nothing_twice_and_publishes_everything() {
    if !common::mqtt::mosquitto_or_skip("the chaos soak") {
        return;
    }
    let options = ChaosOptions {
        gateway_bin: env!("CARGO_BIN_EXE_gateway").into(),
        duration: Duration::from_secs(60),
        devices: 20,
        rate: 5.0,
        readings: 8,
        kill_every: Duration::from_secs(8),
        broker_every: Duration::from_secs(20),
        device_fault_every: Duration::from_secs(2),
        stranger_every: Duration::from_secs(2),
        // The schedule is drawn from the seed, so every kind of fault below is in it.
        seed: Some(16),
        dir: None,
    };
    let report = chaos::run(&options).await.expect("the chaos run completes");
    eprintln!("{}", report.to_table());

    for kind in [
        "gateway SIGKILL + restart",
        "broker stop + start",
        "storm (half the fleet drops)",
        "garbage frame",
        "oversize frame",
        "wrong token",
        "slow reader",
        "flood (one device)",
        "stranger sending garbage",
        "stranger guessing a token",
    ] {
        assert!(
            report.faults.get(kind).copied().unwrap_or(0) > 0,
            "{kind} was injected: {:?}",
            report.faults
        );
    }
    assert!(report.faults["gateway SIGKILL + restart"] >= 3);

    // What a user relies on: nothing acked is lost, nothing is stored twice, everything
    // acked reached the broker, and the fleet got through.
    assert!(report.fleet.frames_acked > 1000, "{}", report.to_table());
    assert_eq!(report.store.frames_checked, report.fleet.frames_acked);
    assert_eq!(
        report.store.frames_missing, 0,
        "{:?}",
        report.store.examples
    );
    assert_eq!(
        report.store.frames_duplicated, 0,
        "{:?}",
        report.store.examples
    );
    assert_eq!(report.mqtt.frames_missing, 0, "{:?}", report.mqtt.examples);
    assert_eq!(report.fleet.unacked_frames, 0);
    assert_eq!(report.fleet.devices_refused, 0);
    assert_eq!(report.gateway_exits, 0, "the gateway never exits by itself");
    assert!(report.clean_stop, "SIGTERM at the end stops it cleanly");

    // Bad input got coded errors, costing only its sender.
    for code in [
        "ERROR_CODE_MALFORMED_MESSAGE",
        "ERROR_CODE_FRAME_TOO_LARGE",
        "ERROR_CODE_AUTH_FAILED",
    ] {
        assert!(
            report.fleet.errors.get(code).copied().unwrap_or(0) > 0,
            "the fleet's faulty devices were answered {code}: {:?}",
            report.fleet.errors
        );
    }
    assert!(
        report
            .strangers
            .keys()
            .any(|k| k == "ERROR_CODE_AUTH_FAILED"),
        "a stranger guessing a token is refused: {:?}",
        report.strangers
    );
    assert!(
        !report.strangers.contains_key("accepted (!)"),
        "{:?}",
        report.strangers
    );
    assert!(report.is_clean());
}
