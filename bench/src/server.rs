//! The server under test: started by the bench (a temporary data directory,
//! port 0, stopped by PID at the end) or attached to by URL.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::{Args, Scenario};
use crate::services::{self, PgUrl};

/// How many of the server's last log lines are kept for error messages.
const LOG_TAIL: usize = 200;

/// A server the bench talks to.
#[derive(Debug)]
pub(crate) struct Server {
    /// Where it listens (loopback).
    pub(crate) addr: SocketAddr,
    /// Its process, for RSS and CPU (`None`: attached without `--server-pid`).
    pub(crate) pid: Option<u32>,
    pub(crate) spawned: bool,
    pub(crate) bin: Option<PathBuf>,
    pub(crate) args: Vec<String>,
    child: Option<Child>,
    data_dir: Option<PathBuf>,
    pub(crate) log_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Server {
    /// Attaches to a running server at `url` (its PID, if given, for RSS
    /// and CPU).
    pub(crate) async fn attach(url: &str, pid: Option<u32>) -> Result<Server, String> {
        let addr = loopback_addr_of_url(url).await?;
        Ok(Server {
            addr,
            pid,
            spawned: false,
            bin: None,
            args: Vec::new(),
            child: None,
            data_dir: None,
            log_tail: Arc::default(),
        })
    }

    /// Starts `bin` on 127.0.0.1:0 with a temporary data directory, the
    /// publish token, `extra` and then the user's `server_args`.
    pub(crate) async fn spawn(args: &Args, bin: &Path, extra: &[String]) -> Result<Server, String> {
        let data_dir =
            std::env::temp_dir().join(format!("spillway-bench-{}-{}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&data_dir).map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
        let mut server_args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--publish-token".into(),
            args.token.clone(),
        ];
        server_args.extend(extra.iter().cloned());
        server_args.extend(args.server_args.iter().cloned());
        let mut child = Command::new(bin)
            .args(&server_args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("SPILLWAY_BENCH_SERVER_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("SPILLWAY_PUBLISH_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id();
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let log_tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        {
            let log_tail = Arc::clone(&log_tail);
            tokio::spawn(async move {
                let mut tx = Some(tx);
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(rest) = line.split("listening on ").nth(1)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                    }
                    let mut tail = log_tail.lock().unwrap_or_else(PoisonError::into_inner);
                    if tail.len() >= LOG_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let mut server = Server {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            pid,
            spawned: true,
            bin: Some(bin.to_path_buf()),
            args: server_args,
            child: Some(child),
            data_dir: Some(data_dir),
            log_tail,
        };
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(addr)) => {
                server.addr = addr.parse().map_err(|e| format!("bad address {addr:?} in the server log: {e}"))?;
                if !server.addr.ip().is_loopback() {
                    server.stop().await;
                    return Err("the server listens outside loopback".into());
                }
                Ok(server)
            }
            _ => {
                let tail = server.tail();
                server.stop().await;
                Err(format!("the server did not log `listening on` within 60 s; its log:\n{tail}"))
            }
        }
    }

    /// The server's last log lines.
    pub(crate) fn tail(&self) -> String {
        self.log_tail.lock().unwrap_or_else(PoisonError::into_inner).iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Stops a server we started: SIGTERM by PID, then SIGKILL after 10 s.
    /// Removes its data directory. Does nothing to an attached server.
    pub(crate) async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                crate::sys::terminate(pid);
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        if let Some(dir) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The hubs of a run: one server (started or attached), or several, and
/// for hubs the bench started on PostgreSQL and Redis, what to clean up.
#[derive(Debug)]
pub(crate) struct Hubs {
    pub(crate) servers: Vec<Server>,
    /// The database and Redis prefix the bench created (`multi-hub`).
    pub(crate) services: Option<Services>,
}

/// A fresh database and Redis prefix shared by the hubs the bench started.
#[derive(Debug, Clone)]
pub(crate) struct Services {
    pub(crate) admin: PgUrl,
    pub(crate) database: String,
    pub(crate) database_url: String,
    pub(crate) redis_url: String,
    pub(crate) redis_hostport: String,
    pub(crate) prefix: String,
}

impl Hubs {
    /// Attaches to every `--url`; or, for several hubs (`multi-hub`, or
    /// `--hubs N`), creates a database and a Redis prefix and starts the hubs
    /// on them; or starts one server.
    pub(crate) async fn start(args: &Args) -> Result<Hubs, String> {
        if !args.url.is_empty() {
            let mut servers = Vec::new();
            for (i, url) in args.url.iter().enumerate() {
                servers.push(Server::attach(url, args.server_pid.get(i).copied()).await?);
            }
            return Ok(Hubs { servers, services: None });
        }
        let bin = match &args.server_bin {
            Some(bin) => bin.clone(),
            None => {
                default_server_bin().ok_or("no --server-bin or --url given, and no target/release/spillway found")?
            }
        };
        if args.hubs() == 1 && args.scenario != Scenario::MultiHub {
            return Ok(Hubs { servers: vec![Server::spawn(args, &bin, &[]).await?], services: None });
        }
        let admin = PgUrl::parse(&args.pg_admin_url)?;
        let redis_hostport = services::redis_hostport(&args.redis_url)?;
        for url in [admin.hostport.as_str(), redis_hostport.as_str()] {
            loopback_addr_of_url(&format!("tcp://{url}")).await?;
        }
        services::redis_ping(&redis_hostport).await?;
        let tag = format!("{:08x}", fastrand::u32(..));
        let database = format!("bench_{tag}");
        services::pg_execute(&admin, &format!("CREATE DATABASE {database}")).await?;
        let svc = Services {
            database_url: admin.with_database(&database),
            admin,
            database,
            redis_url: args.redis_url.clone(),
            redis_hostport,
            prefix: format!("bench-{tag}"),
        };
        let mut hubs = Hubs { servers: Vec::new(), services: Some(svc.clone()) };
        for h in 1..=args.hubs() {
            let extra: Vec<String> = vec![
                "--database-url".into(),
                svc.database_url.clone(),
                "--redis-url".into(),
                svc.redis_url.clone(),
                "--redis-prefix".into(),
                svc.prefix.clone(),
                "--hub-id".into(),
                format!("bench-hub-{h}"),
            ];
            match Server::spawn(args, &bin, &extra).await {
                Ok(server) => hubs.servers.push(server),
                Err(e) => {
                    hubs.stop().await;
                    return Err(format!("hub {h}: {e}"));
                }
            }
        }
        Ok(hubs)
    }

    /// Stops the servers the bench started, then drops its database and
    /// deletes its Redis keys. Failures are reported, not fatal.
    pub(crate) async fn stop(&mut self) {
        for server in &mut self.servers {
            server.stop().await;
        }
        if let Some(svc) = self.services.take() {
            if let Err(e) =
                services::pg_execute(&svc.admin, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", svc.database))
                    .await
            {
                eprintln!("warning: cannot drop database {}: {e}", svc.database);
            }
            match services::redis_delete_prefix(&svc.redis_hostport, &svc.prefix).await {
                Ok(n) => eprintln!(
                    "cleaned up: database {} dropped, {n} Redis keys under {}: deleted",
                    svc.database, svc.prefix
                ),
                Err(e) => eprintln!("warning: cannot delete Redis keys under {}: {e}", svc.prefix),
            }
        }
    }
}

/// `target/release/spillway` next to this binary's target directory, or in
/// the current directory's `target/`.
fn default_server_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join("spillway"));
    }
    candidates.push(PathBuf::from("target/release/spillway"));
    candidates.into_iter().find(|p| p.is_file())
}

/// Resolves the host of `http://HOST:PORT/…` or `ws://…`; refuses anything
/// outside 127.0.0.0/8 (this bench never sends traffic off the machine).
pub(crate) async fn loopback_addr_of_url(url: &str) -> Result<SocketAddr, String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let default_port = if url.starts_with("https") || url.starts_with("wss") { 443 } else { 80 };
    let hostport = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addrs: Vec<SocketAddr> =
        tokio::net::lookup_host(&hostport).await.map_err(|e| format!("cannot resolve {hostport}: {e}"))?.collect();
    let addr = addrs.iter().copied().find(|a| a.is_ipv4()).or_else(|| addrs.first().copied());
    match addr {
        Some(a) if a.ip().is_loopback() && addrs.iter().all(|x| x.ip().is_loopback()) => Ok(a),
        Some(a) => Err(format!("{url} resolves to {a}: only loopback targets are allowed")),
        None => Err(format!("{url} resolves to nothing")),
    }
}

/// Scrapes `/metrics` (Prometheus text) into series → value.
pub(crate) async fn scrape(client: &reqwest::Client, base: &str) -> Option<BTreeMap<String, f64>> {
    let response = client.get(format!("{base}/metrics")).timeout(Duration::from_secs(10)).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let text = response.text().await.ok()?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_string(), value.trim().parse().ok()?))
            })
            .collect(),
    )
}
