//! A real browser for page tests: Debian's `chromium`, headless, driven
//! through `chromedriver` with the W3C WebDriver protocol (JSON over HTTP
//! on loopback; a few calls are all a test needs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::{ServerProcess, free_port, require, require_from};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless chromium session.
#[derive(Debug)]
pub struct Browser {
    driver: SocketAddr,
    session: String,
    _process: ServerProcess,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless chromium.
    pub fn start() -> Self {
        let driver_bin = require_from("chromedriver", "chromium-driver");
        let chromium = require("chromium");
        let profile = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut cmd = Command::new(driver_bin);
        cmd.arg(format!("--port={port}"));
        let mut process = ServerProcess::spawn("chromedriver", cmd, profile.path().join("chromedriver.log"));
        let driver: SocketAddr = ([127, 0, 0, 1], port).into();
        process.wait_until(Duration::from_secs(30), || TcpStream::connect(driver).is_ok());
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1200,1100",
                    format!("--user-data-dir={}", profile.path().join("profile").display()),
                ],
            },
        }}});
        let created = call(driver, "POST", "/session", Some(&caps));
        let session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {created}; chromedriver log:\n{}", process.log()))
            .to_owned();
        Self {
            driver,
            session,
            _process: process,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        call(self.driver, method, &format!("/session/{}{path}", self.session), body)
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(&json!({"url": url})));
    }

    fn elements(&self, css: &str) -> Vec<String> {
        let found = self.call(
            "POST",
            "/elements",
            Some(&json!({"using": "css selector", "value": css})),
        );
        found
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn element(&self, css: &str) -> String {
        self.elements(css)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no element matches `{css}`"))
    }

    /// How many elements match `css`.
    pub fn count(&self, css: &str) -> usize {
        self.elements(css).len()
    }

    /// The rendered text of the first element matching `css`, read in one
    /// script (a page that re-renders every few seconds never hands back a
    /// stale element between finding it and reading it).
    pub fn text(&self, css: &str) -> String {
        match self.texts_of(css, true).into_iter().next() {
            Some(text) => text,
            None => panic!("no element matches `{css}`"),
        }
    }

    /// The texts of every element matching `css` (one script, as
    /// [`Browser::text`]).
    pub fn texts(&self, css: &str) -> Vec<String> {
        self.texts_of(css, false)
    }

    fn texts_of(&self, css: &str, first: bool) -> Vec<String> {
        let script = "const all = Array.from(document.querySelectorAll(arguments[0])).map((e) => e.innerText);\
                      return arguments[1] ? all.slice(0, 1) : all;";
        let found = self.call(
            "POST",
            "/execute/sync",
            Some(&json!({"script": script, "args": [css, first]})),
        );
        found
            .as_array()
            .map(|a| a.iter().map(|t| t.as_str().unwrap_or_default().to_owned()).collect())
            .unwrap_or_default()
    }

    /// A DOM property (`disabled`, `title`, `value`) of the first match.
    pub fn property(&self, css: &str, name: &str) -> Value {
        self.on_element(css, "GET", &format!("property/{name}"), None)
    }

    /// Clicks the first element matching `css`.
    pub fn click(&self, css: &str) {
        self.on_element(css, "POST", "click", Some(&json!({})));
    }

    /// One command on the first element matching `css`, found again when
    /// the page re-rendered it in between (a stale element).
    fn on_element(&self, css: &str, method: &str, command: &str, body: Option<&Value>) -> Value {
        for _ in 0..5 {
            let id = self.element(css);
            let path = format!("/session/{}/element/{id}/{command}", self.session);
            match try_call(self.driver, method, &path, body) {
                Ok(value) => return value,
                Err((error, _)) if error == "stale element reference" => continue,
                Err((error, message)) => panic!("WebDriver {method} {path}: {error}: {message}"),
            }
        }
        panic!("`{css}` kept being re-rendered under five attempts to {command} it")
    }

    /// Clears the first element matching `css` and types `text` into it.
    pub fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.call("POST", &format!("/element/{id}/clear"), Some(&json!({})));
        self.call("POST", &format!("/element/{id}/value"), Some(&json!({"text": text})));
    }

    /// The text of the open `confirm()` dialog, which is accepted.
    pub fn accept_dialog(&self) -> String {
        let text = self
            .call("GET", "/alert/text", None)
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.call("POST", "/alert/accept", Some(&json!({})));
        text
    }

    /// Saves a PNG screenshot of the window.
    pub fn screenshot(&self, path: &Path) {
        let data = self.call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(data.as_str().expect("base64 PNG"))
            .expect("decode the screenshot");
        std::fs::write(path, png).expect("write the screenshot");
    }

    /// Runs `script` in the page and returns its value.
    pub fn execute(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", Some(&json!({"script": script, "args": []})))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            call(self.driver, "DELETE", &format!("/session/{}", self.session), None)
        }));
    }
}

/// One WebDriver command; panics on an error answer, naming it.
fn call(driver: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Value {
    try_call(driver, method, path, body)
        .unwrap_or_else(|(error, message)| panic!("WebDriver {method} {path}: {error}: {message}"))
}

/// One WebDriver command: its value, or the error and message it answered.
fn try_call(driver: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value, (String, Value)> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(driver).expect("connect to chromedriver");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {driver}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send a WebDriver command");
    // chromedriver may keep the connection open: read the head, then
    // exactly Content-Length bytes (or chunks until the last one).
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut buf).expect("read the WebDriver answer");
        assert!(n > 0, "chromedriver closed the connection without an answer");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    let payload = match length {
        Some(len) => {
            while raw.len() < head_end + len {
                let n = stream.read(&mut buf).expect("read the WebDriver answer");
                assert!(n > 0, "chromedriver closed the connection mid-answer");
                raw.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&raw[head_end..head_end + len]).into_owned()
        }
        None => {
            while !raw.ends_with(b"0\r\n\r\n") {
                let n = stream.read(&mut buf).expect("read the WebDriver answer");
                if n == 0 {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
            }
            dechunk(&String::from_utf8_lossy(&raw[head_end..]))
        }
    };
    let answer: Value = serde_json::from_str(&payload).unwrap_or_else(|e| panic!("{method} {path}: {e}: {payload}"));
    let value = answer["value"].clone();
    if let Some(error) = value.get("error").and_then(Value::as_str) {
        return Err((error.to_owned(), value["message"].clone()));
    }
    Ok(value)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}
