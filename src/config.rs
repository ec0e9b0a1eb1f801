//! Typed configuration: command-line flags with `SPILLWAY_*` environment
//! equivalents, validated once into a `Config`. Secrets are wrapped so that
//! `Debug` and logs never show them.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// A secret string (a token). Its `Debug` and `Display` print a placeholder.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself: call only where it is compared or deliberately shown.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"[redacted]\")")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() < 8 {
            return Err("a token must be at least 8 characters".into());
        }
        if !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token may only hold printable ASCII without spaces".into());
        }
        Ok(Self(s.to_owned()))
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// spillway: a live-state server. Every flag can also be set through the
/// environment variable named beside it.
#[derive(Debug, Clone, Parser)]
#[command(name = "spillway", version, about, long_about = None)]
pub struct Config {
    /// Address to listen on. Port 0 picks a free port; the log then says
    /// `listening on ADDR`.
    #[arg(long, env = "SPILLWAY_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    pub listen: SocketAddr,

    /// PostgreSQL URL (`postgres://user@host/db`): keep topics there instead
    /// of the embedded SQLite file, so several hubs can share them.
    #[arg(long, env = "SPILLWAY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,

    /// Redis URL (`redis://host:6379`): join the other hubs on a Redis
    /// Pub/Sub bus and ingest the Redis stream. Needs --database-url.
    #[arg(long, env = "SPILLWAY_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// Prefix of every Redis key, channel and client name, so several
    /// deployments (and test runs) can share one Redis.
    #[arg(long, env = "SPILLWAY_REDIS_PREFIX", default_value = "spillway")]
    pub redis_prefix: String,

    /// This hub's name in Redis client names and stream consumer groups
    /// (default: the host name). Give every hub a distinct one.
    #[arg(long, env = "SPILLWAY_HUB_ID")]
    pub hub_id: Option<String>,

    /// How often a hub on a shared store reconciles with it, so a hub that
    /// died between commit and announcement cannot leave others stale longer.
    #[arg(long, env = "SPILLWAY_RECONCILE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,

    /// Approximate bound on the Redis ingest stream's length (XTRIM MAXLEN ~).
    #[arg(long, env = "SPILLWAY_INGEST_MAX_LEN", default_value_t = 100_000)]
    pub ingest_max_len: u64,

    /// Directory holding the embedded SQLite database.
    #[arg(long, env = "SPILLWAY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Bearer token accepted for publishing; repeat the flag (or separate with
    /// commas in the environment) to accept several while rotating. When none
    /// is given, one is generated and printed once at start.
    #[arg(long = "publish-token", env = "SPILLWAY_PUBLISH_TOKEN", value_delimiter = ',', hide_env_values = true)]
    pub publish_tokens: Vec<Secret>,

    /// Token that opens the operator page `/admin` (a login form, or HTTP
    /// Basic with any user name and this token as the password). Without it
    /// the operator page is off and `/admin` answers 404.
    #[arg(long, env = "SPILLWAY_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// Largest accepted publish body, in bytes (suffixes KiB and MiB work).
    #[arg(long, env = "SPILLWAY_MAX_BODY", default_value = "64KiB", value_parser = parse_bytes)]
    pub max_body: usize,

    /// A write to a reader's socket not finished after this long cuts the
    /// reader off (after a short grace). Humantime: `10s`, `500ms`.
    #[arg(long, env = "SPILLWAY_WRITE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// Interval of heartbeat frames on idle connections and of WebSocket
    /// pings; two unanswered pings close the connection.
    #[arg(long, env = "SPILLWAY_HEARTBEAT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,

    /// Send-buffer size requested for every subscription socket, in bytes.
    /// Linux doubles it; the effective figure is what `ss -tm` shows as `tb`.
    #[arg(long, env = "SPILLWAY_SOCKET_SEND_BUFFER", default_value = "16KiB", value_parser = parse_bytes)]
    pub socket_send_buffer: usize,

    /// `max-age` of snapshot responses, so a CDN in front absorbs polling;
    /// `stale-while-revalidate` is set to the same value.
    #[arg(long, env = "SPILLWAY_CACHE_MAX_AGE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub cache_max_age: Duration,

    /// Longest `wait=` a long-poll may ask for; longer requests are clamped.
    #[arg(long, env = "SPILLWAY_MAX_WAIT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,

    /// Most topics one WebSocket or SSE connection may follow.
    #[arg(long, env = "SPILLWAY_MAX_TOPICS_PER_CONNECTION", default_value_t = 64)]
    pub max_topics_per_connection: usize,

    /// Origins whose pages may read (CORS, SSE) and open WebSockets, e.g.
    /// `https://example.com`; repeat or separate with commas. By default any
    /// origin may read: scoreboards are public.
    #[arg(long = "allow-origin", env = "SPILLWAY_ALLOW_ORIGIN", value_delimiter = ',')]
    pub allow_origins: Vec<String>,

    /// Also run a simulated live match on topic `demo` (clock ticking every
    /// second, goals and cards now and then), so a newcomer sees a live
    /// scoreboard at once.
    #[arg(long, env = "SPILLWAY_DEMO")]
    pub demo: bool,

    /// Refuse WebSocket upgrades (503), as a broken proxy would; for testing
    /// the clients' fallback to SSE and long-poll.
    #[arg(long, env = "SPILLWAY_DISABLE_WEBSOCKET")]
    pub disable_websocket: bool,

    /// Most reader connections (WebSocket, SSE, waiting long-polls) at once;
    /// the excess is turned away before the upgrade with a reconnect hint.
    #[arg(long, env = "SPILLWAY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Most reader connections from one client address (0 = no cap: carrier
    /// NAT puts thousands of phones behind one address).
    #[arg(long, env = "SPILLWAY_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,

    /// New subscriptions admitted per second (a token bucket); readers that
    /// resume (a valid `since`) are served first when tokens are short.
    #[arg(long, env = "SPILLWAY_ACCEPT_RATE", default_value_t = 2000)]
    pub accept_rate: u32,

    /// Burst size of the subscription token bucket.
    #[arg(long, env = "SPILLWAY_ACCEPT_BURST", default_value_t = 4000)]
    pub accept_burst: u32,

    /// Peers whose `X-Forwarded-For` is believed for the client address
    /// (load balancers); repeat or separate with commas.
    #[arg(long = "trusted-proxy", env = "SPILLWAY_TRUSTED_PROXY", value_delimiter = ',')]
    pub trusted_proxies: Vec<std::net::IpAddr>,

    /// Most topics the hub holds; a publish creating one more is refused.
    #[arg(long, env = "SPILLWAY_MAX_TOPICS", default_value_t = 100_000)]
    pub max_topics: usize,

    /// A reader whose newest delivered version has been superseded for
    /// longer than this is cut off: it is looking at a stale board.
    #[arg(long, env = "SPILLWAY_MAX_STALENESS", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_staleness: Duration,

    /// On SIGTERM, readers are told to reconnect at moments spread uniformly
    /// over this window, so a deploy causes no reconnect storm.
    #[arg(long, env = "SPILLWAY_DRAIN_WINDOW", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_window: Duration,

    /// Most bytes handed to reader sockets and not yet flushed, across all
    /// readers. Above it the readers whose frame has been stuck longest are
    /// cut off (close 4004 with a reconnect hint) until usage is below four
    /// fifths of it. `0` turns the budget off.
    #[arg(long, env = "SPILLWAY_SEND_BUDGET", default_value = "256MiB", value_parser = parse_bytes)]
    pub send_budget: usize,

    /// Resident memory the process should stay under (e.g. 80% of the
    /// container's limit). Above it new subscriptions are refused and the
    /// stalest readers are cut off until usage is below four fifths of it.
    /// `0` (the default) turns the limit off.
    #[arg(long, env = "SPILLWAY_MEMORY_LIMIT", default_value = "0", value_parser = parse_bytes)]
    pub memory_limit: usize,

    /// Time allowed to read a request's headers (slowloris protection).
    #[arg(long, env = "SPILLWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Log format.
    #[arg(long, env = "SPILLWAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// A subcommand instead of running the server.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Checks that a server answers `/healthz` on --listen (for container
    /// health checks; needs no curl). Exits 0 when healthy, 1 otherwise.
    Healthcheck,
}

/// Bounds enforced by [`Config::validate`].
pub mod limits {
    use std::time::Duration;

    /// The smallest heartbeat and write timeout (tests use short ones).
    pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
    /// The largest publish body we allow configuring.
    pub const MAX_BODY_CEILING: usize = 16 * 1024 * 1024;
    /// The smallest useful socket send buffer.
    pub const MIN_SEND_BUFFER: usize = 2048;
    /// The smallest `--memory-limit` (other than 0, off): below it the
    /// process's own baseline would keep the guard cutting forever.
    pub const MIN_MEMORY_LIMIT: usize = 32 * 1024 * 1024;
    /// The most topics per connection we allow configuring.
    pub const MAX_TOPICS_PER_CONNECTION: usize = 1024;
}

impl Config {
    /// Parses flags and environment, then validates; exits with a usage
    /// message on error, like every command-line tool.
    pub fn from_args() -> Self {
        let config = Self::parse();
        if let Err(message) = config.validate() {
            use clap::CommandFactory;
            Self::command().error(clap::error::ErrorKind::ValueValidation, message).exit();
        }
        config
    }

    /// Checks the relations flags cannot express alone.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat < limits::MIN_INTERVAL {
            return Err(format!("--heartbeat must be at least {:?}", limits::MIN_INTERVAL));
        }
        if self.write_timeout < limits::MIN_INTERVAL {
            return Err(format!("--write-timeout must be at least {:?}", limits::MIN_INTERVAL));
        }
        if self.max_body < 2 || self.max_body > limits::MAX_BODY_CEILING {
            return Err(format!("--max-body must be between 2 bytes and {} bytes", limits::MAX_BODY_CEILING));
        }
        if self.max_topics_per_connection == 0 || self.max_topics_per_connection > limits::MAX_TOPICS_PER_CONNECTION {
            return Err(format!(
                "--max-topics-per-connection must be between 1 and {}",
                limits::MAX_TOPICS_PER_CONNECTION
            ));
        }
        if self.max_wait < Duration::from_secs(1) || self.max_wait > Duration::from_secs(300) {
            return Err("--max-wait must be between 1s and 300s".into());
        }
        if self.redis_url.is_some() && self.database_url.is_none() {
            return Err("--redis-url needs --database-url: a Redis bus with the embedded SQLite file would give \
                        every hub its own truth (versions must come from one shared store)"
                .into());
        }
        if let Some(url) = &self.database_url
            && !(url.expose().starts_with("postgres://") || url.expose().starts_with("postgresql://"))
        {
            return Err("--database-url must be a postgres:// URL".into());
        }
        if let Some(url) = &self.redis_url
            && !url.expose().starts_with("redis://")
        {
            return Err("--redis-url must be a redis:// URL (TLS, rediss://, is not built in)".into());
        }
        let name_ok = |s: &str| {
            !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        if !name_ok(&self.redis_prefix) || self.hub_id.as_deref().is_some_and(|id| !name_ok(id)) {
            return Err("--redis-prefix and --hub-id take 1-64 characters of A-Z, a-z, 0-9, '-', '_', '.'".into());
        }
        if self.accept_rate == 0 || self.accept_burst == 0 || self.max_connections == 0 || self.max_topics == 0 {
            return Err("--accept-rate, --accept-burst, --max-connections and --max-topics must be at least 1".into());
        }
        if self.header_timeout < limits::MIN_INTERVAL || self.max_staleness < limits::MIN_INTERVAL {
            return Err(format!("--header-timeout and --max-staleness must be at least {:?}", limits::MIN_INTERVAL));
        }
        if self.drain_window > Duration::from_secs(600) {
            return Err("--drain-window must be at most 600s".into());
        }
        if self.reconcile_interval < Duration::from_millis(100) {
            return Err("--reconcile-interval must be at least 100ms".into());
        }
        for origin in &self.allow_origins {
            if origin != "*" && !valid_origin(origin) {
                return Err(format!("--allow-origin {origin:?} is not an origin like https://example.com"));
            }
        }
        if self.memory_limit != 0 && self.memory_limit < limits::MIN_MEMORY_LIMIT {
            return Err(format!(
                "--memory-limit must be 0 (off) or at least {} MiB",
                limits::MIN_MEMORY_LIMIT / (1024 * 1024)
            ));
        }
        if self.socket_send_buffer < limits::MIN_SEND_BUFFER {
            return Err(format!("--socket-send-buffer must be at least {} bytes", limits::MIN_SEND_BUFFER));
        }
        Ok(())
    }
}

/// Whether `origin` looks like `scheme://host[:port]` with no path.
fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else { return false };
    matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains(['/', ' ', '?', '#'])
}

/// Parses `65536`, `64KiB`, `1MiB` (also `k`/`KB` meaning KiB).
pub fn parse_bytes(raw: &str) -> Result<usize, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let n: usize = digits.parse().map_err(|_| format!("not a size: {raw:?}"))?;
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        other => return Err(format!("unknown size unit {other:?} (use B, KiB or MiB)")),
    };
    n.checked_mul(factor).ok_or_else(|| format!("size too large: {raw:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1GiB").is_err());
    }

    #[test]
    fn secrets_never_print() {
        let s: Secret = "super-secret-token".parse().expect("valid");
        assert!(!format!("{s:?}").contains("super"));
        assert!("short".parse::<Secret>().is_err());
    }

    #[test]
    fn defaults_validate() {
        let c = Config::parse_from(["spillway"]);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.max_body, 64 * 1024);
        assert_eq!(c.write_timeout, Duration::from_secs(10));
        let bad = Config::parse_from(["spillway", "--heartbeat", "1ms"]);
        assert!(bad.validate().is_err());
        let bad = Config::parse_from(["spillway", "--allow-origin", "https://a.example/path"]);
        assert!(bad.validate().is_err());
        let good = Config::parse_from(["spillway", "--allow-origin", "https://a.example,http://localhost:3000"]);
        assert_eq!(good.validate(), Ok(()));
        let lonely_bus = Config::parse_from(["spillway", "--redis-url", "redis://127.0.0.1:6379"]);
        assert!(lonely_bus.validate().is_err_and(|e| e.contains("--database-url")));
        let multi = Config::parse_from([
            "spillway",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--database-url",
            "postgres://postgres@127.0.0.1/test",
        ]);
        assert_eq!(multi.validate(), Ok(()));
    }
}
