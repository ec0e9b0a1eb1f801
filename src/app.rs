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
use crate::store::{OpenError, Store};
use crate::topic::Hub;

/// How long shutdown waits, beyond the drain window, for connections to say
/// goodbye before it stops waiting. Each reader is told to go at its moment
/// in the window and then needs at most its close grace.
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
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let store = match &config.database_url {
            Some(url) => Store::open_postgres(url.expose(), &tasks, shutdown.clone()).await?,
            None => Store::open_sqlite(&config.data_dir, &tasks, shutdown.clone()).await?,
        };
        let hub = Hub::new();
        let loaded = store.load_all().await?;
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
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let state = AppState {
            hub,
            store,
            bus,
            settings: Arc::new(settings),
            metrics: Arc::new(Metrics::default()),
            connections: Arc::new(Connections::default()),
            admission: crate::admission::Admission::new(
                config.max_connections,
                config.max_connections_per_ip,
                config.accept_rate,
                config.accept_burst,
            ),
            shutdown,
            tasks,
        };
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
        // Returns once the token has fired and accepting has stopped; every
        // connection is a task in `tasks`, so the wait below covers them too.
        let header_timeout = state.settings.header_timeout;
        let result = crate::server::run(listener, router(state), header_timeout, shutdown.clone(), tasks.clone()).await;
        tasks.close();
        if tokio::time::timeout(drain_window + SHUTDOWN_BOUND, tasks.wait()).await.is_err() {
            tracing::warn!(remaining = tasks.len(), "shutdown bound reached; dropping what is left");
        }
        tracing::info!("stopped");
        result
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
