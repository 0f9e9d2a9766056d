//! Embedding dewy-core in an in-house deploy tool, with a registry of its
//! own and no CLI.
//!
//! The in-house "release service" here is a JSON file that a build system
//! rewrites: `{"tag": "v1.2.3", "url": "file:///builds/app-v1.2.3.tar.gz"}`
//! (in real life, an HTTP endpoint). Run:
//!
//! ```sh
//! cargo run -p embed-example -- RELEASE_JSON APP_DIR
//! ```
//!
//! It deploys the release in assets mode every 5 seconds until Ctrl-C.
#![allow(clippy::print_stderr)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dewy_core::{Config, Deployer, Mode};
use dewy_registry::{Error, Registry, Release};

/// A registry that reads the in-house release document.
#[derive(Debug)]
struct InHouseRegistry {
    document: PathBuf,
}

#[async_trait::async_trait]
impl Registry for InHouseRegistry {
    async fn latest(&self) -> Result<Release, Error> {
        let text = tokio::fs::read_to_string(&self.document)
            .await
            .map_err(|source| Error::Io {
                op: "read release document",
                path: self.document.clone(),
                source,
            })?;
        let field = |name: &str| {
            text.split(&format!("\"{name}\""))
                .nth(1)
                .and_then(|rest| rest.split('"').nth(1))
                .map(str::to_owned)
                .ok_or_else(|| Error::InvalidUrl {
                    url: self.document.display().to_string(),
                    reason: format!("no `{name}` field"),
                })
        };
        let (tag, url) = (field("tag")?, field("url")?);
        let version = dewy_registry::parse_semver(&tag).ok_or_else(|| Error::NoVersion { location: tag.clone() })?;
        Ok(Release {
            id: tag.clone(),
            artifact_name: url.rsplit('/').next().unwrap_or("artifact").to_owned(),
            artifact_url: url.clone(),
            slot: version.build.clone(),
            version,
            tag,
            published_at: None,
            checksum: None,
            // `<url>.minisig`, for hosts that run with `--verify-key`.
            signature_url: Some(format!("{url}.minisig")),
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [document, app_dir] = args.as_slice() else {
        eprintln!("usage: embed-example RELEASE_JSON APP_DIR");
        std::process::exit(2);
    };
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let registry = Arc::new(InHouseRegistry {
        document: document.into(),
    });
    let cache = Arc::new(dewy_cache::FileCache::open(PathBuf::from(app_dir).join(".dewy/cache"))?);
    let notify = dewy_notify::Notify::new(Arc::new(dewy_notify::NullNotifier), Default::default(), false);
    let mut config = Config::new(Mode::Assets, app_dir.into());
    config.interval = Duration::from_secs(5);
    let deployer = Arc::new(Deployer::new(config, registry, cache, notify, None)?);
    let runner = {
        let d = deployer.clone();
        tokio::spawn(async move { d.run().await })
    };
    tokio::signal::ctrl_c().await?;
    deployer.shutdown("interrupt").await;
    runner.await?;
    Ok(())
}
