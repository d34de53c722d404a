//! The Docker engine's API, the one call `nbt attach --container` needs: a container's id and
//! its init process, asked over the engine's unix socket (`$DOCKER_HOST`, else
//! /var/run/docker.sock). One HTTP/1.0 GET, so that no HTTP client crate is needed for it.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};

/// A running container, as the engine describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    /// Its name without the leading '/'.
    pub name: String,
    /// Its init process, as this machine's /proc names it.
    pub pid: i32,
}

/// The engine's socket: `$DOCKER_HOST` when it is a `unix://` address, else the default.
pub fn socket() -> Result<PathBuf> {
    match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => match host.strip_prefix("unix://") {
            Some(path) => Ok(PathBuf::from(path)),
            None => bail!(
                "DOCKER_HOST={host}: nbt reaches the Docker engine only through a unix socket \
                 (unix:///var/run/docker.sock), since it must run on the container's machine"
            ),
        },
        _ => Ok(PathBuf::from("/var/run/docker.sock")),
    }
}

/// The running container named or identified (full id or a unique prefix) by `given`.
pub fn inspect(given: &str) -> Result<Container> {
    let valid = !given.is_empty()
        && given.len() <= 128
        && given
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !valid {
        return Err(crate::error::PlanError(format!(
            "invalid value '{given}' for --container: a container's name or id (letters, digits, \
             '_', '.', '-')"
        ))
        .into());
    }
    let socket = socket()?;
    let (status, body) = get(&socket, &format!("/containers/{given}/json"))
        .with_context(|| format!("asking the Docker engine at {}", socket.display()))?;
    match status {
        200 => {}
        404 => {
            return Err(crate::error::PlanError(format!(
                "invalid value '{given}' for --container: the Docker engine at {} has no such \
                 container (docker ps lists them)",
                socket.display()
            ))
            .into())
        }
        _ => bail!(
            "the Docker engine at {} answered {status}: {}",
            socket.display(),
            String::from_utf8_lossy(&body).trim()
        ),
    }
    let json: serde_json::Value =
        serde_json::from_slice(&body).context("reading the Docker engine's answer")?;
    let text = |pointer: &str| json.pointer(pointer).and_then(|v| v.as_str());
    let id = text("/Id").ok_or_else(|| anyhow!("the engine's answer has no Id"))?;
    let name = text("/Name").unwrap_or("").trim_start_matches('/');
    let running = json.pointer("/State/Running").and_then(|v| v.as_bool());
    let pid = json
        .pointer("/State/Pid")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    if running != Some(true) || pid <= 0 {
        bail!(
            "container '{given}' is not running ({}); nbt attaches to a running container",
            text("/State/Status").unwrap_or("no state")
        );
    }
    Ok(Container {
        id: id.to_string(),
        name: name.to_string(),
        pid: pid as i32,
    })
}

/// One GET on the unix socket `socket`: the status code and the body.
fn get(socket: &std::path::Path, path: &str) -> Result<(u16, Vec<u8>)> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is the Docker engine running? set DOCKER_HOST=unix://PATH for \
             another socket)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n")?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    parse_response(&answer)
}

/// Splits an HTTP/1.0 answer into its status and body.
fn parse_response(answer: &[u8]) -> Result<(u16, Vec<u8>)> {
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("an HTTP answer without an end of headers"))?;
    let head = String::from_utf8_lossy(&answer[..end]);
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("an HTTP answer without a status: {head}"))?;
    let mut body = answer[end + 4..].to_vec();
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if chunked {
        body = unchunk(&body)?;
    }
    Ok((status, body))
}

/// The body of a chunked answer (HTTP/1.0 answers are not chunked, but a server may still).
fn unchunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("a chunk without its size line"))?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| anyhow!("a chunk size '{size_text}'"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size {
            bail!("a chunk shorter than its size");
        }
        body.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_answers_parse() {
        let (status, body) =
            parse_response(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"Id\":1}")
                .unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"{\"Id\":1}"[..]));
        let (status, body) = parse_response(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nno s\r\n3\r\nuch\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((status, body.as_slice()), (404, &b"no such"[..]));
    }

    #[test]
    fn container_names_are_checked_before_any_request() {
        let err = inspect("../../v1.41/containers").unwrap_err().to_string();
        assert!(err.contains("--container"), "{err}");
    }
}
