//! dewy's TCP proxy: one listener per `--port`, round-robin over the
//! healthy replicas, with open connections counted per replica so that a
//! retiring replica is drained before it is stopped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// One replica's published port behind a proxy port.
#[derive(Debug)]
pub struct Backend {
    /// The container id.
    pub container: String,
    /// `127.0.0.1:<host port>`.
    pub addr: SocketAddr,
    open: AtomicUsize,
    failed: AtomicBool,
}

impl Backend {
    /// A backend for `container` at `addr`.
    pub fn new(container: &str, addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            container: container.to_owned(),
            addr,
            open: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        })
    }

    /// Connections open through it now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Whether a connection to it failed (it gets no new connections).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

struct OpenGuard(Arc<Backend>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A listening proxy port.
#[derive(Debug)]
pub struct Proxy {
    /// The address it listens on.
    pub listen: SocketAddr,
    /// A connection with no byte in either direction for this long is
    /// closed (`--proxy-idle-timeout`; `None`: never).
    idle_timeout: Option<Duration>,
    backends: RwLock<Vec<Arc<Backend>>>,
    next: AtomicUsize,
    /// Connections accepted since start.
    pub accepted: AtomicU64,
    /// Connections refused because no replica could take them.
    pub refused: AtomicU64,
}

impl Proxy {
    /// Binds `addr`; connections wait in the backlog until [`Proxy::serve`].
    pub async fn bind(
        addr: SocketAddr,
        idle_timeout: Option<Duration>,
    ) -> std::io::Result<(Arc<Self>, tokio::net::TcpListener)> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let proxy = Arc::new(Self {
            listen: listener.local_addr()?,
            idle_timeout,
            backends: RwLock::new(Vec::new()),
            next: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        Ok((proxy, listener))
    }

    /// Accepts and forwards connections until the process ends.
    pub fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) {
        let serving = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                serving.accepted.fetch_add(1, Ordering::Relaxed);
                let proxy = serving.clone();
                tokio::spawn(async move { proxy.forward(client).await });
            }
        });
    }

    /// Binds `addr` and serves.
    pub async fn start(addr: SocketAddr, idle_timeout: Option<Duration>) -> std::io::Result<Arc<Self>> {
        let (proxy, listener) = Self::bind(addr, idle_timeout).await?;
        proxy.serve(listener);
        Ok(proxy)
    }

    /// Adds a replica to the rotation.
    pub fn add(&self, backend: Arc<Backend>) {
        self.backends
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(backend);
    }

    /// Takes `container`'s backends out of the rotation and returns them
    /// (to drain).
    pub fn remove(&self, container: &str) -> Vec<Arc<Backend>> {
        let mut list = self.backends.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (gone, kept): (Vec<_>, Vec<_>) = list.drain(..).partition(|b| b.container == container);
        *list = kept;
        gone
    }

    /// The backends in rotation.
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether any backend may take a connection.
    fn has_healthy(&self) -> bool {
        self.backends
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|b| !b.failed())
    }

    /// The next healthy backend, round-robin; `tried` are skipped.
    fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Backend>> {
        let list = self.backends.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let healthy: Vec<&Arc<Backend>> = list
            .iter()
            .filter(|b| !b.failed() && !tried.contains(&b.addr))
            .collect();
        if healthy.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % healthy.len();
        Some(healthy[i].clone())
    }

    async fn forward(&self, mut client: tokio::net::TcpStream) {
        // No replica yet (the first rollout is starting one): wait a little
        // rather than drop the connection.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.has_healthy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some((mut upstream, backend)) = self.connect().await else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(proxy = %self.listen, "No backend available");
            return;
        };
        backend.open.fetch_add(1, Ordering::SeqCst);
        let _guard = OpenGuard(backend);
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        match self.idle_timeout {
            None => {
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            Some(idle) => pipe(&mut client, &mut upstream, idle).await,
        }
    }

    /// A connection to a healthy backend, round-robin. A backend that
    /// refuses is taken out of rotation and the next one tried. A connect
    /// still pending after [`HEDGE_AFTER`] most likely lost its SYN to a
    /// full accept queue (the kernel resends it only after a second):
    /// another attempt starts beside it, on the next backend (the same one
    /// when it is alone), and the first to connect wins. At most
    /// [`MAX_ATTEMPTS`] attempts, within [`CONNECT_TIMEOUT`].
    async fn connect(&self) -> Option<(tokio::net::TcpStream, Arc<Backend>)> {
        type Attempt =
            std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>;
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let mut refused: Vec<SocketAddr> = Vec::new();
        let mut inflight: Vec<(Arc<Backend>, Attempt)> = Vec::new();
        let mut started = 0;
        let mut start_one = true;
        loop {
            if start_one
                && started < MAX_ATTEMPTS
                && let Some(backend) = self.pick(&refused)
            {
                started += 1;
                let addr = backend.addr;
                inflight.push((backend, Box::pin(tokio::net::TcpStream::connect(addr))));
            }
            if inflight.is_empty() {
                return None;
            }
            let next_hedge = (tokio::time::Instant::now() + HEDGE_AFTER).min(deadline);
            let done = std::future::poll_fn(|cx| {
                for i in 0..inflight.len() {
                    if let std::task::Poll::Ready(out) = inflight[i].1.as_mut().poll(cx) {
                        return std::task::Poll::Ready((inflight.swap_remove(i).0, out));
                    }
                }
                std::task::Poll::Pending
            });
            tokio::select! {
                (backend, result) = done => match result {
                    Ok(stream) => return Some((stream, backend)),
                    Err(e) => {
                        refused.push(backend.addr);
                        self.take_out(&backend, &e.to_string());
                        start_one = true;
                    }
                },
                () = tokio::time::sleep_until(next_hedge) => {
                    if tokio::time::Instant::now() >= deadline {
                        for (backend, _) in &inflight {
                            self.take_out(backend, &format!("no connection within {CONNECT_TIMEOUT:?}"));
                        }
                        return None;
                    }
                    start_one = true;
                }
            }
        }
    }

    /// Takes `backend` out of rotation until the next health pass puts it
    /// back.
    fn take_out(&self, backend: &Backend, why: &str) {
        backend.failed.store(true, Ordering::SeqCst);
        tracing::warn!(proxy = %self.listen, backend = %backend.addr, container = %backend.container, error = why, "Failed to connect to backend; taken out of rotation");
    }
}

/// How long a backend connect may take before another attempt starts
/// beside it.
const HEDGE_AFTER: Duration = Duration::from_millis(200);

/// Attempts per client connection (hedges and retries after refusals).
const MAX_ATTEMPTS: usize = 4;

/// How long a client connection waits for a backend connection at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Copies both ways (half-closes passed on) until both sides are done, or
/// nothing moved for `idle`. One timer per connection, re-armed only when
/// it fires (not on every read).
async fn pipe(client: &mut tokio::net::TcpStream, upstream: &mut tokio::net::TcpStream, idle: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_rx, mut client_tx) = client.split();
    let (mut up_rx, mut up_tx) = upstream.split();
    let (mut to_up, mut to_client) = (vec![0u8; 8 << 10], vec![0u8; 8 << 10]);
    let (mut client_open, mut up_open) = (true, true);
    let mut last_active = tokio::time::Instant::now();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    while client_open || up_open {
        tokio::select! {
            r = client_rx.read(&mut to_up), if client_open => match r {
                Ok(0) | Err(_) => {
                    client_open = false;
                    let _ = up_tx.shutdown().await;
                }
                Ok(n) => {
                    last_active = tokio::time::Instant::now();
                    if up_tx.write_all(&to_up[..n]).await.is_err() {
                        return;
                    }
                }
            },
            r = up_rx.read(&mut to_client), if up_open => match r {
                Ok(0) | Err(_) => {
                    up_open = false;
                    let _ = client_tx.shutdown().await;
                }
                Ok(n) => {
                    last_active = tokio::time::Instant::now();
                    if client_tx.write_all(&to_client[..n]).await.is_err() {
                        return;
                    }
                }
            },
            () = &mut timer => {
                let deadline = last_active + idle;
                if deadline <= tokio::time::Instant::now() {
                    return;
                }
                timer.as_mut().reset(deadline);
            }
        }
    }
}

/// Waits until no connection is open through `backends`, at most `limit`.
/// Returns the connections still open when it gave up.
pub async fn drain(backends: &[Arc<Backend>], limit: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let open: usize = backends.iter().map(|b| b.open_connections()).sum();
        if open == 0 || tokio::time::Instant::now() >= deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
