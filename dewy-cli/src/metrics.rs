//! Every metric dewy exports, read once per scrape or push: the admin
//! API's `/metrics` renders them as Prometheus text and `--otlp-endpoint`
//! pushes the same set.

use std::sync::atomic::Ordering::Relaxed;

/// One metric family: name, kind (`counter`, `gauge` or `histogram`), help,
/// and samples (labels, value), or for a histogram its labels and reading.
#[derive(Debug, Clone)]
pub(crate) struct Family {
    pub(crate) name: &'static str,
    pub(crate) kind: &'static str,
    pub(crate) help: &'static str,
    pub(crate) samples: Vec<(Vec<(&'static str, String)>, u64)>,
    pub(crate) histogram: Option<(Vec<(&'static str, String)>, dewy_core::HistogramSnapshot)>,
}

/// Every metric dewy exports, read now: the scrape endpoint renders them as
/// Prometheus text and `--otlp-endpoint` pushes the same set.
pub(crate) async fn families(d: &dewy_core::Deployer) -> Vec<Family> {
    let m = d.metrics();
    let st = d.status().await;
    let mut out = Vec::new();
    let mut family =
        |name: &'static str, kind: &'static str, help: &'static str, samples: &[(Vec<(&'static str, String)>, u64)]| {
            out.push(Family {
                name,
                kind,
                help,
                samples: samples.to_vec(),
                histogram: None,
            });
        };
    let cmd = vec![("command", st.mode.to_owned())];
    family(
        "dewy_deployments_total",
        "counter",
        "Successful deploys.",
        &[(cmd.clone(), m.deployments.load(Relaxed))],
    );
    family(
        "dewy_deployment_errors_total",
        "counter",
        "Failed deploys.",
        &[(cmd.clone(), m.deployment_errors.load(Relaxed))],
    );
    family(
        "dewy_server_restarts_total",
        "counter",
        "Application restarts.",
        &[
            (vec![("reason", "deploy".into())], m.restarts_deploy.load(Relaxed)),
            (vec![("reason", "signal".into())], m.restarts_signal.load(Relaxed)),
        ],
    );
    family(
        "dewy_ticks_total",
        "counter",
        "Registry checks by outcome.",
        &[
            (vec![("outcome", "skipped".into())], m.ticks_skipped.load(Relaxed)),
            (vec![("outcome", "deployed".into())], m.ticks_deployed.load(Relaxed)),
            (vec![("outcome", "grace_period".into())], m.ticks_grace.load(Relaxed)),
            (vec![("outcome", "known_bad".into())], m.ticks_known_bad.load(Relaxed)),
            (vec![("outcome", "error".into())], m.ticks_error.load(Relaxed)),
        ],
    );
    family(
        "dewy_registry_requests_total",
        "counter",
        "Registry answers by result.",
        &[
            (vec![("result", "release".into())], m.registry_ok.load(Relaxed)),
            (
                vec![("result", "artifact_not_found".into())],
                m.registry_not_found.load(Relaxed),
            ),
            (vec![("result", "error".into())], m.registry_errors.load(Relaxed)),
        ],
    );
    let secs = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
    family(
        "dewy_deploy_phase_milliseconds_total",
        "counter",
        "Time spent in each deploy phase (download, extract, hooks, start or restart until ready), in milliseconds.",
        &[
            (vec![("phase", "download".into())], secs(&m.phase_download_millis)),
            (vec![("phase", "extract".into())], secs(&m.phase_extract_millis)),
            (vec![("phase", "hooks".into())], secs(&m.phase_hooks_millis)),
            (vec![("phase", "start".into())], secs(&m.phase_start_millis)),
        ],
    );
    let http = d.registry_stats();
    family(
        "dewy_registry_http_requests_total",
        "counter",
        "Requests the registry backend sent (GitHub: 304s are free against the rate limit).",
        &[
            (vec![("answer", "any".into())], http.requests),
            (vec![("answer", "not_modified".into())], http.not_modified),
        ],
    );
    family(
        "dewy_registry_rate_limited_total",
        "counter",
        "Times the registry's rate limit stopped requests until its reset.",
        &[(vec![], http.rate_limited)],
    );
    family(
        "dewy_downloads_total",
        "counter",
        "Artifacts downloaded.",
        &[(vec![], m.downloads.load(Relaxed))],
    );
    family(
        "dewy_download_bytes_total",
        "counter",
        "Bytes downloaded.",
        &[(vec![], m.download_bytes.load(Relaxed))],
    );
    family(
        "dewy_cache_hits_total",
        "counter",
        "Deploys served from the cache.",
        &[(vec![], m.cache_hits.load(Relaxed))],
    );
    family(
        "dewy_hook_runs_total",
        "counter",
        "Deploy hooks by outcome.",
        &[
            (vec![("outcome", "success".into())], m.hooks_ok.load(Relaxed)),
            (vec![("outcome", "failure".into())], m.hooks_failed.load(Relaxed)),
        ],
    );
    family(
        "dewy_rollbacks_total",
        "counter",
        "Automatic rollbacks.",
        &[(vec![], m.rollbacks.load(Relaxed))],
    );
    family(
        "dewy_cache_degraded",
        "gauge",
        "1 while the shared cache cannot be reached and dewy works on its local copy.",
        &[(vec![], u64::from(st.cache_degraded.is_some()))],
    );
    family(
        "dewy_accept_queue_stalls_total",
        "counter",
        "Times connections waited in the accept queue while no generation accepted them.",
        &[(vec![], m.accept_queue_stalls.load(Relaxed))],
    );
    let stats = d.notify().stats();
    family(
        "dewy_notifications_total",
        "counter",
        "Notifications by result.",
        &[
            (vec![("result", "sent".into())], stats.sent.load(Relaxed)),
            (vec![("result", "dropped".into())], stats.dropped.load(Relaxed)),
            (vec![("result", "failed".into())], stats.failed.load(Relaxed)),
            (vec![("result", "suppressed".into())], stats.suppressed.load(Relaxed)),
        ],
    );
    family(
        "dewy_app_crashes_total",
        "counter",
        "Unexpected exits of the application.",
        &[(vec![], m.app_crashes.load(Relaxed))],
    );
    if let Some(r) = d.rollout_seen() {
        let release = || ("release", r.release.clone());
        family(
            "dewy_rollout_info",
            "gauge",
            "The rollout this host last saw: its release and state (active, paused, halted, aborted).",
            &[(vec![release(), ("state", r.state.as_str().into())], 1)],
        );
        let samples: Vec<_> = ["deploying", "baking", "done", "failed", "reverted"]
            .iter()
            .map(|phase| {
                let n = r.counts().get(phase).copied().unwrap_or(0) as u64;
                (vec![release(), ("phase", (*phase).to_owned())], n)
            })
            .collect();
        family(
            "dewy_rollout_hosts",
            "gauge",
            "Hosts of the rollout by phase.",
            &samples,
        );
        family(
            "dewy_rollout_wave",
            "gauge",
            "The wave open now (0: the canary).",
            &[(vec![release()], u64::from(r.wave))],
        );
        family(
            "dewy_rollout_failures",
            "gauge",
            "Failures counted against the rollout.",
            &[(vec![release()], u64::from(r.failures))],
        );
    }
    let version = st.current_version.clone().unwrap_or_default();
    family(
        "dewy_info",
        "gauge",
        "dewy and the version it runs.",
        &[(vec![("dewy_version", st.dewy_version.clone()), ("version", version)], 1)],
    );
    out.push(Family {
        name: "dewy_deployment_duration_seconds",
        kind: "histogram",
        help: "Durations of successful deploys, in seconds (Dewy's buckets).",
        samples: Vec::new(),
        histogram: Some((cmd, m.deployment_duration.snapshot())),
    });
    out
}

/// The OpenMetrics text exposition of [`families`], rendered by
/// prometheus-client (counters as `NAME_total`, histograms with `_bucket`,
/// `_sum`, `_count`, and the closing `# EOF`).
pub(crate) async fn prometheus_text(d: &dewy_core::Deployer) -> String {
    render(families(d).await)
}

/// The OpenMetrics text of `families`.
pub(crate) fn render(families: Vec<Family>) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Snapshot(families)));
    let mut out = String::new();
    if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        tracing::warn!(error = %err, "Rendering the metrics failed");
    }
    out
}

/// A reading of every family, for prometheus-client's encoder.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl prometheus_client::collector::Collector for Snapshot {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        for f in &self.0 {
            let labels =
                |l: &[(&'static str, String)]| l.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect::<Vec<_>>();
            match f.kind {
                "counter" => {
                    // The encoder adds `_total` to a counter's name.
                    let name = f.name.strip_suffix("_total").unwrap_or(f.name);
                    let mut family = encoder.encode_descriptor(name, f.help, None, MetricType::Counter)?;
                    match f.samples.as_slice() {
                        // No label: `NAME_total 3`, not `NAME_total{} 3`.
                        [(l, v)] if l.is_empty() => ConstCounter::new(*v).encode(family)?,
                        samples => {
                            for (l, v) in samples {
                                ConstCounter::new(*v).encode(family.encode_family(&labels(l))?)?;
                            }
                        }
                    }
                }
                "histogram" => {
                    let mut family = encoder.encode_descriptor(f.name, f.help, None, MetricType::Histogram)?;
                    if let Some((l, h)) = &f.histogram {
                        // The encoder sums the buckets itself.
                        let mut before = 0;
                        let buckets: Vec<(f64, u64)> = h
                            .buckets
                            .iter()
                            .map(|(bound, cumulative)| {
                                let n = cumulative - before;
                                before = *cumulative;
                                // The encoder writes `+Inf` for f64::MAX.
                                (if bound.is_infinite() { f64::MAX } else { *bound }, n)
                            })
                            .collect();
                        family
                            .encode_family(&labels(l))?
                            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                                h.sum_seconds,
                                h.count,
                                &buckets,
                                None,
                            )?;
                    }
                }
                _ => {
                    let mut family = encoder.encode_descriptor(f.name, f.help, None, MetricType::Gauge)?;
                    let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
                    match f.samples.as_slice() {
                        [(l, v)] if l.is_empty() => gauge(*v).encode(family)?,
                        samples => {
                            for (l, v) in samples {
                                gauge(*v).encode(family.encode_family(&labels(l))?)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
