//! `hvisd`: the runtime, the host simulator, and the operator's tools in one binary.

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand};
use hvisd::cli_output::{self, print, print_line};
use hvisd::config::Config;
use hvisd::sd_notify;
use hvisd::services::Services;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "hvisd",
    version,
    about = "Hyper-V integration services for Linux guests"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `hvisd=debug`. Overrides RUST_LOG.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the guest runtime on a transport.
    Run {
        /// `shm:ROOT` (a host simulator's root), `uio` or `uio:SYSFS_DEVICES_DIR[:DEV_DIR]`, or
        /// `kernel` (KVP and VSS on the kernel's devices, /dev/vmbus/hv_kvp and hv_vss, or the
        /// SOCK_SEQPACKET sockets `[kvp] device` and `[vss] device` name), or `kernel:DEVICE`
        /// (KVP only, on DEVICE). Default: the config's `[runtime] transport`, else `kernel`.
        #[arg(long)]
        transport: Option<String>,
        /// The runtime's TOML config (defaults apply without one).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Play the Hyper-V host on an shm root.
    Host {
        /// The shm root to create offers in (created if missing).
        #[arg(long)]
        root: PathBuf,
        #[command(subcommand)]
        command: HostCommand,
    },
    /// Run the embedded simulator and the runtime together and print the transcript.
    Sim {
        /// A host script to play instead of the built-in tour (prints its JSON transcript).
        #[arg(long)]
        script: Option<PathBuf>,
        /// Print the tour's report as JSON (steps, verdicts, timings and the host's transcript).
        #[arg(long)]
        json: bool,
        /// Directory of the example plugins' components (`app_version.wasm`, `flush_hold.wasm`,
        /// `status_echo.wasm`); default: $HVISD_PLUGINS_DIR, /usr/lib/hvisd/plugins, or this
        /// source tree's plugins/target build.
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// Keep the shm root here instead of a temporary directory.
        #[arg(long)]
        root: Option<PathBuf>,
        /// The runtime's TOML config.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Internal: a plugin worker, started by the daemon (never by hand).
    #[command(name = "plugin-worker", hide = true)]
    PluginWorker,
    /// Inspect plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Read and change the KVP pool files (safe while the daemon runs).
    Kvp(hvisd_kvp::cli::KvpCliArgs),
    /// Ask the running daemon how it is doing: channels and negotiated versions, plugins and
    /// their workers, the last backup, KVP pool sizes (over its control socket; needs root).
    Status {
        /// The control socket.
        #[arg(long, default_value = hvisd::config::DEFAULT_CONTROL_SOCKET)]
        socket: PathBuf,
        /// Print JSON.
        #[arg(long, conflicts_with = "metrics")]
        json: bool,
        /// Print the Prometheus metrics.
        #[arg(long)]
        metrics: bool,
    },
    /// Backups (VSS).
    Vss {
        #[command(subcommand)]
        command: VssCommand,
    },
    /// Print a shell completion script (e.g. `hvisd completions bash > /etc/bash_completion.d/hvisd`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff; `hvisd man | man -l -`).
    Man,
    /// Benchmarks that print figures (built with `--features bench`).
    #[cfg(feature = "bench")]
    Bench {
        #[command(subcommand)]
        which: hvisd::bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum HostCommand {
    /// Run a JSON script of host actions and print a JSON transcript.
    Script {
        /// The script file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum VssCommand {
    /// Print what a backup would freeze now, in order, and why every other mount is left
    /// alone. Freezes nothing.
    Plan {
        /// The runtime's config (its `[vss.policy]`; defaults: `hv_vss_daemon`'s rules).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Say which worlds a component implements, what it imports, and whether a manifest entry
    /// accepts it.
    Check {
        /// The component (`.wasm`).
        file: PathBuf,
        /// A runtime config whose `[[plugin]]` entry to check the component against.
        #[arg(long, requires = "plugin")]
        config: Option<PathBuf>,
        /// The `[[plugin]]` entry's name.
        #[arg(long, requires = "config")]
        plugin: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing(filter: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match filter {
        Some(f) => EnvFilter::new(f),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    // Logs go to stderr so stdout stays clean for transcripts and JSON figures.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(hvisd::log_gate::GatedStderr);
    if hvisd::log_format::stderr_is_journal() {
        builder
            .with_ansi(false)
            .event_format(hvisd::log_format::JournalFormat)
            .init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Ok(Config::default()),
    }
}

/// Prints each error once, on one line; a reader that closed standard output early ends the
/// command quietly with status 141 (`hvisd::cli_output`).
fn main() -> std::process::ExitCode {
    use std::process::ExitCode;
    match hvisd_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli_output::is_stdout_closed(&e) => {
            ExitCode::from(cli_output::EXIT_STDOUT_CLOSED)
        }
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "error: {}", cli_output::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn hvisd_main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::PluginWorker = cli.command {
        // First thing, single-threaded: the worker confines itself before anything else runs,
        // and its log lines go to the core, not to this process's stderr.
        return match hvisd_plugin_host::worker::run(hvisd_plugin_host::worker::CONTROL_FD) {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!("hvisd plugin worker: {e}");
                std::process::exit(2);
            }
        };
    }
    init_tracing(cli.log.as_deref());
    match cli.command {
        Command::Run {
            transport,
            config: path,
        } => {
            let config = load_config(path.as_ref())?;
            let transport = transport.unwrap_or_else(|| config.runtime.transport.clone());
            preflight(&transport, &config)?;
            runtime()?.block_on(run(&transport, config, path))
        }
        Command::Host { root, command } => match command {
            HostCommand::Script { file } => runtime()?.block_on(host_script(root, file)),
        },
        Command::Sim {
            script,
            json,
            plugins,
            root,
            config,
        } => {
            let config = load_config(config.as_ref())?;
            if script.is_some() {
                return runtime()?.block_on(sim(script, root, config));
            }
            // Before any thread exists: the loop mount needs a private mount namespace.
            let (mount, freeze) = match hvisd::sim::tour::TourMount::make() {
                Ok(m) => {
                    let freeze = hvisd::sim::tour::FreezeSetup::Loop {
                        mount: m.path().to_owned(),
                    };
                    (Some(m), freeze)
                }
                Err(why) => (None, hvisd::sim::tour::FreezeSetup::DryRun { why }),
            };
            let result = runtime()?.block_on(tour(config, plugins, freeze, json));
            drop(mount);
            result
        }
        Command::PluginWorker => Ok(()),
        Command::Plugin {
            command:
                PluginCommand::Check {
                    file,
                    config,
                    plugin,
                    json,
                },
        } => plugin_check(&file, config.as_deref(), plugin.as_deref(), json),
        Command::Status {
            socket,
            json,
            metrics,
        } => {
            let what = match (json, metrics) {
                (true, _) => "status",
                (_, true) => "metrics",
                _ => "status-text",
            };
            let text = runtime()?.block_on(hvisd::control::query(&socket, what))?;
            Ok(print(text)?)
        }
        Command::Kvp(args) => Ok(hvisd_kvp::cli::cli(&args, &mut cli_output::stdout())?),
        Command::Vss {
            command: VssCommand::Plan { config, json },
        } => vss_plan(config.as_ref(), json),
        // Both are rendered into memory first: clap_complete panics on a failed write.
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "hvisd", &mut script);
            print(&script)?;
            Ok(())
        }
        Command::Man => {
            let mut page = Vec::new();
            // Section 8: a daemon and the administrator's tools around it.
            clap_mangen::Man::new(Cli::command())
                .section("8")
                .render(&mut page)?;
            print(&page)?;
            Ok(())
        }
        #[cfg(feature = "bench")]
        Command::Bench { which } => hvisd::bench::run(which),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Takes over SIGINT and SIGTERM at once (from then on neither kills the process) and resolves
/// when one arrives.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// What `hvisd run` checks before it starts anything, so that a daemon that cannot work says
/// why in one sentence and exits non-zero instead of idling.
fn preflight(transport: &str, config: &Config) -> Result<()> {
    let (kind, rest) = transport.split_once(':').unwrap_or((transport, ""));
    let not_hyperv = "this machine is not a Hyper-V guest or hv_utils is not loaded (`modprobe hv_utils`); without Hyper-V try `hvisd sim`";
    match kind {
        "kernel" => {
            let mut devices = Vec::new();
            if !rest.is_empty() {
                devices.push(("KVP", PathBuf::from(rest)));
            } else {
                if config.services.kvp {
                    devices.push(("KVP", config.kvp.device.clone()));
                }
                if config.services.vss {
                    devices.push(("VSS", config.vss.device.clone()));
                }
            }
            if devices.is_empty() {
                bail!(
                    "--transport kernel serves KVP and VSS, but both are turned off in [services]: nothing to serve"
                );
            }
            for (service, device) in &devices {
                if !device.exists() {
                    bail!(
                        "the {service} device {} does not exist: {not_hyperv}; or turn {} off in [services] if you do not want it",
                        device.display(),
                        service.to_lowercase()
                    );
                }
            }
        }
        "shm" => {
            if rest.is_empty() {
                bail!("--transport shm:ROOT needs the root directory, e.g. shm:/run/hvisd-sim");
            }
            if !Path::new(rest).is_dir() {
                bail!(
                    "the shm root {rest} does not exist: start the host side first (`hvisd host --root {rest} script FILE` creates it)"
                );
            }
        }
        "uio" => {
            let devices = rest
                .split(':')
                .next()
                .filter(|s| !s.is_empty())
                .unwrap_or(hvisd::transport::uio::DEFAULT_SYSFS_DEVICES);
            if !Path::new(devices).is_dir() {
                bail!("{devices} does not exist: {not_hyperv}");
            }
        }
        other => bail!(
            "unknown transport {other:?}: use kernel[:DEVICE], uio[:SYSFS_DEVICES_DIR[:DEV_DIR]] or shm:ROOT"
        ),
    }
    if config.services.kvp {
        let dir = &config.kvp.pool_dir;
        if dir.exists()
            && rustix::fs::access(
                dir,
                rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
            )
            .is_err()
        {
            bail!(
                "the KVP pool directory {} is not writable by this user: run as root or set [kvp] pool_dir",
                dir.display()
            );
        }
    }
    for m in &config.plugin {
        if !m.path.is_file() {
            bail!(
                "plugin `{}`: its component {} does not exist",
                m.name,
                m.path.display()
            );
        }
    }
    Ok(())
}

async fn run(transport: &str, mut config: Config, config_path: Option<PathBuf>) -> Result<()> {
    let kvp_device = config.kvp.device.clone();
    let vss_device = config.vss.device.clone();
    let (kind, rest) = transport.split_once(':').unwrap_or((transport, ""));
    if kind == "shm" && config.vss.dry_run.is_none() {
        // A simulated host must not freeze the machine it runs on.
        tracing::info!(
            "VSS on the shm transport freezes nothing (set [vss] dry_run = false to freeze for real)"
        );
        config.vss.dry_run = Some(true);
    }
    let broker = hvisd::plugins::broker::PluginBroker::new();
    let acceptor = hvsock_acceptor(&config, &broker, config_path.is_some());
    let hvsock = hvisd::hvsock::Hvsock::new(acceptor, config.hvsock.options());
    if kind == "shm" && !rest.is_empty() {
        hvsock.set_connector(hvisd::hvsock::Connector::Shm {
            root: PathBuf::from(rest),
        });
    }
    let services = Services::new(config.clone())?.with_hvsock(hvsock.clone());
    // With a config file the plugins are always set up, so a SIGHUP can add some even if there
    // were none at start.
    let plugins = match &config_path {
        // Plugins need the KVP pools (their kvp-store import); without KVP only a config that
        // names plugins is an error.
        Some(_) if services.kvp_core().is_some() => {
            Some(hvisd::plugins::Plugins::start_always(&config, &services).await?)
        }
        _ => hvisd::plugins::Plugins::start(&config, &services).await?,
    };
    if let Some(plugins) = &plugins {
        let problems = plugins.problems();
        if !problems.is_empty() {
            plugins.shutdown().await;
            bail!(
                "the plugins cannot start as configured:\n  {}",
                problems.join("\n  ")
            );
        }
    }
    #[cfg(debug_assertions)]
    if let (Some(plugins), Some(test)) = (&plugins, &config.plugins.escape_test) {
        escape_test(plugins, test).await?;
    }
    if let (Some(vss), Some(plugins)) = (services.vss_core(), &plugins) {
        vss.set_plugins(plugins.clone());
    }
    if let Some(plugins) = &plugins {
        broker.set_plugins(plugins);
    }
    if let (Some(plugins), Some(path)) = (plugins.clone(), config_path) {
        tokio::spawn(reload_on_sighup(plugins, path));
    }
    let vss_core = services.vss_core().cloned();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let control = hvisd::control::ControlState {
        services: services.clone(),
        plugins: plugins.clone(),
        transport: transport.to_owned(),
        started: std::time::Instant::now(),
    };
    // A configured socket must work; the default one is skipped with a warning when another
    // daemon has it or /run is not ours (a test's or a user's daemon).
    let socket = match &config.control.socket {
        Some(path) => Some((path.clone(), true)),
        None => {
            (kind != "shm").then(|| (PathBuf::from(hvisd::config::DEFAULT_CONTROL_SOCKET), false))
        }
    };
    if let Some((path, required)) = socket {
        match hvisd::control::bind(&path) {
            Ok(listener) => {
                tracing::info!(socket = %path.display(), "control socket (hvisd status)");
                tokio::spawn(hvisd::control::serve(
                    listener,
                    path,
                    control.clone(),
                    stop_rx.clone(),
                ));
            }
            Err(e) if required => return Err(e.into()),
            Err(e) => tracing::warn!("no control socket: {e}"),
        }
    }
    if let Some(addr) = config.control.metrics_listen {
        if !addr.ip().is_loopback() {
            bail!(hvisd::control::ControlError::NotLoopback(addr));
        }
        let (control, stop) = (control.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = hvisd::control::serve_metrics_http(addr, control, stop).await {
                tracing::error!("metrics: {e}");
            }
        });
    }
    let _listeners = hvisd::hvsock::start_listeners(&hvsock, &config.hvsock, &stop_rx)?;
    #[cfg(debug_assertions)]
    if let Some(test) = &config.hvsock.test
        && !test.connect.is_empty()
    {
        tokio::spawn(hvisd::hvsock::echo::run_test_connects(
            hvsock.clone(),
            test.connect.clone(),
        ));
    }
    // Configuration, services and plugins are up: systemd (`Type=notify`) may count the daemon as
    // started, and stop it, as soon as it hears this; a config or plugin error above fails the
    // start instead. The stop signals are ours first, so a stop right after READY is orderly.
    let stop = stop_signal()?;
    notify(sd_notify::READY);
    let serve = async {
        match kind {
            "kernel" => {
                // `kernel:DEVICE`: KVP on DEVICE only. `kernel`: every enabled service with a
                // kernel device (KVP, VSS) on the device its section names.
                let (kvp_device, vss) = if rest.is_empty() {
                    (kvp_device, services.vss_core().cloned())
                } else {
                    (PathBuf::from(rest), None)
                };
                let kvp = async {
                    let Some(core) = services.kvp_core() else {
                        return Ok(());
                    };
                    tracing::info!(device = %kvp_device.display(), "serving KVP on the kernel device protocol");
                    hvisd_kvp::kernel::run_kernel_transport(
                        core.clone(),
                        &kvp_device,
                        stop_rx.clone(),
                    )
                    .await
                    .inspect_err(|e| tracing::error!("KVP stopped: {e}"))
                };
                let vss = async {
                    let Some(core) = vss else {
                        return Ok(());
                    };
                    tracing::info!(device = %vss_device.display(), "serving VSS on the kernel device protocol");
                    hvisd::vss::kernel::run_kernel_transport(core, &vss_device, stop_rx.clone())
                        .await
                        .inspect_err(|e| tracing::error!("VSS stopped: {e}"))
                };
                if services.kvp_core().is_none() && services.vss_core().is_none() {
                    bail!(
                        "--transport kernel serves KVP and VSS, but both are turned off in [services]"
                    );
                }
                let (k, v) = tokio::join!(kvp, vss);
                k?;
                v?;
                Ok(())
            }
            "shm" => {
                if rest.is_empty() {
                    bail!("--transport shm:ROOT needs the root directory, e.g. shm:/run/hvisd-sim");
                }
                let root = hvisd::transport::shm::ShmRoot::new(rest);
                hvisd::runtime::run_shm(root, services, stop_rx).await?;
                Ok(())
            }
            "uio" => {
                let mut parts = rest.splitn(2, ':');
                let devices = parts
                    .next()
                    .filter(|s| !s.is_empty())
                    .unwrap_or(hvisd::transport::uio::DEFAULT_SYSFS_DEVICES);
                let dev_dir = parts
                    .next()
                    .unwrap_or(hvisd::transport::uio::DEFAULT_DEV_DIR);
                hvisd::runtime::run_uio(devices.as_ref(), dev_dir.as_ref(), services, stop_rx)
                    .await?;
                Ok(())
            }
            other => bail!(
                "unknown transport {other:?}: use shm:ROOT, uio[:SYSFS_DEVICES_DIR[:DEV_DIR]] or kernel[:DEVICE]"
            ),
        }
    };
    tokio::pin!(serve);
    let served = tokio::select! {
        r = &mut serve => r,
        () = stop => {
            tracing::info!("stopping");
            notify(sd_notify::STOPPING);
            let _ = stop_tx.send(true);
            // Every transport watches `stop`; the grace period only bounds a transport that is
            // stuck in a system call.
            match tokio::time::timeout(std::time::Duration::from_secs(5), serve).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!("a transport did not stop within 5 s; exiting anyway");
                    Ok(())
                }
            }
        }
    };
    // Whatever ended the transports: nothing stays frozen, held KVP writes reach the pools,
    // the workers stop.
    if let Some(vss) = &vss_core
        && vss.shutdown().await
    {
        tracing::info!("file systems thawed at shutdown");
    }
    if let Some(plugins) = &plugins {
        plugins.shutdown().await;
    }
    tracing::info!("stopped");
    served
}

/// Tells systemd about a state change; the daemon runs on without it if that fails.
fn notify(state: &str) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("cannot tell systemd {state}: {e}");
    }
}

/// What accepts host-initiated hvsock connections: the plugin broker, when plugins are (or may
/// be, after a reload) configured; debug builds may install the test echo instead (`[hvsock.test]
/// echo = true`). Without an acceptor pipe offers are left alone.
fn hvsock_acceptor(
    config: &Config,
    broker: &std::sync::Arc<hvisd::plugins::broker::PluginBroker>,
    reloadable: bool,
) -> Option<std::sync::Arc<dyn hvisd::hvsock::HvsockAcceptor>> {
    #[cfg(debug_assertions)]
    if config.hvsock.test.as_ref().is_some_and(|t| t.echo) {
        tracing::warn!("hvsock: test echo acceptor (debug build)");
        return Some(std::sync::Arc::new(
            hvisd::hvsock::echo::EchoAcceptor::default(),
        ));
    }
    if config.plugin.is_empty() && !reloadable {
        return None;
    }
    Some(broker.clone())
}

/// Debug builds: runs the compromised-worker test of the config and writes its report.
#[cfg(debug_assertions)]
async fn escape_test(
    plugins: &hvisd::plugins::Plugins,
    test: &hvisd::config::EscapeTest,
) -> Result<()> {
    let core = std::process::id();
    let attempts = test
        .attempts
        .iter()
        .map(|a| a.replace("{core}", &core.to_string()))
        .collect();
    let results = plugins
        .escape_test(&test.plugin, attempts)
        .await
        .map_err(|e| anyhow::anyhow!("escape test: {e}"))?;
    let report = serde_json::json!({ "core_pid": core, "results": results });
    std::fs::write(&test.report, report.to_string())
        .with_context(|| format!("writing {}", test.report.display()))?;
    tracing::warn!(report = %test.report.display(), "escape test done (debug build)");
    Ok(())
}

/// SIGHUP re-reads the config file and reloads the plugins. A config that does not parse, or
/// plugins that do not load, leave the running ones in place; requests in flight finish either way.
async fn reload_on_sighup(plugins: std::sync::Arc<hvisd::plugins::Plugins>, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot listen for SIGHUP, plugin reload disabled: {e}");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading plugins");
        match Config::load(&path) {
            Ok(config) => {
                if let Err(e) = plugins.apply(&config).await {
                    tracing::error!("plugin reload failed, keeping the running plugins: {e}");
                }
            }
            Err(e) => tracing::error!("plugin reload: {e}; keeping the running plugins"),
        }
    }
}

async fn host_script(root: PathBuf, file: PathBuf) -> Result<()> {
    let script = hvisd::sim::Script::load(&file)?;
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating shm root {}", root.display()))?;
    let mut host = hvisd::sim::HostSimulator::new(&root);
    let transcript = host.run(&script).await;
    print_line(&serde_json::to_string_pretty(&transcript)?)?;
    if !transcript.ok() {
        bail!(
            "{} of {} host actions failed",
            transcript.failures(),
            transcript.len()
        );
    }
    Ok(())
}

async fn tour(
    config: Config,
    plugins: Option<PathBuf>,
    freeze: hvisd::sim::tour::FreezeSetup,
    json: bool,
) -> Result<()> {
    use hvisd::sim::tour;
    let dir = tour::find_example_plugins(plugins.as_deref()).map_err(anyhow::Error::msg)?;
    // The plugins' data and the VSS journal: on a tmpfs when there is one, which no backup
    // freezes (so the example hook's directory is never on a frozen file system).
    let state = tempfile::Builder::new()
        .prefix("hvisd-sim")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())?;
    let config =
        tour::tour_config(config, &dir, state.path(), &freeze).map_err(anyhow::Error::msg)?;
    let report = tour::run(config, &freeze, dir.display().to_string()).await?;
    let text = if json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report.render()
    };
    print(text)?;
    if !report.ok() {
        bail!(
            "{} of {} tour steps failed",
            report.failed,
            report.steps.len()
        );
    }
    Ok(())
}

async fn sim(script: Option<PathBuf>, root: Option<PathBuf>, config: Config) -> Result<()> {
    let script = match script {
        Some(path) => hvisd::sim::Script::load(&path)?,
        None => hvisd::sim::Script::tour(),
    };
    let transcript = hvisd::sim::run_embedded(&script, root.as_deref(), config).await?;
    print_line(&serde_json::to_string_pretty(&transcript)?)?;
    if !transcript.ok() {
        bail!(
            "{} of {} host actions failed",
            transcript.failures(),
            transcript.len()
        );
    }
    Ok(())
}

fn vss_plan(config: Option<&PathBuf>, json: bool) -> Result<()> {
    let config = load_config(config)?;
    let policy = config.vss.policy.compile().context("[vss.policy]")?;
    let mounts = hvisd_vss::system::read_mounts()?;
    let plan = hvisd_vss::plan(&mounts, &policy);
    let policy_plugins: Vec<&str> = config
        .plugin
        .iter()
        .filter(|m| m.worlds.contains(&hvisd_plugin_host::World::FreezePolicy))
        .map(|m| m.name.as_str())
        .collect();
    if json {
        print_line(&serde_json::to_string_pretty(&serde_json::json!({
            "plan": plan,
            "freeze_policy_plugins": policy_plugins,
        }))?)?;
    } else {
        print(plan.to_string())?;
        if !policy_plugins.is_empty() {
            print_line(&format!(
                "\nAt backup time the freeze-policy plugin {} may narrow or reorder this (never widen it).",
                policy_plugins.join(", ")
            ))?;
        }
    }
    Ok(())
}

fn plugin_check(
    file: &std::path::Path,
    config: Option<&std::path::Path>,
    plugin: Option<&str>,
    json: bool,
) -> Result<()> {
    let manifest =
        match (config, plugin) {
            (Some(path), Some(name)) => {
                let config = Config::load(path)?;
                let found = config.plugin.into_iter().find(|m| m.name == name);
                Some(found.with_context(|| {
                    format!("{} has no [[plugin]] named {name:?}", path.display())
                })?)
            }
            _ => None,
        };
    let report = match hvisd_plugin_host::check(file, manifest.as_ref()) {
        Ok(report) => report,
        Err(e) if json => {
            // Scripts get the failure in the shape they asked for, as well as the error line.
            print_line(&serde_json::to_string_pretty(&serde_json::json!({
                "path": file,
                "ok": false,
                "error": e.to_string(),
            }))?)?;
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        print_line(&serde_json::to_string_pretty(&report)?)?;
    } else {
        print(report.to_string())?;
    }
    if !report.ok() {
        bail!("{} is not accepted", file.display());
    }
    Ok(())
}
