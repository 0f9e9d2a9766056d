//! A watch on the held sockets: connections that wait in the accept queue
//! while no generation accepts them (an app declared ready too early, a
//! hung app) are an outage that nothing else reports, since the kernel
//! keeps queueing instead of refusing.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How often the queues are read.
const EVERY: Duration = Duration::from_millis(500);
/// How long connections must wait unaccepted before the warning.
pub(crate) const STALL: Duration = Duration::from_secs(2);

/// The accept queue length of each listening TCP socket among `inodes`,
/// from `/proc/net/tcp` and `/proc/net/tcp6` (for a socket in LISTEN state
/// the receive queue column is the number of connections waiting to be
/// accepted).
pub(crate) fn accept_queues(inodes: &HashSet<u64>) -> u64 {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    let (state, queues, inode) = (cols.get(3)?, cols.get(4)?, cols.get(9)?.parse::<u64>().ok()?);
                    if *state != "0A" || !inodes.contains(&inode) {
                        return None;
                    }
                    u64::from_str_radix(queues.split_once(':')?.1, 16).ok()
                })
                .collect::<Vec<_>>()
        })
        .sum()
}

/// Follows the queue: `Some(queued)` once it has stayed non-empty and not
/// shrunk for [`STALL`], then nothing until it drains again.
#[derive(Debug, Default)]
pub(crate) struct StallDetector {
    since: Option<(Instant, u64)>,
    reported: bool,
}

impl StallDetector {
    pub(crate) fn sample(&mut self, queued: u64, now: Instant) -> Option<u64> {
        match self.since {
            _ if queued == 0 => {
                self.since = None;
                self.reported = false;
                None
            }
            // It shrank: something accepts, start over.
            Some((_, before)) if queued < before => {
                self.since = Some((now, queued));
                None
            }
            Some((start, _)) if !self.reported && now.duration_since(start) >= STALL => {
                self.reported = true;
                Some(queued)
            }
            Some(_) => None,
            None => {
                self.since = Some((now, queued));
                None
            }
        }
    }
}

/// Watches until `inner` is dropped; reports stalls through `on_stall`.
pub(crate) async fn watch(inodes: HashSet<u64>, mut on_stall: impl FnMut(u64) -> bool + Send) {
    let mut detector = StallDetector::default();
    loop {
        tokio::time::sleep(EVERY).await;
        let probe = inodes.clone();
        let Ok(queued) = tokio::task::spawn_blocking(move || accept_queues(&probe)).await else {
            return;
        };
        if let Some(queued) = detector.sample(queued, Instant::now())
            && !on_stall(queued)
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_is_reported_once_per_episode_and_a_shrinking_queue_is_not_one() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut d = StallDetector::default();
        assert_eq!(d.sample(3, at(0)), None);
        assert_eq!(d.sample(3, at(1000)), None);
        assert_eq!(d.sample(4, at(2100)), Some(4));
        assert_eq!(d.sample(5, at(3000)), None, "once per episode");
        assert_eq!(d.sample(0, at(3500)), None);
        // Busy but served: the queue shrinks between samples.
        assert_eq!(d.sample(9, at(4000)), None);
        assert_eq!(d.sample(5, at(5000)), None);
        assert_eq!(d.sample(2, at(6000)), None);
        assert_eq!(d.sample(2, at(7000)), None);
        assert_eq!(d.sample(2, at(8100)), Some(2));
    }

    #[test]
    fn the_queue_of_a_listener_nobody_accepts_is_read() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let inodes = {
            use std::os::fd::AsFd;
            crate::orphans::socket_inodes(std::iter::once(l.as_fd()))
        };
        assert_eq!(accept_queues(&inodes), 0);
        let _c: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        assert_eq!(accept_queues(&inodes), 3);
    }
}
