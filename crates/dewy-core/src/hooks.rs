//! Deploy hooks: `/bin/sh -c` with a timeout, in their own process group.

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

/// What a hook did.
#[derive(Debug, Clone)]
pub struct HookOutcome {
    /// The command.
    pub command: String,
    /// Its stdout (trimmed, at most 64 KiB).
    pub stdout: String,
    /// Its stderr (trimmed, at most 64 KiB).
    pub stderr: String,
    /// Exit code; `None` when killed (by its timeout or a signal).
    pub exit_code: Option<i32>,
    /// How long it ran.
    pub duration: Duration,
    /// Whether it timed out.
    pub timed_out: bool,
}

impl HookOutcome {
    /// Exit code 0 within the timeout.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// A one-line reason for a failure.
    pub fn failure(&self) -> String {
        if self.timed_out {
            format!("hook timed out after {:?} and was killed", self.duration)
        } else {
            match self.exit_code {
                Some(c) => format!("command failed with exit code {c}"),
                None => "command was killed by a signal".to_owned(),
            }
        }
    }
}

const OUTPUT_LIMIT: usize = 64 * 1024;

async fn read_limited(mut r: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if buf.len() < OUTPUT_LIMIT {
                    let take = n.min(OUTPUT_LIMIT - buf.len());
                    buf.extend_from_slice(&chunk[..take]);
                }
            }
        }
    }
    String::from_utf8_lossy(&buf).trim().to_owned()
}

/// Runs `command` with `/bin/sh -c` in `dir` with exactly `env`, killing its
/// process group after `timeout`. Output is kept up to 64 KiB per stream.
pub async fn run(
    command: &str,
    dir: &Path,
    env: &[(OsString, OsString)],
    timeout: Duration,
) -> std::io::Result<HookOutcome> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().unwrap_or(0) as i32;
    let out = tokio::spawn(read_limited(child.stdout.take().expect("piped")));
    let err = tokio::spawn(read_limited(child.stderr.take().expect("piped")));
    let (status, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (Some(status?), false),
        Err(_) => {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait().await;
            (None, true)
        }
    };
    // A killed hook's grandchildren may keep the pipes open: do not wait
    // for them forever.
    let grace = Duration::from_millis(if timed_out { 200 } else { 5000 });
    let stdout = tokio::time::timeout(grace, out)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let stderr = tokio::time::timeout(grace, err)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Ok(HookOutcome {
        command: command.to_owned(),
        stdout,
        stderr,
        exit_code: status.and_then(|s| s.code()),
        duration: started.elapsed(),
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hooks_capture_output_env_and_time_out() {
        let dir = tempfile::tempdir().unwrap();
        let env = vec![
            (OsString::from("DEWY_VERSION"), OsString::from("v1.2.3")),
            (OsString::from("PATH"), OsString::from("/usr/bin:/bin")),
        ];
        let o = run(
            "echo $DEWY_VERSION; echo oops >&2; exit 3",
            dir.path(),
            &env,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(o.stdout, "v1.2.3");
        assert_eq!(o.stderr, "oops");
        assert_eq!(o.exit_code, Some(3));
        assert!(!o.success());
        assert!(o.failure().contains("exit code 3"));
        let o = run("pwd", dir.path(), &env, Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            std::path::Path::new(&o.stdout).canonicalize().unwrap(),
            dir.path().canonicalize().unwrap()
        );
        let started = Instant::now();
        let o = run("sleep 30 & sleep 30", dir.path(), &env, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(o.timed_out && !o.success());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
