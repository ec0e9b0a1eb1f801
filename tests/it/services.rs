//! Real PostgreSQL and Redis for the multi-hub tests: a fresh database and a
//! unique key prefix per test, and a TCP proxy the test owns and can cut, to
//! simulate outages without touching the shared services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// PostgreSQL's address on this machine.
pub(crate) const POSTGRES: &str = "127.0.0.1:5432";
/// Redis's address on this machine.
pub(crate) const REDIS: &str = "127.0.0.1:6379";

/// Whether both services answer. In CI they must (`.ci/run` starts them);
/// elsewhere a test without them says it is skipped.
pub(crate) async fn available(test: &str) -> bool {
    let up = |addr: &'static str| async move {
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await.is_ok_and(|r| r.is_ok())
    };
    let ok = up(POSTGRES).await && up(REDIS).await;
    if !ok {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{test}: PostgreSQL and Redis must run in CI");
        eprintln!("SKIPPED {test}: PostgreSQL ({POSTGRES}) or Redis ({REDIS}) is not reachable");
    }
    ok
}

/// A unique name for this test's database and Redis prefix.
pub(crate) fn unique(test: &str) -> String {
    format!("sw_{}_{:08x}", test.replace('-', "_"), fastrand::u32(..))
}

/// A fresh database; dropped (best effort) with the guard.
pub(crate) struct Database {
    pub(crate) name: String,
}

impl Database {
    pub(crate) async fn create(name: &str) -> Database {
        let mut admin =
            sqlx::PgConnection::connect(&format!("postgres://postgres@{POSTGRES}/postgres")).await.expect("postgres");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create db");
        Database { name: name.to_string() }
    }

    /// The URL through `addr` (the database itself, or a proxy to it).
    pub(crate) fn url_via(&self, addr: &str) -> String {
        format!("postgres://postgres@{addr}/{}", self.name)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let name = self.name.clone();
        // A separate thread and runtime: Drop cannot await.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                if let Ok(mut admin) =
                    sqlx::PgConnection::connect(&format!("postgres://postgres@{POSTGRES}/postgres")).await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}

/// A TCP proxy to `target` that the test can cut (every connection is
/// dropped and new ones are refused) and restore.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut_tx: watch::Sender<u64>,
}

impl Proxy {
    pub(crate) async fn start(target: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let (cut_tx, cut_rx) = watch::channel(0u64);
        let flag = Arc::clone(&up);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut cuts = cut_rx.clone();
                cuts.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, up, cut_tx }
    }

    /// Drops every proxied connection and refuses new ones.
    pub(crate) fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut_tx.send_modify(|n| *n += 1);
    }

    /// Accepts connections again.
    pub(crate) fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
