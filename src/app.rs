//! `Application`: builds the server from a `Config` (store, hub, router,
//! listener), reports its address, and runs until told to stop, then shuts
//! every task down within a bounded time.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, RedisConfig};
use crate::config::{Config, Secret};
use crate::http::{AppState, Settings, router};
use crate::metrics::{Connections, Metrics};
use crate::server::Stopping;
use crate::store::{OpenError, Store};
use crate::topic::Hub;

/// How long shutdown waits, once the drain is over and accepting has
/// stopped, for connections to say goodbye before it stops waiting. Each
/// reader was told to go at its moment in the window and needs at most its
/// close grace.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: io::Error,
    },
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] OpenError),
    /// The store could not be read at start.
    #[error("cannot load topics from the store: {0}")]
    Load(#[from] sqlx::Error),
}

/// A built, not yet running, server.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    state: AppState,
    local_addr: SocketAddr,
    /// Set when no token was configured: the generated one, to show once.
    generated_token: Option<Secret>,
    /// Whether to run the simulated match.
    demo: bool,
    /// This hub's name, reported on the operator page.
    hub_id: String,
}

impl Application {
    /// Opens the store, loads every topic into the hub and binds the listener.
    pub async fn build(config: &Config) -> Result<Self, StartError> {
        // Bind first: until the store is loaded the port answers probes
        // (`/healthz` alive, `/readyz` not ready) and turns everything else
        // away with a hint, instead of refusing connections.
        let listener = bind(config.listen).map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
        tracing::info!("bound {local_addr}; not ready until the store is loaded");
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let loaded = CancellationToken::new();
        let starting = crate::server::run(
            &listener,
            crate::http::starting_router(),
            config.header_timeout,
            Stopping { draining: loaded.clone(), stop_accepting: loaded.clone() },
            TaskTracker::new(),
        );
        let open = async {
            let opened = open_and_load(config, &tasks, shutdown.clone()).await;
            loaded.cancel();
            opened
        };
        let (served, opened) = tokio::join!(starting, open);
        served.map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let (store, loaded) = opened?;
        let hub = Hub::new();
        let count = loaded.len();
        for snapshot in loaded {
            hub.apply(snapshot);
        }
        if store.is_shared() {
            tracing::info!(topics = count, "store opened (PostgreSQL)");
        } else {
            tracing::info!(topics = count, data_dir = %config.data_dir.display(), "store opened (SQLite, WAL, synchronous=FULL)");
        }
        let hub_id = config.hub_id.clone().unwrap_or_else(default_hub_id);
        let bus = match &config.redis_url {
            Some(url) => {
                let redis = RedisConfig {
                    url: url.expose().to_string(),
                    prefix: config.redis_prefix.clone(),
                    hub_id: hub_id.clone(),
                };
                let bus = Bus::redis(
                    redis.clone(),
                    hub.clone(),
                    store.clone(),
                    config.reconcile_interval,
                    &tasks,
                    shutdown.clone(),
                );
                tasks.spawn(crate::ingest::run(
                    redis,
                    config.ingest_max_len,
                    config.max_topics,
                    hub.clone(),
                    store.clone(),
                    bus.clone(),
                    shutdown.clone(),
                ));
                tracing::info!(prefix = %config.redis_prefix, "joined the Redis bus; ingesting the Redis stream");
                bus
            }
            None => {
                if store.is_shared() {
                    // Without a bus, hubs on one database still converge
                    // through the reconciler.
                    let bus = Bus::in_process();
                    tasks.spawn(crate::bus::reconcile_only(
                        hub.clone(),
                        store.clone(),
                        config.reconcile_interval,
                        bus.stats().clone(),
                        shutdown.clone(),
                    ));
                    bus
                } else {
                    Bus::in_process()
                }
            }
        };

        let (publish_tokens, generated_token) = if config.publish_tokens.is_empty() {
            let token = generate_token();
            (vec![token.clone()], Some(token))
        } else {
            (config.publish_tokens.clone(), None)
        };
        let settings = Settings {
            publish_tokens,
            max_body: config.max_body,
            write_timeout: config.write_timeout,
            heartbeat: config.heartbeat,
            socket_send_buffer: config.socket_send_buffer,
            cache_max_age: config.cache_max_age,
            max_wait: config.max_wait,
            max_topics_per_connection: config.max_topics_per_connection,
            allowed_origins: (!config.allow_origins.is_empty() && !config.allow_origins.iter().any(|o| o == "*"))
                .then(|| config.allow_origins.iter().map(|o| o.trim_end_matches('/').to_string()).collect()),
            disable_websocket: config.disable_websocket,
            header_timeout: config.header_timeout,
            trusted_proxies: config.trusted_proxies.clone(),
            max_topics: config.max_topics,
            max_staleness: config.max_staleness,
            drain_window: config.drain_window,
            admin_token: config.admin_token.clone(),
        };
        let metrics = Arc::new(Metrics::default());
        let state = AppState {
            hub,
            store,
            bus,
            settings: Arc::new(settings),
            connections: Arc::new(Connections::new(Arc::clone(&metrics))),
            metrics,
            admission: crate::admission::Admission::new(
                config.max_connections,
                config.max_connections_per_ip,
                config.accept_rate,
                config.accept_burst,
            ),
            shutdown,
            tasks,
        };
        let limits = crate::memory::Limits::new(config.send_budget as u64, config.memory_limit as u64);
        state.tasks.spawn(crate::memory::run(
            limits,
            Arc::clone(&state.metrics),
            Arc::clone(&state.connections),
            Arc::clone(&state.admission),
            state.shutdown.clone(),
        ));
        Ok(Self { listener, state, local_addr, generated_token, demo: config.demo, hub_id })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `stop` resolves, then shuts down: stops accepting, tells
    /// every reader (close `1001` with a reconnect hint), finishes queued
    /// commits, and returns within a bounded time.
    pub async fn run_until_stopped(self, stop: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let Self { listener, state, local_addr, generated_token, demo, hub_id } = self;
        if let Some(token) = generated_token {
            // Shown once, on the terminal, never in the logs.
            eprintln!(
                "\nNo --publish-token was given, so this run accepts a generated one:\n\n  {token}\n\n\
                 Publish a state with:\n\n  curl -X PUT http://{local_addr}/v1/topics/demo \\\n    \
                 -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\\n    \
                 -d '{{\"home\":{{\"name\":\"Home\",\"score\":0}},\"away\":{{\"name\":\"Away\",\"score\":0}}}}'\n",
                token = token.expose()
            );
        }
        tracing::info!("listening on {local_addr}");
        let shutdown = state.shutdown.clone();
        let tasks = state.tasks.clone();
        let drain_window = state.settings.drain_window;
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            stop.await;
            tracing::info!("shutting down");
            trigger.cancel();
        });
        if demo {
            tasks.spawn(crate::demo::run(state.store.clone(), state.hub.clone(), state.bus.clone(), shutdown.clone()));
            tracing::info!("demo mode: a simulated match is live at http://{local_addr}/t/demo");
        }
        if state.settings.admin_token.is_some() {
            // Only the operator page reads the stats topic: without it, no task.
            tasks.spawn(crate::stats::run(crate::stats::Sources::from_state(&state, Some(hub_id)), shutdown.clone()));
        }
        // Accepting goes on while readers drain, so that `/readyz` can say so
        // and snapshot reads are still served; it stops once every reader has
        // gone or the window (plus a second of grace) has passed.
        let stop_accepting = CancellationToken::new();
        {
            let (draining, stop, admission) = (shutdown.clone(), stop_accepting.clone(), Arc::clone(&state.admission));
            tokio::spawn(async move {
                draining.cancelled().await;
                let deadline = tokio::time::Instant::now() + drain_window + Duration::from_secs(1);
                while admission.open_now() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                stop.cancel();
            });
        }
        // Returns once accepting has stopped; every connection is a task in
        // `tasks`, so the wait below covers them too.
        let header_timeout = state.settings.header_timeout;
        let stopping = Stopping { draining: shutdown.clone(), stop_accepting };
        let result = crate::server::run(&listener, router(state), header_timeout, stopping, tasks.clone()).await;
        drop(listener);
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_BOUND, tasks.wait()).await.is_err() {
            tracing::warn!(remaining = tasks.len(), "shutdown bound reached; dropping what is left");
        }
        tracing::info!("stopped");
        result
    }
}

/// The listen backlog asked for (the kernel caps it at `net.core.somaxconn`,
/// 4096 on current Linux). tokio's default of 1024 overflows in a reconnect
/// storm, and an overflowing queue drops handshakes, which clients see as
/// timeouts instead of the quick 503 and hint that admission would give.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listener with reuse of the address and a storm-sized backlog.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long a shared store may stay unreachable at start before the process
/// gives up. Meanwhile it stays up and unready, which is what an orchestrator
/// expects of a service whose database is still coming up.
const STORE_START_PATIENCE: Duration = Duration::from_secs(300);

/// Opens the store (retrying a PostgreSQL server that cannot be reached yet)
/// and reads every topic from it.
async fn open_and_load(
    config: &Config,
    tasks: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<(Store, Vec<crate::topic::Snapshot>), StartError> {
    let Some(url) = &config.database_url else {
        let store = Store::open_sqlite(&config.data_dir, tasks, shutdown).await?;
        let loaded = store.load_all().await?;
        return Ok((store, loaded));
    };
    let give_up = tokio::time::Instant::now() + STORE_START_PATIENCE;
    let mut pause = Duration::from_millis(250);
    loop {
        let attempt = async {
            let store = Store::open_postgres(url.expose(), tasks, shutdown.clone()).await?;
            let loaded = store.load_all().await?;
            Ok::<_, StartError>((store, loaded))
        };
        match attempt.await {
            Ok(opened) => return Ok(opened),
            Err(error) if error.is_transient() && tokio::time::Instant::now() < give_up => {
                tracing::warn!(%error, retry_in = ?pause, "PostgreSQL is not reachable yet; staying unready");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error),
        }
    }
}

impl StartError {
    /// Whether the store could not be reached (worth retrying), as opposed
    /// to refusing us (bad credentials, a failed migration).
    fn is_transient(&self) -> bool {
        let sql = match self {
            StartError::Store(OpenError(e)) | StartError::Load(e) => e,
            StartError::Bind { .. } => return false,
        };
        matches!(sql, sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_))
    }
}

/// The host's name (stable across restarts in containers and on machines,
/// so the stream consumer group does not collect a new consumer per
/// restart), reduced to the characters Redis names allow; random if there is
/// none.
fn default_hub_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).take(64).collect();
    if host.is_empty() { format!("hub-{:08x}", fastrand::u32(..)) } else { host }
}

/// A random 32-hex-digit publish token.
fn generate_token() -> Secret {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // Without an OS random source no safe token can be made; refuse
        // every publish rather than accept a guessable token.
        return Secret::new(String::from("\u{0}unusable"));
    }
    Secret::new(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
