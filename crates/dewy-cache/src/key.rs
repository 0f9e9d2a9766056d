//! Validated cache keys.

use std::fmt;

use crate::Error;

/// A cache key: one path component, never `.` or `..`, never hidden (the
/// leading dot is reserved for the backend's own files), no `/`, NUL or
/// control characters, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    const CURRENT: &'static str = "current";

    /// Validates `key`.
    pub fn new(key: impl Into<String>) -> Result<Self, Error> {
        let key = key.into();
        let bad = |reason| {
            Err(Error::InvalidKey {
                key: key.escape_debug().to_string(),
                reason,
            })
        };
        if key.is_empty() {
            return bad("empty");
        }
        if key.len() > 255 {
            return bad("longer than 255 bytes");
        }
        if key.contains('/') || key.contains('\\') {
            return bad("contains a path separator");
        }
        if key.chars().any(char::is_control) {
            return bad("contains a NUL or control character");
        }
        if key.starts_with('.') {
            return bad("starts with a dot");
        }
        Ok(Self(key))
    }

    /// The key of an artifact: `<tag>--<artifact>`, as the Go original names it.
    pub fn artifact(tag: &str, artifact: &str) -> Result<Self, Error> {
        Self::new(format!("{tag}--{artifact}"))
    }

    /// The key holding the artifact key in use.
    pub fn current() -> Self {
        Self(Self::CURRENT.to_owned())
    }

    /// The key recording that the release of artifact key `artifact`
    /// failed (to start, or its health checks): `bad.<tag>--<artifact>`.
    /// Kept in the cache so a restarted dewy, and every host sharing the
    /// cache, skips that release too.
    pub fn bad(artifact: &Key) -> Self {
        Self(format!("{}{}", Self::BAD_PREFIX, artifact.0))
    }

    const BAD_PREFIX: &'static str = "bad.";

    /// Whether this key is a bad-release record.
    pub fn is_bad_record(&self) -> bool {
        self.0.starts_with(Self::BAD_PREFIX)
    }

    const HOST_PREFIX: &'static str = "host.";

    /// The key of a host's heartbeat record: `host.<id>`, with the id's
    /// characters outside `[A-Za-z0-9._-]` (and `--`) replaced, so it is
    /// never taken for an artifact.
    pub fn host(id: &str) -> Result<Self, Error> {
        let mut clean: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        while clean.contains("--") {
            clean = clean.replace("--", "-");
        }
        Self::new(format!("{}{clean}", Self::HOST_PREFIX))
    }

    /// Whether this key is a host's heartbeat record.
    pub fn is_host_record(&self) -> bool {
        self.0.starts_with(Self::HOST_PREFIX)
    }

    const ROLLOUT_PREFIX: &'static str = "rollout.";

    /// The key of the staged-rollout record of the release of artifact key
    /// `artifact`: `rollout.<tag>--<artifact>`, shared by the fleet.
    pub fn rollout(artifact: &Key) -> Self {
        Self(format!("{}{}", Self::ROLLOUT_PREFIX, artifact.0))
    }

    /// Whether this key is a staged-rollout record.
    pub fn is_rollout_record(&self) -> bool {
        self.0.starts_with(Self::ROLLOUT_PREFIX)
    }

    /// The artifact key a bad-release or rollout record is about.
    pub fn subject(&self) -> Option<Key> {
        let rest = self
            .0
            .strip_prefix(Self::BAD_PREFIX)
            .or_else(|| self.0.strip_prefix(Self::ROLLOUT_PREFIX))?;
        Some(Self(rest.to_owned()))
    }

    /// Whether this key names an artifact (`<tag>--<artifact>`).
    pub fn is_artifact(&self) -> bool {
        self.0.contains("--")
            && !self.is_bad_record()
            && !self.is_host_record()
            && !self.is_rollout_record()
            && !self.0.starts_with(Self::CURRENT)
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The tag part of an artifact key.
    pub fn tag(&self) -> Option<&str> {
        self.0.split_once("--").map(|(t, _)| t)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Key {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        for bad in [
            "",
            "../x",
            "a/b",
            "/etc/passwd",
            "a\0b",
            "..",
            ".",
            ".lock",
            "a\nb",
            &"x".repeat(256),
        ] {
            assert!(Key::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "current",
            "v1.2.3--app_linux_amd64.tar.gz",
            "2024.01.15--a.zip",
            "v1..2",
        ] {
            assert!(Key::new(good).is_ok(), "{good:?} rejected");
        }
        let k = Key::artifact("v1.2.3", "app.tar.gz").unwrap();
        assert_eq!(k.as_str(), "v1.2.3--app.tar.gz");
        assert_eq!(k.tag(), Some("v1.2.3"));
        assert!(k.is_artifact() && !Key::current().is_artifact());
        let bad = Key::bad(&k);
        assert_eq!(bad.as_str(), "bad.v1.2.3--app.tar.gz");
        assert!(bad.is_bad_record() && !bad.is_artifact());
        assert!(Key::artifact("../v1", "x").is_err());
        let err = Key::new("a\0b").unwrap_err().to_string();
        assert!(err.contains("a\\0b"), "{err}");
    }
}
