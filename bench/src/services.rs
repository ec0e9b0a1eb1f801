//! PostgreSQL and Redis for `multi-hub`: a fresh database and a unique Redis
//! prefix for the hubs the bench starts, and their removal at the end.
//!
//! Both protocols are spoken by hand over one TCP connection (PostgreSQL's
//! simple query protocol with trust authentication; Redis's RESP), because
//! the bench needs four commands and must not pull the server's database
//! drivers into its build. Loopback only, like everything else here.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long one command may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// `user`, `host:port` and database of `postgres://user@host:port/db`
/// (no password: the bench expects trust authentication on loopback).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PgUrl {
    pub(crate) user: String,
    pub(crate) hostport: String,
    pub(crate) database: String,
}

impl PgUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| format!("{url:?} is not a postgres:// URL"))?;
        let (auth, rest) =
            rest.split_once('@').ok_or_else(|| format!("{url:?}: give the user (postgres://USER@HOST:PORT/DB)"))?;
        if auth.contains(':') {
            return Err(format!("{url:?}: passwords are not supported; use trust authentication on loopback"));
        }
        let (hostport, database) = rest.split_once('/').unwrap_or((rest, "postgres"));
        let database = database.split('?').next().unwrap_or("postgres");
        let hostport = if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:5432") };
        Ok(Self {
            user: auth.to_string(),
            hostport,
            database: if database.is_empty() { "postgres".into() } else { database.into() },
        })
    }

    /// The same server, another database.
    pub(crate) fn with_database(&self, database: &str) -> String {
        format!("postgres://{}@{}/{database}", self.user, self.hostport)
    }
}

/// Runs one statement on `url`'s database (simple query protocol).
pub(crate) async fn pg_execute(url: &PgUrl, sql: &str) -> Result<(), String> {
    tokio::time::timeout(TIMEOUT, pg_execute_inner(url, sql))
        .await
        .map_err(|_| format!("PostgreSQL at {}: timed out", url.hostport))?
        .map_err(|e| format!("PostgreSQL at {}: {e}", url.hostport))
}

async fn pg_execute_inner(url: &PgUrl, sql: &str) -> io::Result<()> {
    let mut stream = BufReader::new(TcpStream::connect(&url.hostport).await?);
    // Startup: length, protocol 3.0, then key/value pairs and a final NUL.
    let mut params = Vec::new();
    for (k, v) in [("user", url.user.as_str()), ("database", url.database.as_str())] {
        params.extend_from_slice(k.as_bytes());
        params.push(0);
        params.extend_from_slice(v.as_bytes());
        params.push(0);
    }
    params.push(0);
    let mut startup = Vec::new();
    startup.extend_from_slice(&((8 + params.len()) as u32).to_be_bytes());
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    startup.extend_from_slice(&params);
    stream.get_mut().write_all(&startup).await?;
    pg_until_ready(&mut stream).await?;
    let mut query = vec![b'Q'];
    query.extend_from_slice(&((4 + sql.len() + 1) as u32).to_be_bytes());
    query.extend_from_slice(sql.as_bytes());
    query.push(0);
    stream.get_mut().write_all(&query).await?;
    pg_until_ready(&mut stream).await?;
    // Terminate.
    let _ = stream.get_mut().write_all(&[b'X', 0, 0, 0, 4]).await;
    Ok(())
}

/// Reads messages until `ReadyForQuery`; an `ErrorResponse` or an
/// authentication request other than "ok" is an error.
async fn pg_until_ready(stream: &mut BufReader<TcpStream>) -> io::Result<()> {
    let mut error: Option<String> = None;
    loop {
        let kind = stream.read_u8().await?;
        let len = stream.read_u32().await? as usize;
        if !(4..=1 << 20).contains(&len) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad message length"));
        }
        let mut body = vec![0u8; len - 4];
        stream.read_exact(&mut body).await?;
        match kind {
            b'R' => {
                let code = body.get(..4).map_or(u32::MAX, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                if code != 0 {
                    return Err(io::Error::other(format!(
                        "the server asks for authentication (method {code}); the bench needs trust authentication"
                    )));
                }
            }
            b'E' => {
                // Fields: a type byte and a NUL-terminated string each; `M`
                // is the message.
                let text = body
                    .split(|&b| b == 0)
                    .find_map(|f| f.strip_prefix(b"M"))
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_else(|| "error".into());
                error = Some(text);
            }
            b'Z' => return error.map_or(Ok(()), |e| Err(io::Error::other(e))),
            _ => {}
        }
    }
}

/// One RESP value, as much as the bench needs.
#[derive(Debug)]
enum Resp {
    Simple(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

struct Redis {
    stream: BufReader<TcpStream>,
}

impl Redis {
    async fn connect(hostport: &str) -> io::Result<Self> {
        Ok(Self { stream: BufReader::new(TcpStream::connect(hostport).await?) })
    }

    async fn command(&mut self, args: &[&[u8]]) -> io::Result<Resp> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.get_mut().write_all(&out).await?;
        Box::pin(read_resp(&mut self.stream)).await
    }
}

async fn read_line(stream: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = stream.read_u8().await?;
        if b == b'\n' {
            break;
        }
        line.push(b);
        if line.len() > 1 << 16 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "RESP line too long"));
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

async fn read_resp(stream: &mut BufReader<TcpStream>) -> io::Result<Resp> {
    let line = read_line(stream).await?;
    let (kind, rest) = line.split_at(line.len().min(1));
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad RESP");
    match kind {
        "+" => Ok(Resp::Simple(rest.to_string())),
        "-" => Err(io::Error::other(rest.to_string())),
        ":" => rest.parse().map(Resp::Int).map_err(|_| bad()),
        "$" => {
            let n: i64 = rest.parse().map_err(|_| bad())?;
            if n < 0 {
                return Ok(Resp::Bulk(None));
            }
            let mut body = vec![0u8; n as usize + 2];
            stream.read_exact(&mut body).await?;
            body.truncate(n as usize);
            Ok(Resp::Bulk(Some(body)))
        }
        "*" => {
            let n: i64 = rest.parse().map_err(|_| bad())?;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                items.push(Box::pin(read_resp(stream)).await?);
            }
            Ok(Resp::Array(items))
        }
        _ => Err(bad()),
    }
}

/// `host:port` of `redis://host:port[/db]`.
pub(crate) fn redis_hostport(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("redis://").ok_or_else(|| format!("{url:?} is not a redis:// URL"))?;
    if rest.contains('@') {
        return Err(format!("{url:?}: credentials are not supported by the bench"));
    }
    let hostport = rest.split('/').next().unwrap_or(rest);
    Ok(if hostport.contains(':') { hostport.to_string() } else { format!("{hostport}:6379") })
}

/// Checks that Redis answers `PING`.
pub(crate) async fn redis_ping(hostport: &str) -> Result<(), String> {
    let run = async {
        let mut r = Redis::connect(hostport).await?;
        match r.command(&[b"PING"]).await? {
            Resp::Simple(s) if s == "PONG" => Ok(()),
            other => Err(io::Error::other(format!("unexpected answer {other:?}"))),
        }
    };
    tokio::time::timeout(TIMEOUT, run)
        .await
        .map_err(|_| format!("Redis at {hostport}: timed out"))?
        .map_err(|e| format!("Redis at {hostport}: {e}"))
}

/// Deletes every key of a spillway deployment with `--redis-prefix PREFIX`
/// (its keys are all `PREFIX:…`): `SCAN` then `DEL`; returns how many were
/// deleted.
pub(crate) async fn redis_delete_prefix(hostport: &str, prefix: &str) -> Result<u64, String> {
    let run = async {
        let mut r = Redis::connect(hostport).await?;
        let pattern = format!("{prefix}:*");
        let mut cursor = b"0".to_vec();
        let mut deleted = 0u64;
        loop {
            let answer = r.command(&[b"SCAN", &cursor, b"MATCH", pattern.as_bytes(), b"COUNT", b"1000"]).await?;
            let Resp::Array(mut parts) = answer else { return Err(io::Error::other("SCAN: not an array")) };
            let keys = match parts.pop() {
                Some(Resp::Array(keys)) => keys,
                _ => return Err(io::Error::other("SCAN: no key list")),
            };
            cursor = match parts.pop() {
                Some(Resp::Bulk(Some(c))) => c,
                _ => return Err(io::Error::other("SCAN: no cursor")),
            };
            let keys: Vec<Vec<u8>> = keys
                .into_iter()
                .filter_map(|k| match k {
                    Resp::Bulk(Some(k)) => Some(k),
                    _ => None,
                })
                .collect();
            if !keys.is_empty() {
                let mut args: Vec<&[u8]> = vec![b"DEL"];
                args.extend(keys.iter().map(Vec::as_slice));
                if let Resp::Int(n) = r.command(&args).await? {
                    deleted += n.max(0) as u64;
                }
            }
            if cursor == b"0" {
                return Ok(deleted);
            }
        }
    };
    tokio::time::timeout(TIMEOUT * 4, run)
        .await
        .map_err(|_| format!("Redis at {hostport}: timed out"))?
        .map_err(|e| format!("Redis at {hostport}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = PgUrl::parse("postgres://postgres@127.0.0.1:5432/postgres").expect("url");
        assert_eq!(
            u,
            PgUrl { user: "postgres".into(), hostport: "127.0.0.1:5432".into(), database: "postgres".into() }
        );
        assert_eq!(u.with_database("bench_1"), "postgres://postgres@127.0.0.1:5432/bench_1");
        assert!(PgUrl::parse("postgres://u:secret@h/db").is_err());
        assert!(PgUrl::parse("mysql://u@h/db").is_err());
        assert_eq!(redis_hostport("redis://127.0.0.1:6379").as_deref(), Ok("127.0.0.1:6379"));
        assert_eq!(redis_hostport("redis://localhost/0").as_deref(), Ok("localhost:6379"));
        assert!(redis_hostport("rediss://h").is_err());
    }
}
