//! `gateway`: the command-line shell around the library. Reads the config file, applies
//! flags, resolves the fleet secret, binds the listener, installs tracing and signal
//! handlers, then runs [`gateway::app::serve`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use gateway::config::{AuthMode, Config};
use gateway::store::{devices, Store};
use rand::RngCore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Edge IoT gateway: devices in, SQLite store, MQTT out"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `gateway --listen ...` is `gateway run --listen ...`.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Default, Clone)]
struct Common {
    /// TOML config file (see gateway.example.toml). Without it, embedded defaults.
    #[arg(long, short, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// SQLite file (overrides store.path).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Directory for the gateway's files (overrides data_dir).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default command).
    Run(Box<RunArgs>),
    /// Run only the embedded MQTT broker (rumqttd), e.g. for a second gateway to bridge to.
    Broker {
        /// Its MQTT listener.
        #[arg(long, default_value = "127.0.0.1:1883")]
        listen: SocketAddr,
    },
    /// Measure the SQLite insert ceiling of this schema on this disk (used by
    /// `firmware-sim bench`); prints one JSON object.
    #[command(hide = true)]
    BenchStore {
        /// A fresh SQLite file to create.
        #[arg(long)]
        db: PathBuf,
        #[arg(long, default_value_t = 1000)]
        devices: u32,
        #[arg(long, default_value_t = 8)]
        readings: u32,
        #[arg(long, default_value_t = 200_000)]
        frames: u64,
        #[arg(long, default_value_t = 1000)]
        batch_frames: u64,
        /// Store durability: process-crash or power-loss.
        #[arg(long, default_value = "process-crash")]
        durability: String,
    },
    /// Check a config file and the files it names (certificates, keys, secret files),
    /// without starting anything. Exits non-zero naming the field.
    CheckConfig {
        /// The config file (or --config / GATEWAY_CONFIG; without any, the embedded
        /// defaults are checked).
        file: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Provision, list and revoke devices.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(clap::Args, Default, Clone)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Device TCP listener address (overrides tcp.listen), e.g. 0.0.0.0:7700.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Fleet secret for fleet tokens (overrides auth.fleet_secret).
    #[arg(long, env = "GATEWAY_FLEET_SECRET", hide_env_values = true)]
    fleet_secret: Option<String>,
    /// How devices authenticate (overrides auth.mode).
    #[arg(long, value_enum)]
    auth: Option<AuthMode>,
    /// MQTT broker to bridge to, mqtt://HOST:PORT or mqtts://HOST:PORT (overrides mqtt.url;
    /// without it the embedded broker runs).
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// A serial port with one device on it, PATH[@BAUD] (default 115200 8N1); repeatable.
    /// Adds to the config file's [[serial]] ports.
    #[arg(long, value_name = "PATH[@BAUD]")]
    serial: Vec<String>,
    /// This gateway's id in MQTT topics (overrides mqtt.gateway_id; default: the host name).
    #[arg(long)]
    gateway_id: Option<String>,
    /// Devices connect with TLS: the gateway's certificate chain, PEM (sets tcp.tls.cert_file;
    /// needs --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key, PEM (sets tcp.tls.key_file).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The longest report interval the pacer asks of a device, e.g. "10s"; "0s" turns pacing
    /// off (sets pacing.max_interval).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    slow_report_interval: Option<std::time::Duration>,
    /// Never ask devices to slow down (sets pacing.enabled = false): they are held back by
    /// backpressure alone. For measuring raw capacity.
    #[arg(long)]
    no_pacing: bool,
    /// Run without the MQTT bridge (sets mqtt.enabled = false).
    #[arg(long, conflicts_with = "mqtt")]
    no_mqtt: bool,
    /// HTTP API, metrics and live feed address (overrides http.listen), e.g. 0.0.0.0:8080;
    /// port 0 picks a free one (printed).
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// The HTTP API token (overrides http.token and the token file).
    #[arg(
        long,
        env = "GATEWAY_API_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    api_token: Option<String>,
    /// Run without the HTTP API (sets http.enabled = false).
    #[arg(long, conflicts_with = "http")]
    no_http: bool,
    /// Run without anomaly detection (sets anomaly.enabled = false).
    #[arg(long)]
    no_anomaly: bool,
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Provision a device and print its new token (shown once; the store keeps a hash).
    Add {
        /// The device id the device will send in Hello.
        id: String,
        /// Replace an existing token (the old one stops working).
        #[arg(long)]
        force: bool,
    },
    /// List known devices.
    List,
    /// Refuse a device from its next Hello on, whatever token it presents.
    Revoke {
        /// The device id.
        id: String,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // RUST_LOG decides when set; otherwise `log.level` from the config (and a reload).
    let from_env = tracing_subscriber::EnvFilter::try_from_default_env().ok();
    let env_set = from_env.is_some();
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(
        from_env.unwrap_or_else(|| log_filter("info").unwrap_or_default()),
    );
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let log: Option<LogHandle> = (!env_set).then_some(filter_handle);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Run(Box::new(cli.run))) {
            Command::Run(args) => run(*args, log).await,
            Command::Devices { command, common } => devices_cmd(command, common).await,
            Command::CheckConfig { file, mut common } => {
                if file.is_some() {
                    common.config = file;
                }
                check_config(&common)
            }
            Command::Broker { listen } => broker_cmd(listen).await,
            Command::BenchStore {
                db,
                devices,
                readings,
                frames,
                batch_frames,
                durability,
            } => {
                let durability = match durability.as_str() {
                    "process-crash" => gateway::config::Durability::ProcessCrash,
                    "power-loss" => gateway::config::Durability::PowerLoss,
                    other => anyhow::bail!(
                        "--durability {other:?}: expected process-crash or power-loss"
                    ),
                };
                let params = gateway::ceiling::CeilingParams {
                    devices,
                    readings,
                    frames,
                    batch_frames,
                    durability,
                };
                let ceiling = gateway::ceiling::measure(&db, &params).await?;
                println!("{}", serde_json::to_string(&ceiling)?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn load_config(common: &Common) -> anyhow::Result<Config> {
    let mut config = match &common.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("config file {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(dir) = &common.data_dir {
        config.data_dir.0 = dir.clone();
    }
    if let Some(db) = &common.db {
        config.store.path = Some(db.clone());
    }
    Ok(config)
}

/// Reads a secret file (the fleet secret, the API token), or creates it with a fresh random
/// secret (mode 0600). `what` names it in errors.
fn load_or_create_secret(path: &Path, what: &str) -> anyhow::Result<(Vec<u8>, bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let secret = text.trim();
            if secret.is_empty() {
                bail!("{what} file {} is empty", path.display());
            }
            Ok((secret.as_bytes().to_vec(), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut raw = [0u8; 32];
            rand::rng().fill_bytes(&mut raw);
            let secret = hex::encode(raw);
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options
                .open(path)
                .with_context(|| format!("creating {what} file {}", path.display()))?;
            std::io::Write::write_all(&mut file, format!("{secret}\n").as_bytes())
                .with_context(|| format!("writing {what} file {}", path.display()))?;
            Ok((secret.into_bytes(), true))
        }
        Err(e) => Err(e).with_context(|| format!("reading {what} file {}", path.display())),
    }
}

/// The reloadable log filter (`None` when `RUST_LOG` decides).
type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// `log.level` as a filter; the embedded broker's own logging stays off unless named.
fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    let directives = if level.contains("rumqttd") {
        level.to_owned()
    } else {
        format!("{level},rumqttd=off")
    };
    tracing_subscriber::EnvFilter::try_new(directives).map_err(|e| e.to_string())
}

async fn run(args: RunArgs, log: Option<LogHandle>) -> anyhow::Result<()> {
    let config = run_config(&args)?;
    if let Some(handle) = &log {
        let filter = log_filter(&config.log.level).map_err(anyhow::Error::msg)?;
        handle.reload(filter).context("setting log.level")?;
    }
    // Before anything says "listening": a supervisor that signals as soon as it reads that
    // line must get a graceful stop, never the default action of SIGTERM.
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let reloads = spawn_reload_handler(args.clone())?;
    // Refuse a bad certificate or secret file before listening, naming the field and file.
    gateway::preflight::check_files(&config)?;
    serve_with(config, shutdown, reloads, log).await
}

/// The configuration `gateway run` uses: the file, then the flags over it, validated.
fn run_config(args: &RunArgs) -> anyhow::Result<Config> {
    let args = args.clone();
    let mut config = load_config(&args.common)?;
    if let Some(listen) = args.listen {
        config.tcp.listen = listen;
    }
    if let Some(secret) = args.fleet_secret {
        config.auth.fleet_secret = Some(secret);
    }
    if let Some(mode) = args.auth {
        config.auth.mode = mode;
    }
    if let Some(url) = args.mqtt {
        config.mqtt.url = Some(url);
        config.mqtt.enabled = true;
    }
    if args.no_mqtt {
        config.mqtt.enabled = false;
    }
    if let Some(addr) = args.http {
        config.http.listen = addr;
        config.http.enabled = true;
    }
    if args.no_http {
        config.http.enabled = false;
    }
    if args.no_anomaly {
        config.anomaly.enabled = false;
    }
    if let Some(token) = args.api_token {
        config.http.token = Some(token);
    }
    if let Some(interval) = args.slow_report_interval {
        config.set_max_report_interval(interval);
    }
    if args.no_pacing {
        config.pacing.enabled = false;
    }
    if let Some(id) = args.gateway_id {
        config.mqtt.gateway_id = id;
    }
    for arg in &args.serial {
        config
            .serial
            .push(gateway::config::SerialPortConfig::from_arg(arg).map_err(anyhow::Error::msg)?);
    }
    // clap makes each of the two require the other.
    if let (Some(cert_file), Some(key_file)) = (args.tls_cert, args.tls_key) {
        config.tcp.tls = Some(gateway::config::TcpTlsConfig {
            cert_file,
            key_file,
        });
    }
    config.validate()?;
    Ok(config)
}

/// SIGHUP: reads the config file again (with the same flags over it) and hands it to the
/// running gateway; a file that does not validate, or names files that do not load, is
/// refused here and the running settings stay.
fn spawn_reload_handler(args: RunArgs) -> anyhow::Result<tokio::sync::mpsc::Receiver<Config>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let path = args
                .common
                .config
                .as_ref()
                .map_or("(no config file: defaults and flags)".into(), |p| {
                    p.display().to_string()
                });
            tracing::info!(file = %path, "SIGHUP: reading the configuration again");
            // File reads: off the async workers.
            let again = args.clone();
            let checked = tokio::task::spawn_blocking(move || {
                let c = run_config(&again)?;
                gateway::preflight::check_files(&c)?;
                Ok::<_, anyhow::Error>(c)
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the reload task failed: {e}")));
            match checked {
                Ok(config) => {
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!("reload refused: {e:#}; the running settings stay")
                }
            }
        }
    });
    Ok(rx)
}

async fn serve_with(
    config: Config,
    shutdown: CancellationToken,
    reloads: tokio::sync::mpsc::Receiver<Config>,
    log: Option<LogHandle>,
) -> anyhow::Result<()> {
    let fleet_secret = match (
        &config.auth.mode,
        config.auth.fleet_tokens,
        &config.auth.fleet_secret,
    ) {
        (AuthMode::None, _, _) | (_, false, _) => None,
        (_, true, Some(secret)) => Some(secret.as_bytes().to_vec()),
        (_, true, None) => {
            let path = config.fleet_secret_path();
            let (secret, created) = load_or_create_secret(&path, "fleet secret")?;
            if created {
                println!("fleet secret: created {}", path.display());
            } else {
                println!("fleet secret: {}", path.display());
            }
            Some(secret)
        }
    };

    let listener = TcpListener::bind(config.tcp.listen)
        .await
        .with_context(|| format!("binding the device listener on {}", config.tcp.listen))?;
    let local = listener.local_addr()?;
    let http = if config.http.enabled {
        let token = match &config.http.token {
            Some(token) => token.trim().to_owned(),
            None => {
                let path = config.api_token_path();
                let (token, created) = load_or_create_secret(&path, "API token")?;
                let verb = if created { "created " } else { "" };
                println!("api token: {verb}{}", path.display());
                String::from_utf8(token).context("the API token file is not UTF-8")?
            }
        };
        let http = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| {
                format!(
                    "binding the HTTP listener on {} (http.listen; --no-http turns it off)",
                    config.http.listen
                )
            })?;
        let scheme = if config.http.tls.is_some() {
            "https"
        } else {
            "http"
        };
        println!("http: listening on {scheme}://{}", http.local_addr()?);
        Some((http, token))
    } else {
        println!("http: off");
        None
    };

    println!("store: {}", config.db_path().display());
    match (&config.mqtt.enabled, &config.mqtt.url) {
        (false, _) => println!("mqtt: off"),
        (true, Some(url)) => println!("mqtt: bridging to {url}"),
        (true, None) => println!(
            "mqtt: embedded broker on mqtt://{} (topics gateway/{}/...)",
            config.mqtt.embedded.listen, config.mqtt.gateway_id
        ),
    }
    for port in &config.serial {
        println!(
            "devices: serial {} at {} baud",
            port.path.display(),
            port.baud
        );
    }
    match &config.tcp.tls {
        Some(_) => println!("devices: listening on tls://{local}"),
        None => println!("devices: listening on tcp://{local}"),
    }

    gateway::app::serve(
        gateway::app::Inputs {
            config,
            listener,
            fleet_secret,
            metrics: Arc::default(),
            http,
            reloads: Some(reloads),
            log: log.map(|handle| -> gateway::reload::LogFilter {
                Box::new(move |level: &str| {
                    let filter = log_filter(level)?;
                    handle.reload(filter).map_err(|e| e.to_string())
                })
            }),
        },
        shutdown,
    )
    .await
}

/// `gateway check-config`: the config and the files it names, nothing started.
fn check_config(common: &Common) -> anyhow::Result<()> {
    let config = load_config(common)?;
    let found = gateway::preflight::check_files(&config)?;
    for note in &found.notes {
        println!("note: {note}");
    }
    match &common.config {
        Some(path) => println!("config OK: {}", path.display()),
        None => println!("config OK: the embedded defaults (no config file given)"),
    }
    Ok(())
}

async fn broker_cmd(listen: SocketAddr) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let url = tokio::task::spawn_blocking(move || gateway::broker::start(listen)).await??;
    println!("broker: listening on {url}");
    shutdown.cancelled().await;
    Ok(())
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        tracing::info!("signal received: shutting down (send it again to exit at once)");
        shutdown.cancel();
        tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        eprintln!("gateway: second signal: exiting now");
        std::process::exit(130);
    });
    Ok(())
}

async fn devices_cmd(command: DevicesCommand, common: Common) -> anyhow::Result<()> {
    let config = load_config(&common)?;
    config.validate()?;
    let path = config.db_path();
    let store = Store::open(&path, config.store.durability)
        .await
        .with_context(|| format!("opening the store {}", path.display()))?;
    match command {
        DevicesCommand::Add { id, force } => {
            gateway::session::state::check_name("device_id", &id).map_err(anyhow::Error::msg)?;
            let token = devices::add(store.pool(), &id, force).await?;
            println!("{token}");
            eprintln!("device {id:?} provisioned; this token is shown once");
        }
        DevicesCommand::List => {
            println!(
                "{:<32} {:<8} {:<8} {:>12}",
                "DEVICE", "TOKEN", "REVOKED", "READINGS"
            );
            for d in devices::list(store.pool()).await? {
                println!(
                    "{:<32} {:<8} {:<8} {:>12}",
                    d.device_id,
                    if d.has_token { "yes" } else { "fleet" },
                    if d.revoked_at_ms.is_some() {
                        "yes"
                    } else {
                        "no"
                    },
                    d.readings
                );
            }
        }
        DevicesCommand::Revoke { id } => {
            if !devices::revoke(store.pool(), &id).await? {
                bail!("no device {id:?} in {}", path.display());
            }
            eprintln!("device {id:?} revoked: its next Hello is refused, and a running gateway closes its live link within about a second");
        }
    }
    Ok(())
}
