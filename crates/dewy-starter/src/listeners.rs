//! Listening sockets from Dewy's port syntax.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

use socket2::{Domain, SockAddr, Socket, Type};

use crate::Error;

/// One listener to bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSpec {
    /// A bare port: IPv4 on all interfaces (`0.0.0.0`), as `start_server`
    /// binds it; write `[::]:8000` for IPv6 dual-stack.
    Port(u16),
    /// An explicit address (`127.0.0.1:8000`, `[::1]:8000`).
    Addr(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl ListenSpec {
    /// The spelling used in `SERVER_STARTER_PORT` (as `start_server` writes it).
    pub fn starter_name(&self) -> String {
        match self {
            Self::Port(p) => p.to_string(),
            Self::Addr(a) => a.to_string(),
            Self::Unix(p) => p.display().to_string(),
        }
    }
}

/// Parses `--port` values: `8000`, `8000,8001`, `8000-8005` (at most 100
/// ports), `host:port`, `[::1]:port`, and `/path/to.sock`. The result is
/// de-duplicated and in order of appearance.
pub fn parse_ports<S: AsRef<str>>(values: &[S]) -> Result<Vec<ListenSpec>, Error> {
    let mut out: Vec<ListenSpec> = Vec::new();
    let bad = |spec: &str, reason: &str| Error::InvalidPort {
        spec: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let port = |s: &str, whole: &str| -> Result<u16, Error> {
        let p: u32 = s.trim().parse().map_err(|_| bad(whole, "not a port number"))?;
        if p == 0 || p > 65535 {
            return Err(bad(whole, "ports are 1-65535"));
        }
        Ok(p as u16)
    };
    for value in values {
        let value = value.as_ref();
        for item in value.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(bad(value, "empty element"));
            }
            let mut push = |spec: ListenSpec| {
                if !out.contains(&spec) {
                    out.push(spec);
                }
            };
            if item.starts_with('/') || item.starts_with("./") {
                push(ListenSpec::Unix(PathBuf::from(item)));
            } else if let Ok(addr) = item.parse::<SocketAddr>() {
                if addr.port() == 0 {
                    return Err(bad(item, "ports are 1-65535"));
                }
                push(ListenSpec::Addr(addr));
            } else if let Some((a, b)) = item.split_once('-') {
                let (a, b) = (port(a, item)?, port(b, item)?);
                if a > b {
                    return Err(bad(item, "range start is after its end"));
                }
                if b - a >= 100 {
                    return Err(bad(item, "a range may hold at most 100 ports"));
                }
                for p in a..=b {
                    push(ListenSpec::Port(p));
                }
            } else if item.contains(':') {
                let (host, p) = item.rsplit_once(':').expect("has colon");
                let p = port(p, item)?;
                let ip: IpAddr = match host {
                    "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    "" | "*" => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                    h => h
                        .trim_matches(['[', ']'])
                        .parse()
                        .map_err(|_| bad(item, "not an IP address and port"))?,
                };
                push(ListenSpec::Addr(SocketAddr::new(ip, p)));
            } else {
                push(ListenSpec::Port(port(item, item)?));
            }
        }
    }
    Ok(out)
}

/// The bound sockets. They stay open for the life of this value.
#[derive(Debug)]
pub struct Listeners {
    items: Vec<(ListenSpec, OwnedFd)>,
}

const BACKLOG: i32 = 4096;

/// How long a bind waits for a port that is still in use: the app of a
/// dewy killed with SIGKILL gets SIGTERM from the kernel and may need a
/// moment to exit and free it.
const BIND_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Binds `addr`; `[::]` is dual-stack (IPv4 too), other IPv6 addresses are
/// IPv6 only. A port in use is retried for [`BIND_PATIENCE`].
fn bind_tcp(addr: SocketAddr) -> std::io::Result<Socket> {
    let deadline = std::time::Instant::now() + BIND_PATIENCE;
    loop {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(!addr.ip().is_unspecified())?;
        }
        match socket.bind(&addr.into()) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && std::time::Instant::now() < deadline => {
                tracing::warn!(%addr, "Port in use, waiting for it to be freed");
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
            Err(e) => return Err(e),
            Ok(()) => {
                socket.listen(BACKLOG)?;
                return Ok(socket);
            }
        }
    }
}

impl Listeners {
    /// Binds every spec with a production backlog (4096, capped by the
    /// kernel's `somaxconn`).
    pub fn bind(specs: &[ListenSpec]) -> Result<Self, Error> {
        let mut items = Vec::new();
        for spec in specs {
            let err = |source| Error::Bind {
                spec: spec.starter_name(),
                source,
            };
            let socket = match spec {
                // A bare port is IPv4 0.0.0.0, as `start_server --port=8000`
                // binds it: Server::Starter apps unpack it as sockaddr_in.
                ListenSpec::Port(p) => bind_tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *p)).map_err(err)?,
                ListenSpec::Addr(a) => bind_tcp(*a).map_err(err)?,
                ListenSpec::Unix(path) => {
                    if std::fs::symlink_metadata(path).is_ok_and(|m| {
                        use std::os::unix::fs::FileTypeExt;
                        m.file_type().is_socket()
                    }) {
                        let _ = std::fs::remove_file(path);
                    }
                    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(err)?;
                    socket.bind(&SockAddr::unix(path).map_err(err)?).map_err(err)?;
                    socket.listen(BACKLOG).map_err(err)?;
                    socket
                }
            };
            items.push((spec.clone(), OwnedFd::from(socket)));
        }
        Ok(Self { items })
    }

    /// No listeners (an app without ports).
    pub fn none() -> Self {
        Self { items: Vec::new() }
    }

    /// The listeners and their descriptors, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&ListenSpec, BorrowedFd<'_>)> {
        self.items.iter().map(|(s, fd)| (s, fd.as_fd()))
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The local address of TCP listener `i`, when it is one.
    pub fn local_addr(&self, i: usize) -> Option<SocketAddr> {
        let (_, fd) = self.items.get(i)?;
        let socket = Socket::from(fd.try_clone().ok()?);
        socket.local_addr().ok()?.as_socket()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_syntax() {
        let p = |s: &[&str]| parse_ports(s).map(|v| v.iter().map(ListenSpec::starter_name).collect::<Vec<_>>());
        assert_eq!(p(&["8000"]).unwrap(), ["8000"]);
        assert_eq!(p(&["8000,8001", "8001"]).unwrap(), ["8000", "8001"]);
        assert_eq!(p(&["8000-8003"]).unwrap(), ["8000", "8001", "8002", "8003"]);
        assert_eq!(
            p(&["127.0.0.1:8000", "[::1]:9000", "/run/app.sock"]).unwrap(),
            ["127.0.0.1:8000", "[::1]:9000", "/run/app.sock"]
        );
        assert_eq!(p(&["localhost:80"]).unwrap(), ["127.0.0.1:80"]);
        for bad in ["0", "70000", "abc", "9000-8000", "1-200", "8000,", "999.1.1.1:80"] {
            let err = p(&[bad]).unwrap_err().to_string();
            assert!(err.contains(bad.trim_end_matches(',')), "{bad}: {err}");
        }
    }
}
