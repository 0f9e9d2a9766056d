//! The `s3://region/bucket/prefix` and `gs://bucket/prefix` registries:
//! `<prefix>/<version>/<artifact>` objects in a bucket.

use std::sync::Arc;

use dewy_store::{ObjectStore, Precondition, open_store};

use crate::artifact::{Platform, pick_artifact};
use crate::file::find_checksum;
use crate::{
    ArtifactRequest, CommonOptions, Error, OpenOptions, Registry, Release, Report, SafeUrl, Selection, choose_latest,
};

/// A registry in an S3 or GCS bucket.
#[derive(Debug)]
pub struct ObjectRegistry {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    selection: Selection,
    artifact: Option<String>,
    platform: Platform,
}

pub(crate) fn cache_error(url: &url::Url, e: dewy_store::Error) -> Error {
    match e {
        dewy_store::Error::InvalidUrl { reason, .. } => Error::InvalidUrl {
            url: SafeUrl(url.as_str()).to_string(),
            reason,
        },
        other => Error::Store {
            location: SafeUrl(url.as_str()).to_string(),
            source: other,
        },
    }
}

impl ObjectRegistry {
    /// Builds one from `s3://<region>/<bucket>[/<prefix>]?endpoint=&region=&pre-release=&artifact=&calver=`
    /// or `gs://<bucket>[/<prefix>]?pre-release=&artifact=&calver=`.
    pub fn from_url(url: &url::Url, opts: &OpenOptions) -> Result<Self, Error> {
        let opened = open_store(url, &opts.cloud).map_err(|e| cache_error(url, e))?;
        let extra: &[&str] = if url.scheme() == "s3" {
            &["endpoint", "region"]
        } else {
            &[]
        };
        let common = CommonOptions::parse_pairs(url, opened.rest.iter().map(|(k, v)| (k.as_str(), v.as_str())), extra)?;
        let selection = common.selection(opts, url)?;
        Ok(Self {
            store: opened.store,
            prefix: opened.prefix,
            selection,
            artifact: common.artifact,
            platform: opts.platform.clone(),
        })
    }

    fn error(&self, e: dewy_store::Error) -> Error {
        Error::Store {
            location: self.store.location(),
            source: e,
        }
    }

    /// The object name of `release`'s artifact.
    fn object(&self, release: &Release) -> String {
        format!("{}{}/{}", self.prefix, release.tag, release.artifact_name)
    }
}

#[async_trait::async_trait]
impl Registry for ObjectRegistry {
    async fn latest(&self) -> Result<Release, Error> {
        let versions = self.versions().await?;
        let version =
            choose_latest(versions.iter().map(String::as_str), &self.selection).ok_or_else(|| Error::NoVersion {
                location: format!("{}/{}", self.store.location(), self.prefix),
            })?;
        self.release_of(version).await
    }

    async fn latest_complete_before(&self, tag: &str) -> Result<Option<Release>, Error> {
        let versions = self.versions().await?;
        crate::newest_complete_before(versions, &self.selection, tag, |v| self.release_of(v)).await
    }

    async fn artifact_request(&self, release: &Release) -> Result<ArtifactRequest, Error> {
        self.store
            .request(&self.object(release))
            .await
            .map_err(|e| self.error(e))
    }

    async fn signature_request(&self, release: &Release) -> Result<Option<ArtifactRequest>, Error> {
        if release.signature_url.is_none() {
            return Ok(None);
        }
        let object = format!("{}{}", self.object(release), crate::SIGNATURE_SUFFIX);
        let request = self.store.request(&object).await.map_err(|e| self.error(e))?;
        Ok(Some(request))
    }

    /// Writes an empty `<prefix><tag>/shipped_to_<host>_<command>_at_<time>.txt`
    /// object, as the Go original does.
    async fn report(&self, report: &Report) -> Result<(), Error> {
        let name = format!("{}{}/{}", self.prefix, report.tag, crate::file::report_name(report));
        self.store
            .put(&name, Vec::new(), Precondition::Any)
            .await
            .map_err(|e| self.error(e))?;
        Ok(())
    }
}

impl ObjectRegistry {
    /// The version folders under the prefix.
    async fn versions(&self) -> Result<Vec<String>, Error> {
        let listing = self.store.list(&self.prefix, true).await.map_err(|e| self.error(e))?;
        Ok(listing
            .prefixes
            .iter()
            .map(|p| {
                p.strip_prefix(&self.prefix)
                    .unwrap_or(p)
                    .trim_end_matches('/')
                    .to_owned()
            })
            .collect())
    }

    /// The release of `version`: its artifact for this host and checksum.
    async fn release_of(&self, version: crate::Version) -> Result<Release, Error> {
        let dir = format!("{}{}/", self.prefix, version.tag);
        let files = self.store.list(&dir, true).await.map_err(|e| self.error(e))?.objects;
        let names: Vec<&str> = files
            .iter()
            .map(|o| o.name.strip_prefix(&dir).unwrap_or(&o.name))
            .collect();
        // The version's first upload: the grace period runs from there.
        let published_at = files.iter().filter_map(|o| o.modified).min();
        let artifact = pick_artifact(
            &version.tag,
            names.iter().copied(),
            self.artifact.as_deref(),
            &self.platform,
            published_at,
        )?;
        let signature = format!("{artifact}{}", crate::SIGNATURE_SUFFIX);
        let signature_url = names
            .contains(&signature.as_str())
            .then(|| format!("{}/{dir}{signature}", self.store.location()));
        let checksum = find_checksum(&artifact, |name| {
            let present = names.contains(&name.as_str());
            let object = format!("{dir}{name}");
            async move {
                if !present {
                    return None;
                }
                let (data, _) = self.store.get(&object).await.ok()??;
                String::from_utf8(data).ok()
            }
        })
        .await;
        Ok(Release {
            id: format!("{}/{dir}", self.store.location()),
            tag: version.tag.clone(),
            slot: version.build.clone(),
            version,
            artifact_url: format!("{}/{dir}{artifact}", self.store.location()),
            artifact_name: artifact,
            published_at,
            checksum,
            signature_url,
        })
    }
}
