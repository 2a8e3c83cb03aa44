//! The `lhnet-proxy` command: run the sidecar, check a config, print the storage address.
// One unsafe call, in `purge_freed_memory_at_once`: setting a mimalloc option (FFI).
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand, ValueEnum};
use lhnet_proxy::app::{self, Options, RunningProxy};
use lhnet_proxy::config::Config;

#[derive(Parser)]
#[command(
    name = "lhnet-proxy",
    version,
    about = "Storage-network sidecar for Longhorn IM/BIM pods"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The YAML config file (reloaded on SIGHUP and when the file changes).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Worker threads for the data plane (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(clap::Args, Clone)]
struct LogArgs {
    /// Log line format: text for people, json for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum InjectMode {
    Sidecar,
    Capture,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file; prints every error with its path and exits non-zero.
    CheckConfig { file: PathBuf },
    /// Add lhnet to instance-manager and backing-image-manager pods in YAML (stdin or -f),
    /// like `linkerd inject`; every other document is written back unchanged.
    Inject {
        /// The NetworkAttachmentDefinition of the storage network, NAMESPACE/NAME: adds the
        /// Multus annotation exactly as Longhorn writes it.
        #[arg(long)]
        storage_network: Option<String>,
        /// sidecar: lhnet on its own ports (8510/8511); capture: also redirect 8500/8501 to it.
        #[arg(long, value_enum, default_value_t = InjectMode::Sidecar)]
        mode: InjectMode,
        /// The lhnet-proxy image.
        #[arg(long)]
        image: Option<String>,
        /// The ConfigMap with lhnet's config.yaml.
        #[arg(long, default_value = "lhnet-sidecar")]
        config_map: String,
        /// Read this file instead of stdin.
        #[arg(short = 'f', long = "filename")]
        file: Option<PathBuf>,
    },
    /// Mutating admission webhook (AdmissionReview v1, HTTPS) doing what `inject` does, at pod
    /// CREATE. Reloads a renewed certificate without a restart.
    Webhook {
        /// Where to listen (HTTPS).
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        #[arg(long)]
        tls_cert: PathBuf,
        #[arg(long)]
        tls_key: PathBuf,
        /// Injection settings (YAML: image, mode, storage_network, config_map, cpu, memory).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Capture-mode init container: redirect connections from outside the pod on FROM to lhnet
    /// on TO (nftables, in the pod's network namespace; needs NET_ADMIN). Idempotent.
    Capture {
        /// FROM:TO, e.g. 8500:8510 (repeat for each port).
        #[arg(long = "redirect")]
        redirects: Vec<String>,
        /// Remove the rules instead.
        #[arg(long)]
        remove: bool,
    },
    /// Make a CA and a serving certificate for the webhook's Service (no cert-manager needed).
    WebhookCert {
        #[arg(long, default_value = "lhnet-injector")]
        service: String,
        #[arg(long, default_value = "longhorn-system")]
        namespace: String,
        /// Folder for ca.crt, tls.crt and tls.key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the storage address and where it came from (for scripts).
    StorageAddress {
        /// Read storage_network from this config (default: interface lhnet1, fallback pod_ip).
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
        /// Print JSON instead of "IP SOURCE".
        #[arg(long)]
        json: bool,
    },
}

// glibc's malloc spent ~10% of the proxy's CPU in malloc_consolidate under small-call load
// (perf, lhnet-loadtest bench); mimalloc does not.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (`mi_option_purge_delay` in mimalloc.h, v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has mimalloc give freed pages back to the system at once instead of after its default
/// delay (1 s in mimalloc v3). mimalloc purges only on a later allocator call, so with the
/// delay a proxy that sits waiting on open calls after a burst kept ~11 MiB it no longer used
/// resident (`lhnet-loadtest bench-footprint`, docs/benchmarks.md). An operator who sets
/// `MIMALLOC_PURGE_DELAY` (or its old name `MIMALLOC_RESET_DELAY`) keeps their value.
#[allow(unsafe_code)]
fn purge_freed_memory_at_once() {
    if purge_delay_set_by_operator() {
        return;
    }
    // SAFETY: mi_option_set takes an option index and a value, touches only mimalloc's own
    // option table, and may be called at any time; 15 is purge_delay in the bundled mimalloc.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
}

fn purge_delay_set_by_operator() -> bool {
    std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
        || std::env::var_os("MIMALLOC_RESET_DELAY").is_some()
}

fn main() -> ExitCode {
    purge_freed_memory_at_once();
    let cli = Cli::parse();
    init_logging(&cli.run.log);
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::StorageAddress { config, json }) => storage_address(config.as_deref(), json),
        Some(Command::Inject {
            storage_network,
            mode,
            image,
            config_map,
            file,
        }) => inject(storage_network, mode, image, config_map, file),
        Some(Command::Webhook {
            listen,
            tls_cert,
            tls_key,
            config,
        }) => webhook(listen, tls_cert, tls_key, config),
        Some(Command::Capture { redirects, remove }) => capture(&redirects, remove),
        Some(Command::WebhookCert {
            service,
            namespace,
            out,
        }) => match lhnet_proxy::inject::webhook::make_certs(&service, &namespace, &out) {
            Ok(files) => {
                println!(
                    "wrote {}, {}, {}\ncaBundle: {}",
                    files.ca.display(),
                    files.cert.display(),
                    files.key.display(),
                    files.ca_bundle
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lhnet-proxy webhook-cert: {e}");
                ExitCode::FAILURE
            }
        },
        None => run(cli.run),
    }
}

fn capture(redirects: &[String], remove: bool) -> ExitCode {
    use lhnet_proxy::inject::capture;
    let result = if remove {
        capture::remove()
    } else {
        redirects
            .iter()
            .map(|r| capture::parse_redirect(r))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|rs| capture::install(&rs).map(|()| rs))
            .map(|rs| {
                for r in rs {
                    println!("capturing: tcp {} from outside the pod -> {}", r.from, r.to);
                }
            })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lhnet-proxy capture: {e}");
            ExitCode::FAILURE
        }
    }
}

fn webhook(
    listen: std::net::SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    config: Option<PathBuf>,
) -> ExitCode {
    let opts = match config {
        Some(path) => match lhnet_proxy::inject::InjectSettings::load(&path) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("lhnet-proxy webhook: {e}");
                return ExitCode::from(2);
            }
        },
        None => lhnet_proxy::inject::InjectOptions::default(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lhnet-proxy webhook: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let result = runtime.block_on(async {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
            stop.cancel();
        });
        lhnet_proxy::inject::webhook::run(listen, cert, key, opts, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lhnet-proxy webhook: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inject(
    storage_network: Option<String>,
    mode: InjectMode,
    image: Option<String>,
    config_map: String,
    file: Option<PathBuf>,
) -> ExitCode {
    use lhnet_proxy::inject::{self, InjectOptions, Mode};
    let mut opts = InjectOptions {
        mode: match mode {
            InjectMode::Sidecar => Mode::Sidecar,
            InjectMode::Capture => Mode::Capture,
        },
        config_map,
        ..Default::default()
    };
    if let Some(image) = image {
        opts.image = image;
    }
    if let Some(text) = storage_network {
        match inject::parse_storage_network(&text) {
            Ok(nad) => opts.storage_network = Some(nad),
            Err(e) => {
                eprintln!("lhnet-proxy inject: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let read = match &file {
        Some(path) => std::fs::File::open(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|f| read_limited(f, &path.display().to_string())),
        None => read_limited(std::io::stdin(), "stdin"),
    };
    let input = match read {
        Ok(text) => text,
        Err(e) => {
            eprintln!("lhnet-proxy inject: {e}");
            return ExitCode::FAILURE;
        }
    };
    match inject::transform(&input, &opts) {
        Ok(out) => {
            for note in &out.notes {
                eprintln!("{note}");
            }
            print!("{}", out.output);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lhnet-proxy inject: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Reads UTF-8 text, refusing more than `inject::MAX_INPUT` bytes.
fn read_limited(source: impl std::io::Read, name: &str) -> Result<String, String> {
    use std::io::Read;
    let limit = lhnet_proxy::inject::MAX_INPUT;
    let mut buf = Vec::new();
    source
        .take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{name}: {e}"))?;
    if buf.len() > limit {
        return Err(format!(
            "{name}: more than {limit} bytes; inject reads at most that"
        ));
    }
    String::from_utf8(buf).map_err(|_| format!("{name}: not UTF-8 text"))
}

fn init_logging(args: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&args.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn pod_ip() -> Option<IpAddr> {
    let raw = std::env::var("POD_IP").ok()?;
    match raw.trim().parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            tracing::warn!(value = %raw, "POD_IP is not an IP address; ignoring it");
            None
        }
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprint!("{errors}");
        ExitCode::from(2)
    })
}

fn check_config(file: &Path) -> ExitCode {
    match load(file) {
        Ok(config) => {
            let summary = lhnet_proxy::config::summary(&config);
            println!(
                "{}: ok ({} listeners, {} routes, {} clusters)",
                file.display(),
                summary["listeners"],
                summary["routes"],
                summary["clusters"]
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn storage_address(config: Option<&Path>, json: bool) -> ExitCode {
    let storage = match config {
        Some(path) => match load(path) {
            Ok(c) => c.storage_network,
            Err(code) => return code,
        },
        None => match Config::parse("listeners: []", "defaults") {
            Ok(c) => c.storage_network,
            Err(e) => {
                eprint!("{e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let spec = lhnet_netns::StorageNetworkSpec {
        interface: storage.interface,
        network: storage.network,
        network_status_file: storage.network_status_file,
        fallback: storage.fallback,
        pod_ip: pod_ip(),
    };
    match lhnet_netns::discover(&spec) {
        Ok(addr) if json => {
            println!("{}", serde_json::to_string(&addr).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(addr) => {
            println!("{} {}", addr.ip, addr.source);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lhnet-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let Some(path) = args.config else {
        eprintln!("lhnet-proxy: --config FILE is required (see examples/im.yaml); lhnet-proxy --help lists the commands");
        return ExitCode::from(2);
    };
    // The file as it was when read: a change from then on is a reload, also one made while
    // lhnet was still starting (before the watcher's first look).
    let read_at = config_stamp(&path);
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    // One data-plane thread: a current-thread runtime, with no work-stealing machinery.
    let mut builder = match args.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n.max(1));
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().thread_name("lhnet-worker");
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lhnet-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let proxy = match app::start(config, Options { pod_ip: pod_ip() }).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::spawn(watch_config(
            proxy.reloader(),
            path,
            read_at,
            proxy.shutdown_token(),
        ));
        wait_for_signal(&proxy).await;
        tracing::info!("shutting down: no new connections, draining in-flight streams");
        proxy.shutdown().await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

/// Returns on SIGTERM, SIGINT or `POST /shutdown`.
async fn wait_for_signal(proxy: &RunningProxy) {
    use tokio::signal::unix::{signal, SignalKind};
    let token = proxy.shutdown_token();
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; only POST /shutdown stops the proxy");
        token.cancelled().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
        _ = token.cancelled() => {}
    }
}

/// What tells a changed config file: its modification time and length.
fn config_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reloads the config on SIGHUP and when the file changes (a ConfigMap update replaces it).
async fn watch_config(
    reloader: app::Reloader,
    path: PathBuf,
    read_at: Option<(SystemTime, u64)>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut last = read_at;
    loop {
        let by_signal = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
            _ = tokio::time::sleep(Duration::from_secs(2)) => false,
        };
        let now = config_stamp(&path);
        if !by_signal && now == last {
            continue;
        }
        last = now;
        // Parsed on a blocking thread: a hostile or huge file must not stall the runtime
        // threads that serve calls meanwhile.
        let file = path.clone();
        let loaded = match tokio::task::spawn_blocking(move || Config::load(&file)).await {
            Ok(loaded) => loaded,
            Err(e) => {
                reloader.reject();
                tracing::error!(file = %path.display(), "config not reloaded: parsing it failed: {e}");
                continue;
            }
        };
        match loaded {
            Ok(config) => match reloader.reload(config) {
                Ok(()) => tracing::info!(file = %path.display(), "config reloaded"),
                Err(e) => tracing::error!(file = %path.display(), "config not reloaded: {e}"),
            },
            Err(errors) => {
                reloader.reject();
                tracing::error!(file = %path.display(), "config not reloaded, keeping the running one:\n{errors}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Index 15 is purge_delay in the mimalloc this binary links: its default (1000 ms in v3,
    /// 10 ms in v2) before the call, 0 after it.
    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_the_one_set() {
        assert!(
            !purge_delay_set_by_operator(),
            "unset MIMALLOC_PURGE_DELAY and MIMALLOC_RESET_DELAY to run this test"
        );
        // SAFETY: reads mimalloc's option table.
        let before = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert!(
            before == 1000 || before == 10,
            "option 15 is not purge_delay: it reads {before}"
        );
        purge_freed_memory_at_once();
        // SAFETY: as above.
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, 0);
    }
}
