//! `cargo xtask bench rollout --hosts=20 [--interval=10] [--bake=10]
//! [--idle=60]`: dewy-core instances (assets mode, one process) share one
//! S3 cache on moto, with and without a staged rollout plan, at dewy's
//! default interval unless told. Prints bucket requests per host per interval while
//! idle, and the time from publish to the whole fleet against the plan's
//! theoretical minimum; the peer is the same fleet without `--rollout`,
//! measured in the same run.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;

/// Counts every request to the bucket.
#[derive(Debug)]
struct CountingStore {
    inner: Arc<dyn dewy_store::ObjectStore>,
    requests: Arc<AtomicU64>,
}

impl CountingStore {
    fn hit(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait::async_trait]
impl dewy_store::ObjectStore for CountingStore {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn get(&self, name: &str) -> Result<Option<(Vec<u8>, String)>, dewy_store::Error> {
        self.hit();
        self.inner.get(name).await
    }
    async fn download(&self, name: &str, dest: &Path) -> Result<bool, dewy_store::Error> {
        self.hit();
        self.inner.download(name, dest).await
    }
    async fn put(&self, name: &str, data: Vec<u8>, pre: dewy_store::Precondition) -> Result<String, dewy_store::Error> {
        self.hit();
        self.inner.put(name, data, pre).await
    }
    async fn upload(&self, name: &str, src: &Path) -> Result<(), dewy_store::Error> {
        self.hit();
        self.inner.upload(name, src).await
    }
    async fn list(&self, prefix: &str, delimited: bool) -> Result<dewy_store::Listing, dewy_store::Error> {
        self.hit();
        self.inner.list(prefix, delimited).await
    }
    async fn delete(&self, name: &str) -> Result<(), dewy_store::Error> {
        self.hit();
        self.inner.delete(name).await
    }
    async fn request(&self, name: &str) -> Result<dewy_store::ObjectRequest, dewy_store::Error> {
        self.inner.request(name).await
    }
}

/// One fleet's numbers.
struct Measured {
    /// Publish → every instance on the release.
    rollout: Duration,
    /// Publish → each instance on the release, sorted.
    arrivals: Vec<Duration>,
    /// Bucket requests per host per interval, idle.
    idle_per_host_interval: f64,
}

/// Runs `hosts` instances on `prefix` of the bucket with `plan`: v1 first
/// (staged too), then v2 timed, then an idle window counted.
fn measure(
    s3: &dewy_testkit::S3Server,
    prefix: &str,
    hosts: usize,
    plan: Option<&str>,
    interval: Duration,
    idle: Duration,
) -> Result<Measured> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let work = tempfile::tempdir()?;
    let releases = work.path().join("releases");
    let publish = |tag: &str| {
        let data = dewy_testkit::targz(&[("VERSION", tag.as_bytes(), 0o644)]);
        dewy_testkit::publish(&releases, tag, "app_linux_amd64.tar.gz", &data);
    };
    let cloud = dewy_store::CloudOptions {
        aws_credentials: Some(("test".into(), "test".into(), None)),
        ..Default::default()
    };
    let registry_url = format!("file://{}?artifact=app_linux_amd64.tar.gz", releases.display());
    let cache_url = url::Url::parse(&format!("s3://us-east-1/fleet/{prefix}?endpoint={}", s3.endpoint))?;
    let requests = Arc::new(AtomicU64::new(0));
    let plan = plan
        .map(str::parse::<dewy_core::rollout::Plan>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let _runtime = rt.enter();
    let mut deployers = Vec::new();
    publish("v1.0.0");
    for i in 0..hosts {
        let opened = dewy_store::open_store(&cache_url, &cloud)?;
        let store = Arc::new(CountingStore {
            inner: opened.store,
            requests: requests.clone(),
        });
        let root = work.path().join(format!("host{i}"));
        let local = dewy_cache::FileCache::open(root.join(".dewy/cache"))?;
        let cache = Arc::new(dewy_cache::cloud::CloudCache::new(store, opened.prefix.clone(), local));
        let registry = dewy_registry::open(&registry_url, &dewy_registry::OpenOptions::default())?;
        let notify = dewy_notify::Notify::new(Arc::new(dewy_notify::NullNotifier), Default::default(), true);
        let mut config = dewy_core::Config::new(dewy_core::Mode::Assets, root);
        config.interval = interval;
        config.hostname = format!("host{i}");
        config.rollout = plan.clone();
        deployers.push(Arc::new(dewy_core::Deployer::new(
            config, registry, cache, notify, None,
        )?));
    }
    let wait_all = |tag: &'static str, limit: Duration| {
        let deployers = deployers.clone();
        async move {
            let started = Instant::now();
            let mut arrived: Vec<Option<Duration>> = vec![None; deployers.len()];
            while arrived.iter().any(Option::is_none) {
                anyhow::ensure!(started.elapsed() < limit, "the fleet did not deploy {tag}");
                for (i, d) in deployers.iter().enumerate() {
                    if arrived[i].is_none() && d.status().await.current_version.as_deref() == Some(tag) {
                        arrived[i] = Some(started.elapsed());
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut arrivals: Vec<Duration> = arrived.into_iter().flatten().collect();
            arrivals.sort();
            anyhow::Ok((started.elapsed(), arrivals))
        }
    };
    rt.block_on(async {
        for (i, d) in deployers.iter().enumerate() {
            let d = d.clone();
            tokio::spawn(async move {
                // Staggered start, as real hosts are.
                tokio::time::sleep(interval.mul_f64(i as f64 / hosts as f64)).await;
                d.run().await;
            });
        }
        wait_all("v1.0.0", Duration::from_secs(600)).await?;
        // Let the last bake end and the rollout complete.
        if let Some(p) = &plan {
            tokio::time::sleep(p.bake + interval * 3).await;
        }
        publish("v2.0.0");
        let (rollout, arrivals) = wait_all("v2.0.0", Duration::from_secs(600)).await?;
        if let Some(p) = &plan {
            tokio::time::sleep(p.bake + interval * 3).await;
        }
        let before = requests.load(Ordering::Relaxed);
        tokio::time::sleep(idle).await;
        let idle_requests = requests.load(Ordering::Relaxed) - before;
        let intervals = idle.as_secs_f64() / interval.as_secs_f64();
        for d in &deployers {
            d.shutdown("SIGTERM").await;
        }
        anyhow::Ok(Measured {
            rollout,
            arrivals,
            idle_per_host_interval: idle_requests as f64 / hosts as f64 / intervals,
        })
    })
    .inspect(|_| rt.shutdown_background())
}

pub(crate) fn rollout(args: &[String]) -> Result<()> {
    let hosts: usize = crate::bench::flag(args, "--hosts=", 20)?;
    let interval = Duration::from_secs(crate::bench::flag(args, "--interval=", 10)?);
    let bake_secs: u64 = crate::bench::flag(args, "--bake=", 10)?;
    let idle = Duration::from_secs(crate::bench::flag(args, "--idle=", 60)?);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let s3 = dewy_testkit::S3Server::start();
    s3.create_bucket("fleet");
    let plan_text = format!("canary=1,bake={bake_secs}s,max-parallel=25%");
    let plan: dewy_core::rollout::Plan = plan_text.parse().map_err(anyhow::Error::msg)?;
    let peer = measure(&s3, "peer", hosts, None, interval, idle)?;
    let staged = measure(&s3, "staged", hosts, Some(&plan_text), interval, idle)?;
    // The plan's waves: the canary, then max-parallel at a time.
    let mut left = hosts - plan.canary.of(hosts).min(hosts);
    let mut waves = 1;
    while left > 0 {
        left -= plan.max_parallel.of(hosts).min(left);
        waves += 1;
    }
    // The release reaches the last wave once every earlier wave baked;
    // deploys and polling are the overhead measured against that.
    let minimum = plan.bake * (waves - 1);
    println!(
        "rollout: {hosts} dewy-core instances (assets mode), one S3 cache (moto), interval {}s, plan {plan_text} ({waves} waves)",
        interval.as_secs()
    );
    println!(
        "idle bucket requests per host per interval: staged {:.3} (goal ≤ 1), peer without --rollout {:.3}, ratio {:.2}",
        staged.idle_per_host_interval,
        peer.idle_per_host_interval,
        staged.idle_per_host_interval / peer.idle_per_host_interval.max(f64::EPSILON)
    );
    let over = staged.rollout.saturating_sub(minimum);
    println!(
        "publish → whole fleet: staged {:.1} s; theoretical minimum {:.1} s ({} earlier waves × bake {bake_secs} s); over it by {:.1} s = {:.2} intervals (goal ≤ 1); peer without --rollout {:.1} s",
        staged.rollout.as_secs_f64(),
        minimum.as_secs_f64(),
        waves - 1,
        over.as_secs_f64(),
        over.as_secs_f64() / interval.as_secs_f64(),
        peer.rollout.as_secs_f64()
    );
    let arrivals: Vec<String> = staged
        .arrivals
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64()))
        .collect();
    println!("staged: each host on the release after (s): {}", arrivals.join(" "));
    anyhow::ensure!(
        staged.idle_per_host_interval <= 1.0,
        "idle requests per host per interval over 1"
    );
    Ok(())
}
