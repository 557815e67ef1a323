//! `firmware-sim`: plays fleets of devices against a gateway and reports what it
//! acknowledged. Exits non-zero when anything is still unacknowledged after the drain period.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use firmware_sim::{run_fleet, FleetConfig};

#[derive(Parser)]
#[command(
    name = "firmware-sim",
    version,
    about = "Simulated device fleets for the gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a fleet of identical devices over TCP.
    Run(RunArgs),
    /// Measure the gateway against this machine's own limits (see BENCHMARKS.md).
    Bench(BenchArgs),
    /// Run a scenario file (profiles of devices with sensor waveforms) against a gateway.
    Scenario(ScenarioArgs),
}

#[derive(clap::Args)]
struct ScenarioArgs {
    /// The scenario file (TOML; see firmware-sim/scenarios/).
    file: std::path::PathBuf,
    /// The gateway's device listener.
    #[arg(long, default_value = "127.0.0.1:7700")]
    gateway: String,
    /// Seed: the same scenario and seed give the same bytes from every device.
    #[arg(long)]
    seed: Option<u64>,
    /// Fleet secret: each device's token is HMAC-SHA256(secret, device_id).
    #[arg(long, env = "GATEWAY_FLEET_SECRET", hide_env_values = true)]
    fleet_secret: Option<String>,
    /// A token every device presents.
    #[arg(long, conflicts_with = "fleet_secret")]
    token: Option<String>,
    /// After the run, check the gateway's SQLite file (every acked frame exactly once).
    #[arg(long, value_name = "PATH")]
    verify_db: Option<std::path::PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Scenarios to run (default: all): ingest, latency, uplink, replay, connections, cold-start.
    scenarios: Vec<String>,
    /// The gateway binary, built with --release.
    #[arg(long, default_value = "target/release/gateway")]
    gateway_bin: std::path::PathBuf,
    /// Seconds each load runs.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Devices in the ingest, latency, uplink and replay fleets.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Idle devices in `connections`.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Seconds of ingest with the broker down, in `replay`.
    #[arg(long, default_value_t = 60.0)]
    replay_outage: f64,
    /// Readings in the store for `cold-start`.
    #[arg(long, default_value_t = 10_000_000)]
    cold_start_readings: u64,
    /// Print one JSON object per scenario per line.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The gateway's device listener.
    #[arg(long, default_value = "127.0.0.1:7700")]
    gateway: String,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Frames per second per device (0: as fast as acks allow).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Readings per frame.
    #[arg(long, default_value_t = 8)]
    readings: usize,
    /// Seconds of producing frames.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for outstanding acks afterwards.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Most unacknowledged frames per device.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Fleet secret: each device's token is HMAC-SHA256(secret, device_id).
    #[arg(long, env = "GATEWAY_FLEET_SECRET", hide_env_values = true)]
    fleet_secret: Option<String>,
    /// A token every device presents (a provisioned device, or a gateway with --auth none).
    #[arg(long, conflicts_with = "fleet_secret")]
    token: Option<String>,
    /// Device id prefix (ids are PREFIX00000, PREFIX00001, ...).
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Epoch of every device (default: the start time in ms).
    #[arg(long)]
    epoch: Option<u64>,
    /// Milliseconds a device takes to answer a command.
    #[arg(long, default_value_t = 20)]
    command_delay_ms: u64,
    /// Share of commands answered with an error (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    command_failure_rate: f64,
    /// Never answer commands.
    #[arg(long)]
    ignore_commands: bool,
    /// Play one device on this serial port (COBS + CRC framing) instead of a TCP fleet.
    #[arg(long, value_name = "PATH")]
    serial: Option<std::path::PathBuf>,
    /// Serial speed.
    #[arg(long, default_value_t = 115_200)]
    baud: u32,
    /// Share of sent bytes to flip on the serial line (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Share of sent bytes to drop on the serial line (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    drop_bytes: f64,
    /// Seed: the same seed (and options) gives the same bytes from every device.
    #[arg(long)]
    seed: Option<u64>,
    /// After the run, check the gateway's SQLite file: every acknowledged frame stored
    /// exactly once (through the `telemetry` view). Exits non-zero on loss or duplicates.
    #[arg(long, value_name = "PATH")]
    verify_db: Option<std::path::PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

fn seconds(name: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| format!("--{name} must be a non-negative number of seconds"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Bench(args) => return bench(args),
        Command::Scenario(args) => return scenario(args),
    };
    let config = match (
        seconds("duration", args.duration),
        seconds("drain", args.drain),
    ) {
        (Ok(duration), Ok(drain))
            if args.rate >= 0.0
                && args.rate.is_finite()
                && (0.0..=1.0).contains(&args.command_failure_rate)
                && (0.0..=1.0).contains(&args.corrupt)
                && (0.0..=1.0).contains(&args.drop_bytes) =>
        {
            FleetConfig {
                gateway: args.gateway,
                devices: args.devices,
                rate: args.rate,
                readings: args.readings,
                duration,
                drain,
                window: args.window,
                fleet_secret: args.fleet_secret,
                token: args.token,
                prefix: args.prefix,
                epoch: args.epoch,
                serial: args.serial.map(|path| firmware_sim::serial::SerialTarget {
                    path,
                    baud: args.baud,
                    noise: firmware_sim::serial::Noise {
                        corrupt: args.corrupt,
                        drop: args.drop_bytes,
                    },
                }),
                commands: firmware_sim::device::CommandBehaviour {
                    delay: Duration::from_millis(args.command_delay_ms),
                    failure_rate: args.command_failure_rate,
                    ignore: args.ignore_commands,
                },
                ..FleetConfig::default()
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("firmware-sim: {e}");
            return ExitCode::from(2);
        }
        _ => {
            eprintln!("firmware-sim: --rate must be a non-negative number; --command-failure-rate, --corrupt and --drop-bytes between 0 and 1");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firmware-sim: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(run_fleet(config));
    finish(&report, args.verify_db.as_deref(), args.json)
}

/// Prints the report (and the store check), and says how the run ended.
fn finish(
    report: &firmware_sim::Report,
    verify_db: Option<&std::path::Path>,
    json: bool,
) -> ExitCode {
    let verification = match verify_db {
        Some(db) => match firmware_sim::verify::verify_db(db, report) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("firmware-sim: cannot check the store {}: {e}", db.display());
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    if json {
        let mut value = serde_json::to_value(report).unwrap_or_default();
        if let (Some(v), Some(map)) = (&verification, value.as_object_mut()) {
            map.insert(
                "verify_db".into(),
                serde_json::to_value(v).unwrap_or_default(),
            );
        }
        println!("{value}");
    } else {
        print!("{}", report.to_table());
        if let Some(v) = &verification {
            println!(
                "{:<18} {} frames checked, {} missing, {} duplicated {}",
                "store check",
                v.frames_checked,
                v.frames_missing,
                v.frames_duplicated,
                v.examples.join("; ")
            );
        }
    }
    if let Some(v) = &verification {
        if !v.is_clean() {
            eprintln!(
                "firmware-sim: the store lost {} and duplicated {} acknowledged frames",
                v.frames_missing, v.frames_duplicated
            );
            return ExitCode::FAILURE;
        }
    }
    if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "firmware-sim: {} frames unacknowledged, {} devices refused",
            report.unacked_frames, report.devices_refused
        );
        ExitCode::FAILURE
    }
}

fn bench(args: BenchArgs) -> ExitCode {
    let options = firmware_sim::bench::BenchOptions {
        gateway_bin: args.gateway_bin,
        seconds: args.seconds.max(0.5),
        devices: args.devices.max(1),
        connections: args.connections.max(1),
        replay_outage: args.replay_outage.max(0.5),
        cold_start_readings: args.cold_start_readings,
        ..Default::default()
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firmware-sim: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.json;
    let result = runtime.block_on(firmware_sim::bench::run(&args.scenarios, &options, |o| {
        if json {
            println!("{}", serde_json::to_string(o).unwrap_or_default());
        } else {
            eprintln!("{}: done", o.scenario);
        }
    }));
    match result {
        Ok(outcomes) => {
            if !json {
                print!("{}", firmware_sim::bench::table(&outcomes));
            }
            if outcomes.iter().any(|o| o.unacked_frames > 0) {
                eprintln!("firmware-sim: frames were left unacknowledged");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("firmware-sim: bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn scenario(args: ScenarioArgs) -> ExitCode {
    let scenario = match firmware_sim::scenario::Scenario::load(&args.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("firmware-sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    let base = FleetConfig {
        gateway: args.gateway,
        fleet_secret: args.fleet_secret,
        token: args.token,
        seed: args.seed,
        ..FleetConfig::default()
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firmware-sim: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(firmware_sim::scenario::run_scenario(&scenario, &base));
    finish(&report, args.verify_db.as_deref(), args.json)
}
