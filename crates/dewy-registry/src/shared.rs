//! The registry's answer shared through a bucket (`?registry-ttl=` on a cloud
//! cache URL): one host per TTL window asks upstream, the others read the
//! answer it published.
//!
//! The entry `<prefix>registry-cache/<16 hex>.json` holds the answer, when it
//! was fetched, and a refresh lock (`locked_at`, `locked_by`) taken with a
//! conditional write (S3 `If-None-Match: *` / `If-Match`, GCS
//! `ifGenerationMatch`), so exactly one host wins each refresh. A lock whose
//! holder died expires after `lock_ttl`. When upstream fails, the previous
//! answer keeps being served for another TTL, with its age in the log, and
//! no other host retries upstream before then.
//!
//! Fixed against the Go original: the key covers the slot and version scheme
//! (blue and green hosts sharing a bucket got each other's answers), an
//! unreadable entry is replaced instead of bypassing the cache forever, and
//! an upstream outage does not make every host of the fleet call upstream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dewy_store::{ObjectStore, Precondition};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::{ArtifactRequest, Checksum, Error, Registry, RegistryStats, Release, Report, Scheme};

/// How often a waiting host looks at the entry again.
const POLL: Duration = Duration::from_millis(250);

/// The answer as stored (Go-compatible field names for what Dewy knew).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    response: Option<Answer>,
    /// The release's artifact was missing (grace period), as of `fetched_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    not_found: Option<NotFound>,
    fetched_at: Option<jiff::Timestamp>,
    /// Upstream failed: serve the previous answer until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_at: Option<jiff::Timestamp>,
    locked_at: Option<jiff::Timestamp>,
    #[serde(default)]
    locked_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    #[serde(rename = "ID")]
    id: String,
    tag: String,
    #[serde(rename = "ArtifactURL")]
    artifact_url: String,
    created_at: Option<jiff::Timestamp>,
    slot: String,
    #[serde(default)]
    artifact_name: String,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    sha256_source: Option<String>,
    #[serde(default, rename = "SignatureURL", skip_serializing_if = "Option::is_none")]
    signature_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NotFound {
    tag: String,
    wanted: Option<String>,
    published_at: Option<jiff::Timestamp>,
}

/// Counters of a [`SharedRegistry`].
#[derive(Debug, Default)]
pub struct SharedStats {
    /// Calls to the upstream registry made by this host.
    pub upstream_calls: AtomicU64,
    /// Answers served from the bucket.
    pub shared_hits: AtomicU64,
    /// Answers served stale after an upstream failure.
    pub stale_served: AtomicU64,
}

/// Who shares one answer: hosts with the same registry URL (options in any
/// order) and the same `scope` (OS, architecture, slot, version format).
#[derive(Debug, Clone)]
pub struct SharedScope {
    /// The registry URL.
    pub registry_url: String,
    /// What else must match for two hosts to share an answer.
    pub scope: String,
    /// How tags are parsed back into versions.
    pub scheme: Scheme,
    /// This host in the lock (`host:pid`).
    pub node: String,
}

/// A registry whose answers are shared through a bucket.
#[derive(Debug)]
pub struct SharedRegistry {
    inner: Arc<dyn Registry>,
    store: Arc<dyn ObjectStore>,
    name: String,
    ttl: Duration,
    lock_ttl: Duration,
    node: String,
    scheme: Scheme,
    stats: SharedStats,
}

impl SharedRegistry {
    /// Shares `inner`'s answers through `store` under `prefix` for one TTL.
    pub fn new(
        inner: Arc<dyn Registry>,
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        scope: SharedScope,
        ttl: Duration,
    ) -> Self {
        let SharedScope {
            registry_url,
            scope,
            scheme,
            node,
        } = scope;
        let digest = hex::encode(sha2::Sha256::digest(format!("{}|{scope}", canonical(&registry_url))));
        Self {
            inner,
            store,
            name: format!("{prefix}registry-cache/{}.json", &digest[..16]),
            ttl,
            lock_ttl: (ttl * 2).clamp(Duration::from_secs(30), Duration::from_secs(300)),
            node,
            scheme,
            stats: SharedStats::default(),
        }
    }

    /// Changes how long a refresh lock holds before other hosts may take it
    /// over (default: twice the TTL, between 30 s and 5 min).
    pub fn with_lock_ttl(mut self, lock_ttl: Duration) -> Self {
        self.lock_ttl = lock_ttl;
        self
    }

    /// The entry's object name.
    pub fn object_name(&self) -> &str {
        &self.name
    }

    /// This host's counters.
    pub fn shared_stats(&self) -> &SharedStats {
        &self.stats
    }

    fn answer(&self, e: &Entry) -> Option<Result<Release, Error>> {
        if let Some(nf) = &e.not_found {
            return Some(Err(Error::ArtifactNotFound {
                tag: nf.tag.clone(),
                wanted: nf.wanted.clone(),
                published_at: nf.published_at,
            }));
        }
        let a = e.response.as_ref()?;
        let version = self.scheme.parse(&a.tag)?;
        let artifact_name = if a.artifact_name.is_empty() {
            a.artifact_url.rsplit('/').next().unwrap_or_default().to_owned()
        } else {
            a.artifact_name.clone()
        };
        Some(Ok(Release {
            id: a.id.clone(),
            tag: a.tag.clone(),
            version,
            artifact_name,
            artifact_url: a.artifact_url.clone(),
            published_at: a.created_at,
            slot: Some(a.slot.clone()).filter(|s| !s.is_empty()),
            checksum: a.sha256.clone().map(|sha256| Checksum {
                sha256,
                source: a
                    .sha256_source
                    .clone()
                    .unwrap_or_else(|| "the shared registry answer".into()),
            }),
            signature_url: a.signature_url.clone(),
        }))
    }

    fn record(result: &Result<Release, Error>, entry: &mut Entry) -> bool {
        match result {
            Ok(r) => {
                entry.response = Some(Answer {
                    id: r.id.clone(),
                    tag: r.tag.clone(),
                    artifact_url: r.artifact_url.clone(),
                    created_at: r.published_at,
                    slot: r.slot.clone().unwrap_or_default(),
                    artifact_name: r.artifact_name.clone(),
                    sha256: r.checksum.as_ref().map(|c| c.sha256.clone()),
                    sha256_source: r.checksum.as_ref().map(|c| c.source.clone()),
                    signature_url: r.signature_url.clone(),
                });
                entry.not_found = None;
                true
            }
            Err(Error::ArtifactNotFound {
                tag,
                wanted,
                published_at,
            }) => {
                entry.not_found = Some(NotFound {
                    tag: tag.clone(),
                    wanted: wanted.clone(),
                    published_at: *published_at,
                });
                true
            }
            Err(_) => false,
        }
    }

    async fn put(&self, entry: &Entry, pre: Precondition) -> Result<String, dewy_store::Error> {
        let data = serde_json::to_vec(entry).expect("entry serialises");
        self.store.put(&self.name, data, pre).await
    }

    fn age(e: &Entry, now: jiff::Timestamp) -> String {
        e.fetched_at
            .map(|t| format!("{}s", now.duration_since(t).as_secs()))
            .unwrap_or_else(|| "unknown".into())
    }

    async fn pause() {
        let jitter = Duration::from_millis(rand::random::<u64>() % 100);
        tokio::time::sleep(POLL + jitter).await;
    }
}

/// The registry URL with its query options sorted, so equivalent URLs share
/// one entry.
fn canonical(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let mut pairs: Vec<(String, String)> =
                u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
            pairs.sort();
            if pairs.is_empty() {
                u.set_query(None);
            } else {
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => url.to_owned(),
    }
}

#[async_trait::async_trait]
impl Registry for SharedRegistry {
    /// Asked only by a host with nothing deployed, so not shared.
    async fn latest_complete_before(&self, tag: &str) -> Result<Option<Release>, Error> {
        self.inner.latest_complete_before(tag).await
    }

    async fn latest(&self) -> Result<Release, Error> {
        let deadline = Instant::now() + self.lock_ttl + POLL;
        let ttl = jiff::SignedDuration::try_from(self.ttl).unwrap_or_default();
        let lock_ttl = jiff::SignedDuration::try_from(self.lock_ttl).unwrap_or_default();
        loop {
            let (entry, version) = match self.store.get(&self.name).await {
                Ok(Some((data, v))) => match serde_json::from_slice::<Entry>(&data) {
                    Ok(e) => (Some(e), Some(v)),
                    Err(err) => {
                        tracing::warn!(key = %self.name, error = %err, "Shared registry answer is unreadable; replacing it");
                        (None, Some(v))
                    }
                },
                Ok(None) => (None, None),
                Err(err) => {
                    tracing::warn!(key = %self.name, error = %err, "failed to read shared registry cache");
                    self.stats.upstream_calls.fetch_add(1, Ordering::Relaxed);
                    return self.inner.latest().await;
                }
            };
            let now = jiff::Timestamp::now();
            if let Some(e) = &entry {
                let fresh = e.fetched_at.is_some_and(|t| now.duration_since(t) < ttl);
                let backing_off = e.retry_at.is_some_and(|t| t > now);
                if (fresh || backing_off)
                    && let Some(answer) = self.answer(e)
                {
                    if backing_off && !fresh {
                        self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(key = %self.name, age = %Self::age(e, now), "upstream registry failed; serving stale cache");
                    } else {
                        self.stats.shared_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    return answer;
                }
                let locked = e.locked_by != self.node && e.locked_at.is_some_and(|t| now.duration_since(t) < lock_ttl);
                if locked && Instant::now() < deadline {
                    Self::pause().await;
                    continue;
                }
                if locked {
                    tracing::warn!(key = %self.name, holder = %e.locked_by, "Registry cache lock expired; taking it over");
                }
            }
            let mut claim = entry.clone().unwrap_or_default();
            claim.locked_at = Some(now);
            claim.locked_by = self.node.clone();
            let pre = version.clone().map_or(Precondition::Absent, Precondition::Matches);
            let claimed = match self.put(&claim, pre).await {
                Ok(v) => v,
                Err(dewy_store::Error::Conflict { .. }) => {
                    Self::pause().await;
                    continue;
                }
                Err(err) => {
                    tracing::warn!(key = %self.name, error = %err, "failed to claim registry cache lock");
                    if let Some(answer) = entry.as_ref().and_then(|e| self.answer(e)) {
                        return answer;
                    }
                    self.stats.upstream_calls.fetch_add(1, Ordering::Relaxed);
                    return self.inner.latest().await;
                }
            };
            self.stats.upstream_calls.fetch_add(1, Ordering::Relaxed);
            let result = self.inner.latest().await;
            let mut next = claim.clone();
            next.locked_at = None;
            next.locked_by.clear();
            if Self::record(&result, &mut next) {
                next.fetched_at = Some(jiff::Timestamp::now());
                next.retry_at = None;
                match self.put(&next, Precondition::Matches(claimed)).await {
                    Ok(_) => tracing::info!(node = %self.node, "Registry result refreshed from upstream"),
                    Err(err) => {
                        tracing::warn!(key = %self.name, error = %err, "failed to publish refreshed registry cache")
                    }
                }
                return result;
            }
            // Upstream failed: keep the previous answer, back off the fleet
            // for one TTL, and release the lock.
            next.retry_at = Some(jiff::Timestamp::now() + ttl);
            if let Err(err) = self.put(&next, Precondition::Matches(claimed)).await {
                tracing::warn!(key = %self.name, error = %err, "failed to release registry cache lock");
            }
            if let Some(Ok(previous)) = self.answer(&next) {
                let err = result.err().map(|e| e.to_string()).unwrap_or_default();
                self.stats.stale_served.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(key = %self.name, age = %Self::age(&next, now), error = %err, "upstream registry failed; serving stale cache");
                return Ok(previous);
            }
            return result;
        }
    }

    async fn report(&self, report: &Report) -> Result<(), Error> {
        self.inner.report(report).await
    }

    async fn artifact_request(&self, release: &Release) -> Result<ArtifactRequest, Error> {
        self.inner.artifact_request(release).await
    }

    async fn signature_request(&self, release: &Release) -> Result<Option<ArtifactRequest>, Error> {
        self.inner.signature_request(release).await
    }

    fn reports_failures(&self) -> bool {
        self.inner.reports_failures()
    }

    fn stats(&self) -> RegistryStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn canonical_urls_sort_options() {
        assert_eq!(
            super::canonical("ghr://o/r?pre-release=true&artifact=a"),
            super::canonical("ghr://o/r?artifact=a&pre-release=true")
        );
    }
}
