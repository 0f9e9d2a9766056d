//! A tiny HTTP/1.1 app that takes its listening sockets from its supervisor,
//! the way apps run under dewy (or Perl's `start_server`) do.
//!
//! Sockets come from `SERVER_STARTER_PORT` (`host:port=fd;...`), else from
//! systemd's `LISTEN_FDS` (fds from 3, checked against `LISTEN_PID`), else it
//! binds `$HOST:$PORT` itself (default `127.0.0.1:8000`; `HOST=0.0.0.0` in a
//! container). Every answer says
//! `version=<v> generation=<g> pid=<p>`; the version comes from `APP_VERSION`
//! or the `VERSION` file next to the executable (so a release folder carries
//! it). `GET /health` answers with `DEMO_HEALTH_STATUS` (default 200).
//!
//! On SIGTERM it drains: no new accepts, `Connection: close` on the next
//! response of each connection, exit once idle. When `NOTIFY_SOCKET` is set
//! it sends `READY=1` once it serves.
//!
//! Fault switches for tests, from the environment or from `demo.env` next to
//! the executable (`KEY=VALUE` lines): `DEMO_EXIT_AT_START=1` exits at once
//! with status 3, `DEMO_IGNORE_TERM=1` ignores SIGTERM, `DEMO_NO_READY=1`
//! never sends `READY=1`, `DEMO_START_DELAY_MS` waits before serving,
//! `DEMO_UNHEALTHY_AFTER_MS` turns `/health` to 500 that long after start.
#![allow(unsafe_code, clippy::print_stderr, clippy::exit)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::SeqCst);
}

struct Config {
    version: String,
    generation: String,
    health: u16,
    /// `/health` answers 500 from this long after the start on.
    unhealthy_after: Option<Duration>,
    started: std::time::Instant,
    settings: HashMap<String, String>,
}

impl Config {
    fn health_now(&self) -> u16 {
        match self.unhealthy_after {
            Some(d) if self.started.elapsed() >= d => 500,
            _ => self.health,
        }
    }
}

fn settings() -> HashMap<String, String> {
    let mut out: HashMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("DEMO_")).collect();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(ToOwned::to_owned))
        && let Ok(text) = std::fs::read_to_string(dir.join("demo.env"))
    {
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                out.insert(k.trim().to_owned(), v.trim().to_owned());
            }
        }
    }
    out
}

fn version() -> String {
    if let Ok(v) = std::env::var("APP_VERSION") {
        return v;
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| std::fs::read_to_string(p.with_file_name("VERSION")).ok())
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "dev".to_owned())
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

fn inherited() -> Vec<Listener> {
    let fds: Vec<(i32, bool)> = if let Ok(spec) = std::env::var("SERVER_STARTER_PORT") {
        spec.split(';')
            .filter(|s| !s.is_empty())
            .filter_map(|s| s.rsplit_once('='))
            .filter_map(|(addr, fd)| Some((fd.parse().ok()?, addr.starts_with('/'))))
            .collect()
    } else if let Ok(n) = std::env::var("LISTEN_FDS") {
        let pid_ok = std::env::var("LISTEN_PID").map_or(true, |p| p == std::process::id().to_string());
        if !pid_ok {
            eprintln!("demo-app: LISTEN_PID is not mine; ignoring LISTEN_FDS");
            return Vec::new();
        }
        (0..n.parse::<i32>().unwrap_or(0)).map(|i| (3 + i, false)).collect()
    } else {
        return Vec::new();
    };
    fds.into_iter()
        .map(|(fd, unix)| {
            // SAFETY: the supervisor passed these descriptors to us as open
            // listening sockets, and nothing else in this process owns them.
            unsafe {
                if unix {
                    Listener::Unix(UnixListener::from_raw_fd(fd))
                } else {
                    Listener::Tcp(TcpListener::from_raw_fd(fd))
                }
            }
        })
        .collect()
}

fn main() {
    let settings = settings();
    let on = |k: &str| settings.get(k).is_some_and(|v| v == "1" || v == "true");
    if on("DEMO_EXIT_AT_START") {
        eprintln!("demo-app: exiting at start as asked");
        std::process::exit(3);
    }
    if !on("DEMO_IGNORE_TERM") {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        }
    } else {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
    if let Some(ms) = settings.get("DEMO_START_DELAY_MS").and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let mut listeners = inherited();
    if listeners.is_empty() {
        let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
        let port = std::env::var("PORT").unwrap_or_else(|_| "8000".into());
        listeners.push(Listener::Tcp(
            TcpListener::bind(format!("{host}:{port}")).expect("bind"),
        ));
    }
    let config = Arc::new(Config {
        version: version(),
        generation: std::env::var("SERVER_STARTER_GENERATION").unwrap_or_else(|_| "0".into()),
        health: settings
            .get("DEMO_HEALTH_STATUS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
        unhealthy_after: settings
            .get("DEMO_UNHEALTHY_AFTER_MS")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        started: std::time::Instant::now(),
        settings: settings.clone(),
    });
    let active = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for l in listeners {
        let (config, active) = (config.clone(), active.clone());
        threads.push(std::thread::spawn(move || accept_loop(l, config, active)));
    }
    if let Ok(path) = std::env::var("NOTIFY_SOCKET")
        && config.settings.get("DEMO_NO_READY").is_none_or(|v| v != "1")
        && let Ok(sock) = UnixDatagram::unbound()
    {
        let _ = sock.send_to(b"READY=1", &path);
    }
    for t in threads {
        let _ = t.join();
    }
    while active.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn accept_loop(listener: Listener, config: Arc<Config>, active: Arc<AtomicUsize>) {
    let _ = match &listener {
        Listener::Tcp(l) => l.set_nonblocking(true),
        Listener::Unix(l) => l.set_nonblocking(true),
    };
    while !TERM.load(Ordering::SeqCst) {
        let conn: std::io::Result<Box<dyn Conn>> = match &listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
            Listener::Unix(l) => l.accept().map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        };
        match conn {
            Ok(stream) => {
                let (config, active) = (config.clone(), active.clone());
                active.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    serve(stream, &config);
                    active.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

trait Conn: std::io::Read + Write + Send {
    fn set_timeout(&self, d: Duration);
    fn set_blocking(&self);
    fn try_clone_box(&self) -> Option<Box<dyn Conn>>;
}

impl Conn for TcpStream {
    fn set_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
    }
    fn set_blocking(&self) {
        let _ = self.set_nonblocking(false);
    }
    fn try_clone_box(&self) -> Option<Box<dyn Conn>> {
        self.try_clone().ok().map(|s| Box::new(s) as Box<dyn Conn>)
    }
}

impl Conn for UnixStream {
    fn set_timeout(&self, d: Duration) {
        let _ = self.set_read_timeout(Some(d));
    }
    fn set_blocking(&self) {
        let _ = self.set_nonblocking(false);
    }
    fn try_clone_box(&self) -> Option<Box<dyn Conn>> {
        self.try_clone().ok().map(|s| Box::new(s) as Box<dyn Conn>)
    }
}

fn serve(stream: Box<dyn Conn>, config: &Config) {
    stream.set_blocking();
    stream.set_timeout(Duration::from_millis(100));
    let Some(mut writer) = stream.try_clone_box() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if TERM.load(Ordering::SeqCst) && request_line.is_empty() {
                    return; // idle keep-alive connection while draining
                }
                continue;
            }
            Err(_) => return,
        }
        let mut close = request_line.contains("HTTP/1.0");
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) => return,
                Ok(_) if h == "\r\n" || h == "\n" => break,
                Ok(_) => {
                    if h.to_ascii_lowercase().starts_with("connection: close") {
                        close = true;
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
                Err(_) => return,
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let (status, body) = if path == "/health" {
            let h = config.health_now();
            (h, format!("health={h}\n"))
        } else {
            (
                200,
                format!(
                    "version={} generation={} pid={}\n",
                    config.version,
                    config.generation,
                    std::process::id()
                ),
            )
        };
        close |= TERM.load(Ordering::SeqCst);
        let response = format!(
            "HTTP/1.1 {status} {}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: {}\r\n\r\n{body}",
            if status < 400 { "OK" } else { "Error" },
            body.len(),
            if close { "close" } else { "keep-alive" }
        );
        if writer.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}
