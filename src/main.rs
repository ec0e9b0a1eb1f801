//! The `spillway` binary: parse the configuration, set up logging, raise the
//! open-files limit, run the server until SIGINT or SIGTERM. Also the
//! `healthcheck` subcommand, a tiny HTTP client for container health checks
//! (slim images carry no curl).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use spillway::app::shutdown_signal;
use spillway::config::{Command, Config};
use spillway::{Application, net, telemetry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the health check may take in all: connect, request and response.
/// Shorter than the container runtime's own timeout, so that our one line,
/// not the runtime's kill, says what went wrong.
const HEALTHCHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The most response bytes the health check reads; `/healthz` answers far less.
const HEALTHCHECK_MAX_RESPONSE: u64 = 64 * 1024;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::from_args();
    if let Some(Command::Healthcheck) = config.command {
        // A probe, not a server: no store, no log setup, no limit raising;
        // its one line goes to standard output for `docker inspect`.
        return healthcheck(config.listen).await;
    }
    telemetry::init(config.log_format);
    match net::raise_open_files_limit() {
        Ok(l) => tracing::info!(
            soft_before = l.soft_before,
            soft = l.soft,
            hard = l.hard,
            "open-files limit raised to the hard limit"
        ),
        Err(error) => tracing::warn!(%error, "cannot raise the open-files limit"),
    }
    let app = match Application::build(&config).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// `spillway healthcheck`: `GET /healthz` on the listen address; exit 0 on a
/// 200 whose body says `"status":"ok"`, 1 otherwise, with one line either way.
async fn healthcheck(listen: SocketAddr) -> ExitCode {
    let target = probe_target(listen);
    let outcome = match tokio::time::timeout(HEALTHCHECK_TIMEOUT, probe(target)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!("no answer within {HEALTHCHECK_TIMEOUT:?}")),
    };
    match outcome {
        Ok(body) => {
            println!("healthy: http://{target}/healthz answered 200 {body}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            println!("unhealthy: http://{target}/healthz: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Where to probe: the listen address, except that a wildcard address (which
/// one cannot connect to) means this host's loopback of the same family.
fn probe_target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// One HTTP/1.1 exchange; the healthy body, or why it is not healthy.
async fn probe(target: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(target).await.map_err(|e| format!("cannot connect: {e}"))?;
    // `Connection: close` makes the end of the stream the end of the
    // response, so reading to the end is enough.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: {target}\r\nUser-Agent: spillway-healthcheck\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("cannot send the request: {e}"))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(HEALTHCHECK_MAX_RESPONSE)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("cannot read the response: {e}"))?;
    judge(&raw)
}

/// Decides from a raw HTTP/1.1 response whether the server is healthy.
fn judge(raw: &[u8]) -> Result<String, String> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(if raw.is_empty() {
            "connection closed without a response".into()
        } else {
            "malformed response".into()
        });
    };
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("malformed status line {status_line:?}"))?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked")
        })
    });
    let body = &raw[split + 4..];
    let body = if chunked { dechunk(body).ok_or("malformed chunked body")? } else { body.to_vec() };
    let text = String::from_utf8_lossy(&body).trim().to_string();
    if status != 200 {
        return Err(format!("status {status} {text}"));
    }
    let healthy = serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v["status"] == "ok");
    if healthy { Ok(text) } else { Err(format!("status 200 but the body is not {{\"status\":\"ok\"}}: {text}")) }
}

/// Decodes a chunked body (extensions and trailers ignored); `None` if cut short.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&raw[..end]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_probe_loopback() {
        let v4: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        assert_eq!(probe_target(v4), "127.0.0.1:8080".parse().expect("addr"));
        let v6: SocketAddr = "[::]:8080".parse().expect("addr");
        assert_eq!(probe_target(v6), "[::1]:8080".parse().expect("addr"));
        let named: SocketAddr = "10.0.0.5:80".parse().expect("addr");
        assert_eq!(probe_target(named), named);
    }

    #[test]
    fn responses_are_judged() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}";
        assert!(judge(ok).is_ok());
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nf\r\n{\"status\":\"ok\"}\r\n0\r\n\r\n";
        assert!(judge(chunked).is_ok());
        let failing = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}";
        assert!(judge(failing).is_err_and(|e| e.contains("503")));
        let wrong = b"HTTP/1.1 200 OK\r\ncontent-length: 19\r\n\r\n{\"status\":\"broken\"}";
        assert!(judge(wrong).is_err());
        assert!(judge(b"").is_err());
        assert!(judge(b"garbage").is_err());
    }
}
