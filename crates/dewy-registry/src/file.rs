//! The `file://PATH` registry: `PATH/<version>/<artifact>` folders on a local
//! or mounted filesystem.

use std::path::{Path, PathBuf};

use crate::artifact::{Platform, pick_artifact};
use crate::{
    Checksum, CommonOptions, Error, OpenOptions, Registry, Release, Report, SafeUrl, Selection, choose_latest,
};

/// A registry in a local folder.
#[derive(Debug, Clone)]
pub struct FileRegistry {
    root: PathBuf,
    selection: Selection,
    artifact: Option<String>,
    platform: Platform,
}

impl FileRegistry {
    /// A registry on `root` with the given choice rules.
    pub fn new(root: impl Into<PathBuf>, selection: Selection, artifact: Option<String>, platform: Platform) -> Self {
        Self {
            root: root.into(),
            selection,
            artifact,
            platform,
        }
    }

    /// Builds one from `file:///PATH?pre-release=&artifact=&calver=`. A
    /// relative path is written `file://./releases`.
    pub fn from_url(url: &url::Url, opts: &OpenOptions) -> Result<Self, Error> {
        let common = CommonOptions::parse(url)?;
        let selection = common.selection(opts, url)?;
        let root = match url.host_str() {
            // `file://./releases` and `file://releases` name relative folders.
            Some(host) if !host.is_empty() => PathBuf::from(format!("{host}{}", url.path())),
            _ => PathBuf::from(url.path()),
        };
        let root = PathBuf::from(percent_decode(&root.to_string_lossy()));
        if root.as_os_str().is_empty() {
            return Err(Error::InvalidUrl {
                url: SafeUrl(url.as_str()).to_string(),
                reason: "the path is empty".into(),
            });
        }
        Ok(Self::new(root, selection, common.artifact, opts.platform.clone()))
    }

    /// The registry folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    async fn names_in(&self, dir: &Path, want_dirs: bool) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        let mut rd = tokio::fs::read_dir(dir)
            .await
            .map_err(|e| Error::io("list registry folder", dir, e))?;
        while let Some(entry) = rd
            .next_entry()
            .await
            .map_err(|e| Error::io("list registry folder", dir, e))?
        {
            let Ok(ty) = entry.file_type().await else { continue };
            let is_dir = if ty.is_symlink() {
                tokio::fs::metadata(entry.path())
                    .await
                    .map(|m| m.is_dir())
                    .unwrap_or(false)
            } else {
                ty.is_dir()
            };
            if is_dir == want_dirs
                && let Some(name) = entry.file_name().to_str()
                && !name.starts_with('.')
            {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    async fn checksum_for(&self, dir: &Path, artifact: &str) -> Option<Checksum> {
        find_checksum(artifact, |name| async move {
            tokio::fs::read_to_string(dir.join(name)).await.ok()
        })
        .await
    }
}

/// The checksum of `artifact` from the files published beside it, read with
/// `read`: `<artifact>.sha256`, else a `SHA256SUMS`, `sha256sums.txt` or
/// `checksums.txt` list that names it.
pub(crate) async fn find_checksum<F, Fut>(artifact: &str, read: F) -> Option<Checksum>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = Option<String>>,
{
    let own = format!("{artifact}.sha256");
    if let Some(text) = read(own.clone()).await
        && let Some(hex) = text.split_whitespace().next().filter(|h| is_sha256(h))
    {
        return Some(Checksum {
            sha256: hex.to_ascii_lowercase(),
            source: own,
        });
    }
    for list in ["SHA256SUMS", "sha256sums.txt", "checksums.txt"] {
        if let Some(text) = read(list.to_owned()).await
            && let Some(sum) = find_in_sums(&text, artifact)
        {
            return Some(Checksum {
                sha256: sum,
                source: list.to_owned(),
            });
        }
    }
    None
}

/// `shipped_to_<host>_<command>_at_<UTC time>.txt`, Dewy's audit file name.
pub(crate) fn report_name(report: &Report) -> String {
    let at = report.at.strftime("%Y%m%dT%H%M%S.%fZ").to_string();
    format!(
        "shipped_to_{}_{}_at_{at}.txt",
        report.hostname.to_lowercase(),
        report.command
    )
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Finds `name` in a `sha256sum`-style list (`<hex>  [*]<name>`).
pub(crate) fn find_in_sums(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let hex = parts.next()?;
        let file = parts.next()?.trim_start_matches('*');
        (is_sha256(hex) && (file == name || file.rsplit('/').next() == Some(name))).then(|| hex.to_ascii_lowercase())
    })
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

fn file_url(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    url::Url::from_file_path(&abs)
        .map(|u| u.to_string())
        .unwrap_or_else(|()| format!("file://{}", abs.display()))
}

#[async_trait::async_trait]
impl Registry for FileRegistry {
    async fn latest(&self) -> Result<Release, Error> {
        let versions = self.names_in(&self.root, true).await?;
        let version =
            choose_latest(versions.iter().map(String::as_str), &self.selection).ok_or_else(|| Error::NoVersion {
                location: file_url(&self.root),
            })?;
        self.release_of(version).await
    }

    async fn latest_complete_before(&self, tag: &str) -> Result<Option<Release>, Error> {
        let versions = self.names_in(&self.root, true).await?;
        crate::newest_complete_before(versions, &self.selection, tag, |v| self.release_of(v)).await
    }

    /// Writes an empty `shipped_to_<host>_<command>_at_<time>.txt` into the
    /// release's folder, as the Go original does on S3 and GCS.
    async fn report(&self, report: &Report) -> Result<(), Error> {
        let name = report_name(report);
        let path = self.root.join(&report.tag).join(name);
        tokio::fs::write(&path, b"")
            .await
            .map_err(|e| Error::io("write deployment report", &path, e))
    }
}

impl FileRegistry {
    /// The release of `version`: its artifact for this host and checksum.
    async fn release_of(&self, version: crate::Version) -> Result<Release, Error> {
        let dir = self.root.join(&version.tag);
        let meta = tokio::fs::metadata(&dir)
            .await
            .map_err(|e| Error::io("read metadata of", &dir, e))?;
        let published_at = meta.modified().ok().and_then(|t| jiff::Timestamp::try_from(t).ok());
        let files = self.names_in(&dir, false).await?;
        let tag = version.tag.clone();
        let artifact = pick_artifact(
            &tag,
            files.iter().map(String::as_str),
            self.artifact.as_deref(),
            &self.platform,
            published_at,
        )?;
        let checksum = self.checksum_for(&dir, &artifact).await;
        let signature = format!("{artifact}{}", crate::SIGNATURE_SUFFIX);
        let signature_url = files.contains(&signature).then(|| file_url(&dir.join(&signature)));
        let path = dir.join(&artifact);
        Ok(Release {
            id: file_url(&dir),
            tag,
            slot: version.build.clone(),
            version,
            artifact_url: file_url(&path),
            artifact_name: artifact,
            published_at,
            checksum,
            signature_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_lists() {
        let hex = "a".repeat(64);
        let text = format!("{hex}  app_linux_amd64.tar.gz\n{}  *other.zip\n", "b".repeat(64));
        assert_eq!(find_in_sums(&text, "app_linux_amd64.tar.gz"), Some(hex));
        assert_eq!(find_in_sums(&text, "other.zip"), Some("b".repeat(64)));
        assert_eq!(find_in_sums(&text, "missing"), None);
    }

    #[test]
    fn urls() {
        let opts = OpenOptions::default();
        let r = FileRegistry::from_url(&url::Url::parse("file:///srv/rel%20eases").unwrap(), &opts).unwrap();
        assert_eq!(r.root(), Path::new("/srv/rel eases"));
        let r = FileRegistry::from_url(&url::Url::parse("file://./releases").unwrap(), &opts).unwrap();
        assert_eq!(r.root(), Path::new("./releases"));
    }
}
