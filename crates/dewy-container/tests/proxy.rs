//! dewy's TCP proxy against a real echo server on loopback: forwarding,
//! round robin, failed backends taken out, open-connection counts for the
//! drain, and the idle timeout.

use std::net::SocketAddr;
use std::time::Duration;

use dewy_container::proxy::{Backend, Proxy, drain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An echo server that prefixes its answers with `name`.
async fn echo(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let _ = s.write_all(format!("{name}:").as_bytes()).await;
                    let _ = s.write_all(&buf[..n]).await;
                }
            });
        }
    });
    addr
}

async fn ask(proxy: SocketAddr, text: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    s.write_all(text.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn round_robin_failover_drain_and_idle_timeout() {
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), Some(Duration::from_millis(400)))
        .await
        .unwrap();
    let (a, b) = (echo("a").await, echo("b").await);
    proxy.add(Backend::new("ca", a));
    proxy.add(Backend::new("cb", b));
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(ask(proxy.listen, "hi").await);
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["a:hi", "b:hi"], "round robin");

    // A backend that refuses connections is taken out; clients are served
    // by the other.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gone = proxy.remove("cb");
    assert_eq!(gone.len(), 1);
    proxy.add(Backend::new("cdead", dead));
    for _ in 0..4 {
        assert_eq!(ask(proxy.listen, "x").await, "a:x");
    }
    assert!(proxy.backends().iter().any(|b| b.container == "cdead" && b.failed()));

    // Open connections are counted; the drain waits for them.
    let mut held = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    held.write_all(b"hold").await.unwrap();
    let mut buf = [0u8; 16];
    let _ = held.read(&mut buf).await.unwrap();
    let live: Vec<_> = proxy.backends().into_iter().filter(|b| b.container == "ca").collect();
    assert_eq!(live[0].open_connections(), 1);
    assert_eq!(
        drain(&live, Duration::from_millis(100)).await,
        1,
        "still open after the limit"
    );

    // Nothing moves for longer than the idle timeout: the proxy closes it.
    let closed = tokio::time::timeout(Duration::from_secs(5), held.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert_eq!(drain(&live, Duration::from_secs(2)).await, 0);
}

/// A listener whose accept queue is full and never served: the kernel drops
/// further SYNs (and resends them only after a second), as a replica
/// overwhelmed by a burst does.
async fn full_accept_queue() -> (SocketAddr, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut queued = Vec::new();
    // Fill the queue: connects that complete; the next ones hang.
    loop {
        match tokio::time::timeout(Duration::from_millis(300), tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => queued.push(s),
            _ => break,
        }
        assert!(queued.len() < 16, "the accept queue never filled");
    }
    std::mem::forget(listener);
    (addr, queued)
}

#[tokio::test]
async fn a_backend_that_drops_syns_costs_a_hedge_not_a_second() {
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let (stuck, _queued) = full_accept_queue().await;
    proxy.add(Backend::new("cstuck", stuck));
    proxy.add(Backend::new("cok", echo("ok").await));
    // Every second connection is first sent to the stuck replica: it is
    // answered by the other one after the hedge delay, far below the
    // kernel's one-second SYN resend, and the stuck one is not taken out
    // (a full queue is load, not a dead replica).
    for i in 0..4 {
        let started = std::time::Instant::now();
        assert_eq!(ask(proxy.listen, "hi").await, "ok:hi");
        let took = started.elapsed();
        assert!(took < Duration::from_millis(800), "request {i} took {took:?}");
    }
    assert!(proxy.backends().iter().all(|b| !b.failed()));
}
