//! `firmware-sim`: plays fleets of devices against a gateway and reports what it
//! acknowledged. Exits non-zero when anything is still unacknowledged after the drain period.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use firmware_sim::FleetConfig;

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
    /// Run a fleet of identical devices over TCP (or one on a serial port).
    Run(RunArgs),
    /// Measure the gateway against this machine's own limits (see BENCHMARKS.md).
    Bench(BenchArgs),
    /// Run a scenario file (device profiles, sensor waveforms, faults, anomalies).
    Scenario(ScenarioArgs),
    /// Play a recording (from --record or `proxy`) to a gateway.
    Replay(ReplayArgs),
    /// Sit between real devices and a gateway and record what the devices send.
    Proxy(ProxyArgs),
    /// Score the gateway's anomaly detection against the labels of `scenario --labels`.
    Score(ScoreArgs),
    /// Drive a fleet through the real gateway binary and a real Mosquitto while the gateway
    /// is SIGKILLed, the broker stopped, devices misbehave and strangers send garbage; then
    /// check every acknowledged reading is stored exactly once and published.
    Chaos(ChaosArgs),
}

#[derive(clap::Args)]
struct ChaosArgs {
    /// How long faults strike (then the fleet drains and the checks run), e.g. 60s, 30m.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/gateway")]
    gateway_bin: std::path::PathBuf,
    /// Devices in the fleet.
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// Frames per second per device.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Readings per frame.
    #[arg(long, default_value_t = 8)]
    readings: usize,
    /// Mean time between SIGKILLs of the gateway (each followed by a restart).
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    kill_every: std::time::Duration,
    /// Mean time between broker stops (each down 1 to 5 s).
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    broker_every: std::time::Duration,
    /// Mean time between device faults (half the fleet dropping, garbage, oversize frames,
    /// wrong tokens, slow readers, a device flooding).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    device_fault_every: std::time::Duration,
    /// Mean time between strangers (garbage or token guesses from outside the fleet).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    stranger_every: std::time::Duration,
    /// Seed of the fault schedule (default: drawn and printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the store, gateway log and broker files in this directory (default: a temporary
    /// one, removed at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<std::path::PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// The labels (JSON lines, from `scenario --labels`).
    #[arg(long)]
    labels: std::path::PathBuf,
    /// The gateway's SQLite store (read-only).
    #[arg(long)]
    db: std::path::PathBuf,
    /// How long after a label's end a decision still finds it, e.g. 30s (default: five of
    /// the device's usual reading intervals).
    #[arg(long, value_parser = humantime::parse_duration)]
    tolerance: Option<std::time::Duration>,
    /// Print the score as one JSON object.
    #[arg(long)]
    json: bool,
}

/// After-run checks and outputs shared by `run` and `scenario`.
#[derive(clap::Args)]
struct Checks {
    /// After the run, check the gateway's SQLite file: every acknowledged frame stored
    /// exactly once (through the `telemetry` view). Exits non-zero on loss or duplicates.
    #[arg(long, value_name = "PATH")]
    verify_db: Option<std::path::PathBuf>,
    /// Subscribe to this broker (mqtt://HOST:PORT) before the run; afterwards check every
    /// acknowledged frame was published at least once. Exits non-zero on loss.
    #[arg(long, value_name = "URL")]
    verify_mqtt: Option<String>,
    /// Topic filter for --verify-mqtt.
    #[arg(long, default_value = "#", value_name = "FILTER")]
    mqtt_filter: String,
    /// Seconds to wait for publications to arrive after the run, for --verify-mqtt.
    #[arg(long, default_value_t = 30.0)]
    mqtt_wait: f64,
    /// Record what every TCP device sends, with timing, for `firmware-sim replay`.
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Print the summary as one JSON object (no progress bar).
    #[arg(long)]
    json: bool,
}

/// TLS to the gateway, shared by `run` and `scenario`.
#[derive(clap::Args)]
struct TlsArgs {
    /// Connect with TLS, trusting the CA certificates in this PEM file (the gateway runs with
    /// --tls-cert/--tls-key).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Name to check on the gateway's certificate (default: the host of --gateway).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The TLS client for `gateway`, or `None` for plain TCP; exits 2 on a bad CA file.
    fn client(&self, gateway: &str) -> Result<Option<firmware_sim::tls::TlsClient>, ExitCode> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let name = self
            .tls_server_name
            .as_deref()
            .unwrap_or_else(|| firmware_sim::tls::TlsClient::host_of(gateway));
        firmware_sim::tls::TlsClient::new(ca, name)
            .map(Some)
            .map_err(|e| {
                eprintln!("firmware-sim: {e:#}");
                ExitCode::from(2)
            })
    }
}

#[derive(clap::Args)]
struct ScenarioArgs {
    /// The scenario file (TOML; see firmware-sim/scenarios/).
    file: std::path::PathBuf,
    /// The gateway's device listener.
    #[arg(long, default_value = "127.0.0.1:7700")]
    gateway: String,
    /// Seed (overrides the scenario's): the same scenario and seed give the same bytes from
    /// every device.
    #[arg(long)]
    seed: Option<u64>,
    /// Fleet secret: each device's token is HMAC-SHA256(secret, device_id).
    #[arg(long, env = "GATEWAY_FLEET_SECRET", hide_env_values = true)]
    fleet_secret: Option<String>,
    /// A token every device presents.
    #[arg(long, conflicts_with = "fleet_secret")]
    token: Option<String>,
    /// Relay LISTEN to the broker at UPSTREAM (HOST:PORT) and cut it for broker-outage
    /// faults; point the gateway's --mqtt at mqtt://LISTEN.
    #[arg(long, value_name = "LISTEN=UPSTREAM")]
    broker_gate: Option<String>,
    /// Relative serial `ports` in the scenario are taken from this directory.
    #[arg(long, default_value = ".", value_name = "DIR")]
    ports_dir: std::path::PathBuf,
    /// Write the anomaly labels as JSON lines to this file.
    #[arg(long, value_name = "OUT")]
    labels: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    checks: Checks,
}

#[derive(clap::Args)]
struct ReplayArgs {
    /// The recording.
    file: std::path::PathBuf,
    /// The gateway's device listener.
    #[arg(long, default_value = "127.0.0.1:7700")]
    gateway: String,
    /// Pace: 1 is as recorded, 10 ten times faster, 0 as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    #[command(flatten)]
    tls: TlsArgs,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// Where devices connect.
    #[arg(long, default_value = "0.0.0.0:7700")]
    listen: String,
    /// The gateway's device listener.
    #[arg(long)]
    upstream: String,
    /// The recording to write.
    #[arg(long, value_name = "FILE")]
    record: std::path::PathBuf,
    /// Stop after this many seconds (default: at Ctrl-C or SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Devices connect with TLS: terminate it here with this certificate chain (PEM), so
    /// their traffic is recorded in the clear. Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Connect to the gateway with TLS, trusting this CA (PEM).
    #[arg(long, value_name = "FILE")]
    upstream_tls_ca: Option<std::path::PathBuf>,
    /// Name to check on the gateway's certificate (default: the host of --upstream).
    #[arg(long, value_name = "NAME", requires = "upstream_tls_ca")]
    upstream_tls_server_name: Option<String>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Scenarios to run (default: all): ingest, latency, uplink, replay, connections, cold-start,
    /// api, anomaly, overload, fairness.
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
    /// `ingest` runs the gateway and the SQLite ceiling this many times each, interleaved,
    /// and reports medians and spreads.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
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
    /// Most readings in one frame: a device keeps sampling at --rate while it waits (paced,
    /// its window full, offline) and sends every sample taken since in the next frame, up
    /// to this; older samples beyond it are dropped at the device and counted.
    #[arg(long, default_value_t = firmware_sim::fleet::DEFAULT_MAX_FRAME_READINGS)]
    max_frame_readings: usize,
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
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    checks: Checks,
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("firmware-sim: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => run(args, &runtime),
        Command::Bench(args) => bench(args, &runtime),
        Command::Scenario(args) => scenario(args, &runtime),
        Command::Replay(args) => replay(args, &runtime),
        Command::Proxy(args) => proxy(args, &runtime),
        Command::Score(args) => score(args),
        Command::Chaos(args) => chaos(args, &runtime),
    }
}

fn chaos(args: ChaosArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let options = firmware_sim::chaos::ChaosOptions {
        gateway_bin: args.gateway_bin,
        duration: args.duration,
        devices: args.devices.max(1),
        rate: args.rate,
        readings: args.readings.max(1),
        kill_every: args.kill_every.max(std::time::Duration::from_millis(500)),
        broker_every: args.broker_every.max(std::time::Duration::from_secs(1)),
        device_fault_every: args
            .device_fault_every
            .max(std::time::Duration::from_millis(100)),
        stranger_every: args
            .stranger_every
            .max(std::time::Duration::from_millis(100)),
        seed: args.seed,
        dir: args.dir,
    };
    match runtime.block_on(firmware_sim::chaos::run(&options)) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string(&report).unwrap_or_default());
            } else {
                print!("{}", report.to_table());
            }
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                eprintln!("firmware-sim: chaos: the run was not clean (see above)");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("firmware-sim: chaos: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn score(args: ScoreArgs) -> ExitCode {
    use firmware_sim::score;
    let labels = match score::read_labels(&args.labels) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("firmware-sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    let view = match score::read_store(&args.db) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("firmware-sim: reading {}: {e}", args.db.display());
            return ExitCode::from(2);
        }
    };
    let tolerance = args.tolerance.map_or(0, |t| t.as_millis() as i64);
    let s = score::score(&labels, &view, tolerance);
    if args.json {
        println!("{}", serde_json::to_string(&s).unwrap_or_default());
    } else {
        print!("{}", s.table());
    }
    ExitCode::SUCCESS
}

fn run(args: RunArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let tls = match args.tls.client(&args.gateway) {
        Ok(tls) => tls,
        Err(code) => return code,
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
                max_frame_readings: args.max_frame_readings.max(1),
                fleet_secret: args.fleet_secret,
                token: args.token,
                prefix: args.prefix,
                epoch: args.epoch,
                serial: args
                    .serial
                    .map(|path| firmware_sim::serial::SerialTarget {
                        path,
                        baud: args.baud,
                        noise: firmware_sim::serial::Noise {
                            corrupt: args.corrupt,
                            drop: args.drop_bytes,
                        },
                    })
                    .into_iter()
                    .collect(),
                commands: firmware_sim::device::CommandBehaviour {
                    delay: Duration::from_millis(args.command_delay_ms),
                    failure_rate: args.command_failure_rate,
                    ignore: args.ignore_commands,
                },
                tls,
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
    runtime.block_on(execute(&args.checks, None, |recorder, stats| async move {
        let config = FleetConfig { recorder, ..config };
        Ok(firmware_sim::fleet::run_fleet_with(config, stats).await)
    }))
}

fn scenario(args: ScenarioArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let mut scenario = match firmware_sim::scenario::Scenario::load(&args.file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("firmware-sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    scenario.resolve_ports(&args.ports_dir);
    let tls = match args.tls.client(&args.gateway) {
        Ok(tls) => tls,
        Err(code) => return code,
    };
    let gate = match args.broker_gate.as_deref().map(|g| g.split_once('=')) {
        None => None,
        Some(Some((listen, upstream))) => {
            match runtime.block_on(firmware_sim::gate::Gate::start(listen, upstream, true)) {
                Ok(gate) => Some(std::sync::Arc::new(gate)),
                Err(e) => {
                    eprintln!("firmware-sim: --broker-gate: cannot listen on {listen}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Some(None) => {
            eprintln!("firmware-sim: --broker-gate takes LISTEN=UPSTREAM, such as 127.0.0.1:1884=127.0.0.1:1883");
            return ExitCode::from(2);
        }
    };
    let base = FleetConfig {
        gateway: args.gateway,
        fleet_secret: args.fleet_secret,
        token: args.token,
        seed: args.seed,
        tls,
        ..FleetConfig::default()
    };
    // The gate outlives the run: after it, the gateway's backlog still crosses it for
    // --verify-mqtt.
    let keep_gate = gate.clone();
    let code = runtime.block_on(execute(
        &args.checks,
        args.labels.as_deref(),
        |recorder, stats| async move {
            let base = FleetConfig { recorder, ..base };
            firmware_sim::scenario::run_scenario(&scenario, &base, gate, stats).await
        },
    ));
    drop(keep_gate);
    code
}

/// Starts the checks that must watch the run, runs it with a progress bar on a terminal,
/// then prints the report and the checks, and says how it all ended.
async fn execute<F, Fut>(checks: &Checks, labels: Option<&std::path::Path>, run: F) -> ExitCode
where
    F: FnOnce(
        Option<std::sync::Arc<firmware_sim::record::Recorder>>,
        std::sync::Arc<firmware_sim::report::FleetStats>,
    ) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<firmware_sim::Report>>,
{
    let watch = match &checks.verify_mqtt {
        Some(url) => match firmware_sim::verify::MqttWatch::start(url, &checks.mqtt_filter).await {
            Ok(w) => Some(w),
            Err(e) => {
                eprintln!("firmware-sim: {e:#}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let recorder = match checks
        .record
        .as_deref()
        .map(firmware_sim::record::Recorder::create)
    {
        Some(Ok(r)) => Some(r),
        Some(Err(e)) => {
            eprintln!("firmware-sim: {e:#}");
            return ExitCode::FAILURE;
        }
        None => None,
    };
    let stats = std::sync::Arc::new(firmware_sim::report::FleetStats::default());
    let progress = (!checks.json && std::io::stderr().is_terminal())
        .then(|| firmware_sim::report::progress(stats.clone()));
    let report = run(recorder.clone(), stats).await;
    if let Some(p) = progress {
        p.abort();
        eprint!("\r\x1b[2K");
    }
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("firmware-sim: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(r) = &recorder {
        if let Err(e) = r.finish() {
            eprintln!("firmware-sim: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = labels {
        if let Err(e) = write_labels(path, &report) {
            eprintln!("firmware-sim: writing labels to {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let mqtt = match &watch {
        Some(w) => Some(
            w.verify(
                &report,
                Duration::try_from_secs_f64(checks.mqtt_wait).unwrap_or(Duration::from_secs(30)),
            )
            .await,
        ),
        None => None,
    };
    finish(&report, checks.verify_db.as_deref(), mqtt, checks.json)
}

/// Writes one JSON object per anomaly label.
fn write_labels(path: &std::path::Path, report: &firmware_sim::Report) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for label in report.labels() {
        serde_json::to_writer(&mut out, label)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Prints the report and the checks, and says how the run ended.
fn finish(
    report: &firmware_sim::Report,
    verify_db: Option<&std::path::Path>,
    mqtt: Option<firmware_sim::verify::MqttVerification>,
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
        if let Some(map) = value.as_object_mut() {
            if let Some(v) = &verification {
                map.insert(
                    "verify_db".into(),
                    serde_json::to_value(v).unwrap_or_default(),
                );
            }
            if let Some(m) = &mqtt {
                map.insert(
                    "verify_mqtt".into(),
                    serde_json::to_value(m).unwrap_or_default(),
                );
            }
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
        if let Some(m) = &mqtt {
            println!(
                "{:<18} {} frames checked, {} never published, {} published more than once ({} messages) {}",
                "mqtt check",
                m.frames_checked,
                m.frames_missing,
                m.frames_repeated,
                m.messages,
                m.examples.join("; ")
            );
        }
    }
    let mut clean = true;
    if let Some(v) = verification.filter(|v| !v.is_clean()) {
        eprintln!(
            "firmware-sim: the store lost {} and duplicated {} acknowledged frames",
            v.frames_missing, v.frames_duplicated
        );
        clean = false;
    }
    if let Some(m) = mqtt.filter(|m| !m.is_clean()) {
        eprintln!(
            "firmware-sim: {} acknowledged frames were never published",
            m.frames_missing
        );
        clean = false;
    }
    if !report.is_clean() {
        eprintln!(
            "firmware-sim: {} frames unacknowledged, {} devices refused",
            report.unacked_frames, report.devices_refused
        );
        clean = false;
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn replay(args: ReplayArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    if args.speed.is_nan() || args.speed < 0.0 {
        eprintln!("firmware-sim: --speed must be 0 (as fast as possible) or more");
        return ExitCode::from(2);
    }
    let recording = match firmware_sim::record::Recording::load(&args.file) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("firmware-sim: {e:#}");
            return ExitCode::from(2);
        }
    };
    let tls = match args.tls.client(&args.gateway) {
        Ok(tls) => tls,
        Err(code) => return code,
    };
    let report = runtime.block_on(firmware_sim::record::replay_with(
        recording,
        &args.gateway,
        args.speed,
        tls,
    ));
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    } else {
        println!(
            "replayed {} connections ({} bytes) in {:.1} s: {} hello acks, {} acks, errors {:?}, {} could not connect",
            report.connections,
            report.bytes_sent,
            report.elapsed_s,
            report.hello_acks,
            report.acks,
            report.errors,
            report.connect_failures
        );
    }
    if report.connect_failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn proxy(args: ProxyArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let devices = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match firmware_sim::tls::acceptor(cert, key) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("firmware-sim: {e:#}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let upstream_tls = TlsArgs {
        tls_ca: args.upstream_tls_ca.clone(),
        tls_server_name: args.upstream_tls_server_name.clone(),
    };
    let upstream = match upstream_tls.client(&args.upstream) {
        Ok(u) => u,
        Err(code) => return code,
    };
    let tls = firmware_sim::record::ProxyTls { devices, upstream };
    let recorder = match firmware_sim::record::Recorder::create(&args.record) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("firmware-sim: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match runtime.block_on(tokio::net::TcpListener::bind(&args.listen)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("firmware-sim: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "firmware-sim: relaying {} to {}, recording to {}",
        args.listen,
        args.upstream,
        args.record.display()
    );
    let duration = args
        .duration
        .and_then(|s| Duration::try_from_secs_f64(s).ok());
    let relayed = runtime.block_on(firmware_sim::record::proxy(
        listener,
        &args.upstream,
        tls,
        recorder.clone(),
        async move {
            match duration {
                Some(d) => tokio::time::sleep(d).await,
                None => stop_signal().await,
            }
        },
    ));
    if let Err(e) = recorder.finish() {
        eprintln!("firmware-sim: {e:#}");
        return ExitCode::FAILURE;
    }
    eprintln!("firmware-sim: relayed {relayed} device connections");
    ExitCode::SUCCESS
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn bench(args: BenchArgs, runtime: &tokio::runtime::Runtime) -> ExitCode {
    let options = firmware_sim::bench::BenchOptions {
        gateway_bin: args.gateway_bin,
        seconds: args.seconds.max(0.5),
        devices: args.devices.max(1),
        connections: args.connections.max(1),
        replay_outage: args.replay_outage.max(0.5),
        cold_start_readings: args.cold_start_readings,
        rounds: args.rounds.max(1),
        ..Default::default()
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
