//! The deploy loop's handle: error limiting, quiet mode, a bounded queue and
//! the background sender.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify as Wake;

use crate::{Context, HookReport, Level, Notification, Notifier};

const QUEUE_CAPACITY: usize = 64;
const ERROR_LIMIT: u32 = 3;
const SEND_TIMEOUT: Duration = Duration::from_secs(15);
const RETRIES: u32 = 3;

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct NotifyStats {
    /// Delivered.
    pub sent: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Given up on after retries.
    pub failed: AtomicU64,
    /// Errors suppressed by the error limit.
    pub suppressed: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<VecDeque<Notification>>,
    wake: Wake,
    idle: Wake,
    closed: std::sync::atomic::AtomicBool,
    stats: NotifyStats,
}

/// What the deploy loop holds. Every method returns at once.
#[derive(Debug, Clone)]
pub struct Notify {
    shared: Arc<Shared>,
    notifier: Arc<dyn Notifier>,
    errors: Arc<Mutex<ErrorCount>>,
    quiet: bool,
}

#[derive(Debug, Default)]
struct ErrorCount {
    count: u32,
    suppressed: u32,
}

impl Notify {
    /// Starts the background sender for `notifier` (inside a tokio runtime).
    pub fn new(notifier: Arc<dyn Notifier>, context: Context, quiet: bool) -> Self {
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Wake::new(),
            idle: Wake::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
            stats: NotifyStats::default(),
        });
        tokio::spawn(sender(shared.clone(), notifier.clone(), context));
        Self {
            shared,
            notifier,
            errors: Arc::new(Mutex::new(ErrorCount::default())),
            quiet,
        }
    }

    /// The release in `dir` is (about to be) in place: see
    /// [`Notifier::on_deploy`].
    pub fn on_deploy(&self, dir: &std::path::Path) {
        self.notifier.on_deploy(dir);
    }

    /// Delivery counters.
    pub fn stats(&self) -> &NotifyStats {
        &self.shared.stats
    }

    fn push(&self, n: Notification) {
        if self.shared.closed.load(Ordering::SeqCst) {
            return;
        }
        {
            let mut q = self.shared.queue.lock().expect("notify queue");
            if q.len() >= QUEUE_CAPACITY {
                // Drop the oldest message that is not an error; if all are
                // errors, the oldest error.
                let victim = q.iter().position(|m| m.level != Level::Error).unwrap_or(0);
                q.remove(victim);
                self.shared.stats.dropped.fetch_add(1, Ordering::SeqCst);
                tracing::warn!("Notification queue full, dropped the oldest message");
            }
            q.push_back(n);
        }
        self.shared.wake.notify_one();
    }

    /// A routine message (not sent in quiet mode).
    pub fn send(&self, text: impl Into<String>) {
        if !self.quiet {
            self.push(Notification {
                level: Level::Info,
                text: text.into(),
                hook: None,
            });
        }
    }

    /// A milestone (sent in quiet mode too).
    pub fn send_important(&self, text: impl Into<String>) {
        self.push(Notification {
            level: Level::Important,
            text: text.into(),
            hook: None,
        });
    }

    /// An error, subject to the error limit.
    pub fn send_error(&self, error: impl std::fmt::Display) {
        let mut e = self.errors.lock().expect("error count");
        e.count = (e.count + 1).min(1000);
        // The failure itself is logged by the caller (one ERROR line per
        // failure, not three).
        tracing::debug!(count = e.count, error = %error, "Error count");
        let text = match e.count {
            n if n < ERROR_LIMIT => format!("Error occurred (count: {n}): {error}"),
            ERROR_LIMIT => format!(
                "⚠️ No more error notifications will be sent until errors are resolved.\n\nError occurred (count: {ERROR_LIMIT}): {error}"
            ),
            _ => {
                e.suppressed += 1;
                self.shared.stats.suppressed.fetch_add(1, Ordering::SeqCst);
                return;
            }
        };
        drop(e);
        self.push(Notification {
            level: Level::Error,
            text,
            hook: None,
        });
    }

    /// A hook's result: in quiet mode only failures.
    pub fn send_hook_result(&self, report: HookReport) {
        if self.quiet && report.success {
            return;
        }
        let level = if report.success { Level::Info } else { Level::Error };
        let text = format!(
            "{} hook {}: `{}` (exit code {}, {:.1}s)",
            report.stage,
            if report.success { "succeeded" } else { "failed" },
            report.command,
            report.exit_code.map_or_else(|| "none".to_owned(), |c| c.to_string()),
            report.duration.as_secs_f64()
        );
        self.push(Notification {
            level,
            text,
            hook: Some(report),
        });
    }

    /// A tick succeeded: resets the error count; the first success after
    /// errors says how many error notifications were suppressed.
    pub fn success(&self) {
        let mut e = self.errors.lock().expect("error count");
        if e.count == 0 {
            return;
        }
        tracing::info!(from = e.count, to = 0, "Error count reset");
        let (count, suppressed) = (e.count, e.suppressed);
        *e = ErrorCount::default();
        drop(e);
        let text = if suppressed > 0 {
            format!("Recovered after {count} errors ({suppressed} error notifications were suppressed)")
        } else {
            format!("Recovered after {count} errors")
        };
        self.push(Notification {
            level: Level::Important,
            text,
            hook: None,
        });
    }

    /// The current error count.
    pub fn error_count(&self) -> u32 {
        self.errors.lock().expect("error count").count
    }

    /// Stops accepting messages and waits until the queue is delivered or
    /// `deadline` passes; returns how many were left undelivered.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let drained = tokio::time::timeout(deadline, async {
            loop {
                let idle = self.shared.idle.notified();
                if self.shared.queue.lock().expect("notify queue").is_empty() {
                    return;
                }
                idle.await;
            }
        })
        .await;
        let left = self.shared.queue.lock().expect("notify queue").len();
        if drained.is_err() {
            tracing::warn!(
                undelivered = left,
                "Notifications not delivered before shutdown deadline"
            );
        }
        left
    }
}

async fn sender(shared: Arc<Shared>, notifier: Arc<dyn Notifier>, context: Context) {
    loop {
        let wake = shared.wake.notified();
        let next = shared.queue.lock().expect("notify queue").front().cloned();
        let Some(n) = next else {
            shared.idle.notify_waiters();
            if shared.closed.load(Ordering::SeqCst) {
                return;
            }
            wake.await;
            continue;
        };
        deliver(&shared, notifier.as_ref(), &n, &context).await;
        shared.queue.lock().expect("notify queue").pop_front();
    }
}

async fn deliver(shared: &Shared, notifier: &dyn Notifier, n: &Notification, context: &Context) {
    let mut attempt = 0;
    loop {
        let result = match tokio::time::timeout(SEND_TIMEOUT, notifier.deliver(n, context)).await {
            Ok(r) => r,
            Err(_) => Err(crate::Error::Unreachable {
                service: notifier.name(),
                source: "timed out".into(),
            }),
        };
        match result {
            Ok(()) => {
                // The null notifier delivers nothing: nothing was sent.
                if notifier.name() != "null" {
                    shared.stats.sent.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
            Err(err) if err.is_transient() && attempt < RETRIES => {
                attempt += 1;
                let delay = match &err {
                    crate::Error::RateLimited { retry_after, .. } => (*retry_after).min(Duration::from_secs(60)),
                    _ => Duration::from_millis(500) * 2u32.pow(attempt - 1),
                };
                tracing::warn!(notifier = notifier.name(), error = %err, attempt, "Notification failed, retrying");
                tokio::time::sleep(delay).await;
            }
            Err(err) => {
                shared.stats.failed.fetch_add(1, Ordering::SeqCst);
                tracing::error!(notifier = notifier.name(), error = %err, "Notification failure");
                return;
            }
        }
    }
}
