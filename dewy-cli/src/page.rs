//! The status page at `GET /` of the admin API: one self-contained HTML
//! document (no external fonts, scripts or styles), rendered on the server
//! with the essentials so it reads without JavaScript, then refreshed by
//! its script from the JSON endpoints.

use std::fmt::Write as _;
use std::path::Path;

const TEMPLATE: &str = include_str!("status.html");

/// Who may act from the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Auth {
    /// The unix socket: the caller is the owner.
    Socket,
    /// The TCP port with `--admin-token`: the page asks for it.
    Token,
    /// The TCP port without a token: actions are refused.
    None,
}

impl Auth {
    fn as_str(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Token => "token",
            Self::None => "none",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::Socket => "",
            Self::Token => "Actions are disabled until you enter the admin token.",
            Self::None => {
                "Actions are disabled: no --admin-token is configured on this port (use the unix socket, or start dewy with --admin-token)."
            }
        }
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "–".to_owned(),
        serde_json::Value::String(s) if s.is_empty() => "–".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The page for `status` (the JSON of `/api/status`), the history and the
/// releases on disk.
pub(crate) fn render(
    status: &serde_json::Value,
    history: &[dewy_core::HistoryEntry],
    releases: &[serde_json::Value],
    fleet: &[serde_json::Value],
    rollout: Option<&dewy_core::rollout::Record>,
    auth: Auth,
) -> String {
    let (rollout_summary, rollout_waves) = match rollout {
        None => (
            "No staged rollout (--rollout) seen by this host.".to_owned(),
            String::new(),
        ),
        Some(r) => {
            let summary = format!(
                "{}: {}{}, wave {} open, {} failure{}; plan {}",
                r.release,
                r.state.as_str(),
                r.reason.as_deref().map(|x| format!(" ({x})")).unwrap_or_default(),
                r.wave,
                r.failures,
                if r.failures == 1 { "" } else { "s" },
                r.plan
            );
            let mut waves: std::collections::BTreeMap<u32, Vec<String>> = std::collections::BTreeMap::new();
            for (host, slot) in &r.hosts {
                waves
                    .entry(slot.wave)
                    .or_default()
                    .push(format!("{host} {}", slot.phase.as_str()));
            }
            let mut rows = String::new();
            for (wave, hosts) in waves {
                let label = if wave == 0 {
                    "0 (canary)".to_owned()
                } else {
                    wave.to_string()
                };
                let _ = write!(
                    rows,
                    "<tr class=\"wave\"><td>{label}</td><td>{}</td></tr>",
                    escape(&hosts.join(", "))
                );
            }
            (escape(&summary), rows)
        }
    };
    let mut hosts = String::new();
    for h in fleet {
        let stale = if h["stale"] == true { " (stale)" } else { "" };
        let _ = write!(
            hosts,
            "<tr class=\"host\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}{stale}</td></tr>",
            escape(&text(&h["host"])),
            escape(&text(&h["version"])),
            if h["running"] == true { "running" } else { "–" },
            escape(&text(&h["last_check"])),
            escape(&text(&h["last_outcome"])),
            escape(&text(&h["at"]))
        );
    }
    let mut events = String::new();
    for e in history.iter().rev().filter(|e| e.outcome != "extracted") {
        let _ = write!(
            events,
            "<li class=\"event-row {}\">{} · {} · {}",
            escape(&e.outcome),
            escape(&e.time.to_string()),
            escape(&e.version),
            escape(&e.outcome)
        );
        if let Some(reason) = &e.reason {
            let _ = write!(events, "<span class=\"reason\"> · {}</span>", escape(reason));
        }
        events.push_str("</li>");
    }
    let mut rows = String::new();
    for r in releases {
        let current = if r["current"] == true { " (current)" } else { "" };
        let _ = write!(
            rows,
            "<tr><td>{}{current}</td><td>{}</td><td>{}</td><td>{}</td><td></td></tr>",
            escape(&text(&r["version"])),
            escape(&text(&r["release"])),
            escape(&text(&r["deployed_at"])),
            escape(&text(&r["size_bytes"]))
        );
    }
    let deployed_at = releases
        .iter()
        .find(|r| r["current"] == true)
        .map(|r| text(&r["deployed_at"]))
        .unwrap_or_else(|| "–".to_owned());
    let running = match (status["mode"].as_str(), status["is_running"].as_bool()) {
        (Some("assets"), _) => "assets only",
        (_, Some(true)) => "running",
        _ => "not running",
    };
    let field = |k: &str| escape(&text(&status[k]));
    let uptime = status["uptime_seconds"]
        .as_u64()
        .map_or_else(|| "–".to_owned(), |s| format!("{s}s"));
    let cache = match status["cache_degraded"].as_str() {
        Some(why) => format!("degraded: {}", escape(why)),
        None => "ok".to_owned(),
    };
    let replacements: [(&str, String); 26] = [
        ("{{title}}", field("current_version")),
        ("{{auth}}", auth.as_str().to_owned()),
        ("{{auth_reason}}", escape(auth.reason())),
        ("{{mode}}", field("mode")),
        ("{{dewy_version}}", format!("v{}", field("dewy_version"))),
        ("{{version}}", field("current_version")),
        ("{{release}}", field("current_release")),
        ("{{deployed_at}}", escape(&deployed_at)),
        ("{{running}}", running.to_owned()),
        ("{{generation}}", field("generation")),
        ("{{pid}}", field("pid")),
        ("{{uptime}}", uptime),
        ("{{registry}}", field("registry")),
        ("{{last_check}}", field("last_check")),
        ("{{last_outcome}}", field("last_outcome")),
        ("{{last_error}}", field("last_error")),
        ("{{next_check}}", field("next_check")),
        ("{{deploying}}", field("deploying")),
        ("{{pinned}}", field("pinned")),
        ("{{bad}}", field("bad_release")),
        ("{{cache}}", cache),
        ("{{events}}", events),
        ("{{releases}}", rows),
        ("{{fleet}}", hosts),
        ("{{rollout_summary}}", rollout_summary),
        ("{{rollout_waves}}", rollout_waves),
    ];
    let mut page = TEMPLATE.to_owned();
    for (key, value) in replacements {
        page = page.replace(key, &value);
    }
    page
}

/// Seconds since process `pid` started, from `/proc` (Linux).
pub(crate) fn uptime_seconds(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let start_ticks: u64 = rest.split(' ').nth(19)?.parse().ok()?;
    let boot_uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let started = start_ticks as f64 / ticks as f64;
    Some((boot_uptime - started).max(0.0) as u64)
}

/// Total size of the files under `dir` (links not followed).
pub(crate) fn folder_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => total += entry.metadata().map(|m| m.len()).unwrap_or(0),
                _ => {}
            }
        }
    }
    total
}

/// The status page of `dewy container` (read-only; refreshed every 5 s by
/// the browser, no script): the replicas with their version, digest, open
/// connections and whether they serve, the proxy ports, and the last check,
/// from the JSON of its `/api/status`.
pub(crate) fn render_container(status: &serde_json::Value) -> String {
    let short = |v: &serde_json::Value, n: usize| {
        let t = text(v);
        let t = t.trim_start_matches("sha256:");
        escape(&t.chars().take(n).collect::<String>())
    };
    let backends: Vec<&serde_json::Value> = status["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["backends"].as_array().into_iter().flatten())
        .collect();
    let mut replicas = String::new();
    for r in status["replicas"].as_array().into_iter().flatten() {
        let id = r["id"].as_str().unwrap_or_default();
        let mine: Vec<&&serde_json::Value> = backends.iter().filter(|b| b["container"] == id).collect();
        let open: u64 = mine.iter().filter_map(|b| b["open_connections"].as_u64()).sum();
        let serving = !mine.is_empty() && mine.iter().all(|b| b["failed"] != true);
        replicas.push_str(&format!(
            "<tr><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{open}</td><td class=\"{}\">{}</td></tr>\n",
            short(&r["id"], 12),
            escape(&text(&r["version"])),
            short(&r["digest"], 12),
            if serving { "ok" } else { "bad" },
            if serving { "serving" } else { "not serving" },
        ));
    }
    if replicas.is_empty() {
        replicas.push_str("<tr><td colspan=\"5\">No replica yet.</td></tr>\n");
    }
    let mut proxies = String::new();
    for p in status["proxies"].as_array().into_iter().flatten() {
        proxies.push_str(&format!(
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&text(&p["listen"])),
            escape(&text(&p["accepted"])),
            escape(&text(&p["refused"])),
            p["backends"].as_array().map_or(0, Vec::len),
        ));
    }
    let error = match &status["last_error"] {
        serde_json::Value::String(e) if !e.is_empty() => format!("<p class=\"bad\">Last error: {}</p>", escape(e)),
        _ => String::new(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dewy · {name} (container)</title>
<style>
body{{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#1d1d1f}}
table{{border-collapse:collapse;width:100%;margin:.5rem 0 1.5rem}}td,th{{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #ddd}}
.big{{font-size:2rem;font-weight:600}}.ok{{color:#1a7f37}}.bad{{color:#cf222e}}code{{font-size:.9em}}.muted{{color:#6e6e73}}
</style></head><body>
<h1>{name} <span class="muted">container mode · dewy {dewy}</span></h1>
<div class="big" id="version">{version}</div>
<p>{count} replica(s) · last check {at} ({outcome})</p>
{error}
<h2>Replicas</h2>
<table><tr><th>Container</th><th>Version</th><th>Digest</th><th>Open connections</th><th>Proxy</th></tr>
{replicas}</table>
<h2>Proxy ports</h2>
<table><tr><th>Listen</th><th>Accepted</th><th>Refused</th><th>Backends</th></tr>
{proxies}</table>
<p class="muted">Read-only; refreshed every 5 seconds. JSON: <code>/api/status</code>, <code>/api/containers</code>, <code>/metrics</code>.</p>
</body></html>
"#,
        name = escape(&text(&status["name"])),
        dewy = escape(&text(&status["dewy_version"])),
        version = escape(&text(&status["current_version"])),
        count = status["replicas"].as_array().map_or(0, Vec::len),
        at = escape(&text(&status["last_check"])),
        outcome = escape(&text(&status["last_outcome"])),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained_small_and_escaped() {
        let status = serde_json::json!({
            "mode": "server", "dewy_version": "0.1.0", "current_version": "v1.0.0<script>",
            "is_running": true, "generation": 2, "pid": 42,
        });
        let history = vec![dewy_core::HistoryEntry {
            time: jiff::Timestamp::UNIX_EPOCH,
            version: "v0.9.0".into(),
            outcome: "failed".into(),
            duration_ms: 1,
            release_dir: None,
            reason: Some("it <broke>".into()),
        }];
        let page = render(&status, &history, &[], &[], None, Auth::None);
        assert!(page.len() < 100 * 1024, "{} bytes", page.len());
        assert!(!page.contains("{{"), "every placeholder is filled");
        assert!(page.contains("v1.0.0&lt;script&gt;") && !page.contains("v1.0.0<script>"));
        assert!(page.contains("it &lt;broke&gt;"));
        assert!(page.contains("data-auth=\"none\"") && page.contains("no --admin-token"));
        for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
            assert!(!page.contains(external), "no external resource: {external}");
        }
        assert!(page.contains("No staged rollout"));
    }

    #[test]
    fn the_rollout_is_drawn_by_wave() {
        let key = dewy_cache::Key::new("v2--app.tgz").unwrap();
        let now = jiff::Timestamp::UNIX_EPOCH;
        let mut record =
            dewy_core::rollout::Record::new("v2", &key, &dewy_core::rollout::Plan::default(), "web-1", now);
        assert!(matches!(
            record.admit("web-1", 4, None, now),
            dewy_core::rollout::Admission::Go { wave: 0 }
        ));
        record.fail("web-1", "GET /health answered <500>", now);
        let status = serde_json::json!({"mode": "server"});
        let page = render(&status, &[], &[], &[], Some(&record), Auth::None);
        assert!(page.contains("v2: halted (1 of 1 allowed failures; last on web-1: GET /health answered &lt;500&gt;)"));
        assert!(page.contains("<td>0 (canary)</td><td>web-1 failed</td>"), "{page}");
    }
}
