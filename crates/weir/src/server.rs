//! `weir server`: runs a node, on the embedded SQLite store by default or, with
//! `--store postgres://…`, as one node of a cluster sharing a PostgreSQL database.
//!
//! Settings come from, in order of precedence: command-line flags, environment
//! variables (`WEIR_*`), a `weir.toml` file, and the defaults below.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use weir_engine::{ClusterConfig, Config, Engine, TokioClock};
use weir_store::{PostgresStore, SqliteStore, Store, PARTITION_COUNT_DEFAULT};

/// Default listen address: loopback only, so a fresh node is not exposed.
const LISTEN_DEFAULT: &str = "127.0.0.1:7600";
/// Default data directory.
const DATA_DIR_DEFAULT: &str = "./weir-data";
/// Default configuration file, read when present.
const CONFIG_FILE_DEFAULT: &str = "weir.toml";

/// Flags of `weir server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Data directory of the embedded store (default ./weir-data).
    #[arg(long, env = "WEIR_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A shared store instead of the data directory: `postgres://USER@HOST:PORT/DB`.
    /// Every node of a cluster names the same database.
    #[arg(long, env = "WEIR_STORE")]
    store: Option<String>,
    /// URL other nodes use to reach this one (default http://LISTEN).
    #[arg(long, env = "WEIR_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Standby node: takes no partitions while --min-active active nodes live.
    #[arg(long, env = "WEIR_STANDBY")]
    standby: bool,
    /// Active nodes that must live before standbys stay idle (default 1).
    #[arg(long, env = "WEIR_MIN_ACTIVE")]
    min_active: Option<u32>,
    /// Heartbeat interval, in ms (default 500).
    #[arg(long, env = "WEIR_HEARTBEAT_MS")]
    heartbeat_ms: Option<u64>,
    /// Failure-detection timeout and partition lease period, in ms (default 2000).
    #[arg(long, env = "WEIR_FAILURE_TIMEOUT_MS")]
    failure_timeout_ms: Option<u64>,
    /// Virtual nodes per node on the placement ring (default 128).
    #[arg(long, env = "WEIR_VNODES")]
    vnodes: Option<u32>,
    /// Address to listen on (default 127.0.0.1:7600).
    #[arg(long, env = "WEIR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Configuration file (default ./weir.toml when it exists).
    #[arg(long, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// This node's name (default node-1).
    #[arg(long, env = "WEIR_NODE_ID")]
    node_id: Option<String>,
    /// Partitions of a new store, fixed once created (default: 1 per core, from 2 to 64,
    /// for the embedded store; 64 for PostgreSQL).
    #[arg(long, env = "WEIR_PARTITIONS")]
    partitions: Option<u32>,
    /// How long a worker holds a task without a heartbeat, in ms (default 30000).
    #[arg(long, env = "WEIR_TASK_LEASE_MS")]
    task_lease_ms: Option<u64>,
    /// Largest request body, in bytes (default 1048576).
    #[arg(long, env = "WEIR_BODY_SIZE_MAX")]
    body_size_max: Option<usize>,
    /// Threads of the async runtime that serves HTTP and runs the partitions (default:
    /// one per core but one, at least 1; the store's committer thread has the last).
    #[arg(long, env = "WEIR_RUNTIME_THREADS")]
    runtime_threads: Option<usize>,
}

/// `weir.toml`: the same settings as the flags, in snake case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    store: Option<String>,
    advertise_url: Option<String>,
    standby: Option<bool>,
    min_active: Option<u32>,
    heartbeat_ms: Option<u64>,
    failure_timeout_ms: Option<u64>,
    vnodes: Option<u32>,
    listen: Option<SocketAddr>,
    node_id: Option<String>,
    partitions: Option<u32>,
    task_lease_ms: Option<u64>,
    body_size_max: Option<usize>,
    runtime_threads: Option<usize>,
}

/// Settings after merging flags, environment, file and defaults.
#[derive(Debug)]
struct Settings {
    data_dir: PathBuf,
    store: Option<String>,
    cluster: ClusterConfig,
    listen: SocketAddr,
    node_id: String,
    partitions: u32,
    task_lease: Duration,
    body_size_max: usize,
    runtime_threads: usize,
}

fn settings(args: ServerArgs) -> anyhow::Result<Settings> {
    let file = match &args.config {
        Some(path) => read_config(path)?,
        None if Path::new(CONFIG_FILE_DEFAULT).exists() => {
            read_config(Path::new(CONFIG_FILE_DEFAULT))?
        }
        None => FileConfig::default(),
    };
    let listen = match args.listen.or(file.listen) {
        Some(listen) => listen,
        None => LISTEN_DEFAULT.parse().expect("the default address parses"),
    };
    let defaults = ClusterConfig::default();
    let cluster = ClusterConfig {
        url: args
            .advertise_url
            .or(file.advertise_url)
            .unwrap_or_else(|| format!("http://{listen}")),
        standby: args.standby || file.standby.unwrap_or(false),
        min_active: args
            .min_active
            .or(file.min_active)
            .unwrap_or(defaults.min_active),
        heartbeat: args
            .heartbeat_ms
            .or(file.heartbeat_ms)
            .map_or(defaults.heartbeat, Duration::from_millis),
        failure_timeout: args
            .failure_timeout_ms
            .or(file.failure_timeout_ms)
            .map_or(defaults.failure_timeout, Duration::from_millis),
        vnodes: args.vnodes.or(file.vnodes).unwrap_or(defaults.vnodes),
    };
    let store_given = args.store.is_some() || file.store.is_some();
    let settings = Settings {
        data_dir: args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| DATA_DIR_DEFAULT.into()),
        store: args.store.or(file.store),
        cluster,
        listen,
        node_id: args
            .node_id
            .or(file.node_id)
            .unwrap_or_else(|| "node-1".into()),
        partitions: args
            .partitions
            .or(file.partitions)
            .unwrap_or_else(|| default_partitions(store_given)),
        task_lease: Duration::from_millis(
            args.task_lease_ms.or(file.task_lease_ms).unwrap_or(30_000),
        ),
        body_size_max: args
            .body_size_max
            .or(file.body_size_max)
            .unwrap_or(1024 * 1024),
        runtime_threads: args
            .runtime_threads
            .or(file.runtime_threads)
            .unwrap_or_else(default_runtime_threads),
    };
    if settings.partitions == 0 || settings.partitions > weir_store::PARTITION_COUNT_MAX {
        bail!(
            "partitions must be from 1 to {}",
            weir_store::PARTITION_COUNT_MAX
        );
    }
    if settings.task_lease < Duration::from_millis(100) {
        bail!(
            "task_lease_ms must be at least 100: shorter leases expire before workers can answer"
        );
    }
    if let Some(store) = &settings.store {
        if !store.starts_with("postgres://") && !store.starts_with("postgresql://") {
            bail!("--store must be a postgres:// URL (leave it out for the embedded store in --data-dir)");
        }
    }
    if settings.cluster.heartbeat < Duration::from_millis(50) {
        bail!("heartbeat_ms must be at least 50");
    }
    if settings.cluster.failure_timeout < settings.cluster.heartbeat * 3 {
        bail!(
            "failure_timeout_ms must be at least 3 heartbeats ({} ms): one late heartbeat must not lose leases",
            settings.cluster.heartbeat.as_millis() * 3
        );
    }
    if settings.cluster.min_active == 0 {
        bail!("min_active must be at least 1");
    }
    if settings.cluster.vnodes == 0 || settings.cluster.vnodes > weir_engine::ring::VNODES_MAX {
        bail!("vnodes must be from 1 to {}", weir_engine::ring::VNODES_MAX);
    }
    if settings.runtime_threads == 0 || settings.runtime_threads > RUNTIME_THREADS_MAX {
        bail!("runtime_threads must be from 1 to {RUNTIME_THREADS_MAX}");
    }
    if settings.body_size_max < 1024 {
        bail!("body_size_max must be at least 1024 bytes");
    }
    weir_engine::check_id("node id", &settings.node_id).map_err(|err| anyhow::anyhow!("{err}"))?;
    Ok(settings)
}

fn read_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text)
        .with_context(|| format!("{} is not a valid weir configuration", path.display()))
}

/// Runs a node until Ctrl-C or SIGTERM.
pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    init_logging();
    let settings = settings(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.runtime_threads)
        .enable_all()
        .thread_name("weir")
        .build()
        .context("starting the runtime")?;
    runtime.block_on(serve(settings))
}

/// Connections the kernel queues for the server before it accepts them. The standard
/// library's 128 overflowed when a few hundred clients and workers connected at once
/// (`ListenOverflows` in `nstat`): each dropped SYN cost its client a one-second
/// retransmission timeout. The kernel caps it at `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 4096;

fn listen(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As the standard library's bind does: a restarted server can bind at once while
    // connections of its previous run linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(ACCEPT_BACKLOG)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let partitions = settings.partitions;
    let store: Arc<dyn Store> = match settings.store.clone() {
        None => {
            let data_dir = settings.data_dir.clone();
            let store =
                tokio::task::spawn_blocking(move || SqliteStore::open(&data_dir, partitions))
                    .await?
                    .with_context(|| {
                        format!("opening data directory {}", settings.data_dir.display())
                    })?;
            Arc::new(store)
        }
        Some(url) => {
            let store =
                tokio::task::spawn_blocking(move || PostgresStore::connect(&url, partitions))
                    .await?
                    .context("connecting to the PostgreSQL store")?;
            Arc::new(store)
        }
    };
    if store.partition_count() != settings.partitions {
        tracing::info!(
            stored = store.partition_count(),
            "the store keeps the partition count it was created with"
        );
    }
    let listener =
        listen(settings.listen).with_context(|| format!("listening on {}", settings.listen))?;
    let config = Config {
        node_id: settings.node_id.clone(),
        task_lease: settings.task_lease,
        cluster: settings.cluster.clone(),
    };
    let engine = Engine::start(store, config, Arc::new(TokioClock::new()))
        .await
        .map_err(|err| anyhow::anyhow!("starting the engine: {err}"))?;
    tracing::info!(
        listen = %settings.listen,
        store = %settings
            .store
            .as_deref()
            .map_or_else(|| settings.data_dir.display().to_string(), redact_password),
        node = %settings.node_id,
        url = %settings.cluster.url,
        standby = settings.cluster.standby,
        "weir server ready"
    );
    let limits = weir_api::Limits {
        body_size_max: settings.body_size_max,
        ..weir_api::Limits::default()
    };
    let draining = engine.clone();
    let shutdown = async move {
        shutdown_signal().await;
        draining.stop_polls();
    };
    weir_api::serve(listener, engine.clone(), limits, shutdown)
        .await
        .context("serving the API")?;
    tracing::info!("API stopped; stopping the engine");
    engine.shutdown().await;
    Ok(())
}

/// Partitions per core of a new embedded store by default.
///
/// A partition is one actor: its commands run one after another and its batch is
/// committed as one. On one machine, enough actors to keep every core busy is all
/// the parallelism there is; more only split the same work into smaller batches
/// (on 2 cores, `seq` at 256 in flight ran about 10,000 steps/s with 64 partitions,
/// 12,200 with 8, and, once the start path no longer blocked, 13,200 with 8, 13,700
/// with 4, 14,600 with 2 and 14,100 with 1, where one actor is the limit; at 16 and
/// 64 in flight 2 was ahead too). A PostgreSQL store keeps 64: there, partitions are
/// also what moves between nodes, and finer ones balance better.
const EMBEDDED_PARTITIONS_PER_CORE: u32 = 1;
/// Fewest and most partitions of a new embedded store by default.
const EMBEDDED_PARTITIONS_MIN: u32 = 2;
const EMBEDDED_PARTITIONS_MAX: u32 = PARTITION_COUNT_DEFAULT;

/// The partition count of a new store when none is configured.
/// The most runtime threads a node may be given.
const RUNTIME_THREADS_MAX: usize = 1024;

/// One runtime thread per core but one, and at least one: the store's committer thread,
/// which spends a step's commit in SQLite's b-trees and the fsync, gets a core of its
/// own. Fewer runtime threads also hand a request, its partition and its answer
/// between fewer threads: on 2 cores, one runtime thread (and one in the example worker)
/// made steps at one instance in flight 10–13% faster and left throughput at 16 to 256
/// in flight where it was (BENCHMARKS.md, "Fifth optimisation pass").
fn default_runtime_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_sub(1).max(1)
}

fn default_partitions(postgres: bool) -> u32 {
    if postgres {
        return PARTITION_COUNT_DEFAULT;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cores = u32::try_from(cores).unwrap_or(u32::MAX);
    cores
        .saturating_mul(EMBEDDED_PARTITIONS_PER_CORE)
        .clamp(EMBEDDED_PARTITIONS_MIN, EMBEDDED_PARTITIONS_MAX)
}

/// A store URL fit for logs: no password.
fn redact_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_partitions_follow_the_store() {
        assert_eq!(default_partitions(true), PARTITION_COUNT_DEFAULT);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let embedded = default_partitions(false);
        assert_eq!(
            embedded,
            (cores * EMBEDDED_PARTITIONS_PER_CORE)
                .clamp(EMBEDDED_PARTITIONS_MIN, EMBEDDED_PARTITIONS_MAX)
        );
        assert!((EMBEDDED_PARTITIONS_MIN..=EMBEDDED_PARTITIONS_MAX).contains(&embedded));
    }

    /// The server's flags, as `weir server` parses them.
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        server: ServerArgs,
    }

    fn settings_of(flags: &[&str]) -> anyhow::Result<Settings> {
        use clap::Parser;
        let flags = Flags::try_parse_from(std::iter::once("weir").chain(flags.iter().copied()))?;
        settings(flags.server)
    }

    #[test]
    fn runtime_threads_leave_a_core_to_the_committer_and_can_be_set() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(default_runtime_threads(), (cores - 1).max(1));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("weir.toml");
        std::fs::write(&file, "runtime_threads = 3\n").unwrap();
        let config = file.to_str().unwrap();
        let from_file = settings_of(&["--config", config]).unwrap();
        assert_eq!(from_file.runtime_threads, 3);
        let from_flag = settings_of(&["--config", config, "--runtime-threads", "2"]).unwrap();
        assert_eq!(from_flag.runtime_threads, 2, "a flag wins over the file");
        let refused = settings_of(&["--config", config, "--runtime-threads", "0"]).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("runtime_threads must be from 1 to"),
            "{refused:#}"
        );
    }
}
