//! Version parsing and precedence: SemVer 2 (with or without a leading `v`,
//! leading zeros accepted as Dewy does) and CalVer with Dewy's format tokens.

use std::cmp::Ordering;
use std::fmt;

use regex::Regex;

/// A pre-release identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ident {
    Num(u64),
    Alpha(String),
}

impl Ord for Ident {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Self::Num(a), Self::Num(b)) => a.cmp(b),
            (Self::Num(_), Self::Alpha(_)) => Ordering::Less,
            (Self::Alpha(_), Self::Num(_)) => Ordering::Greater,
            (Self::Alpha(a), Self::Alpha(b)) => a.cmp(b),
        }
    }
}

impl PartialOrd for Ident {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn parse_pre(pre: &str) -> Vec<Ident> {
    pre.split('.')
        .map(|p| p.parse::<u64>().map_or_else(|_| Ident::Alpha(p.to_owned()), Ident::Num))
        .collect()
}

/// SemVer §11: a release is higher than any pre-release; pre-releases
/// compare identifier by identifier, a shorter list being lower.
fn cmp_pre(a: &[Ident], b: &[Ident]) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => a.cmp(b),
    }
}

/// A parsed version of a release tag.
#[derive(Debug, Clone)]
pub struct Version {
    /// The tag exactly as published.
    pub tag: String,
    numbers: Vec<u64>,
    pre: Vec<Ident>,
    /// Build metadata (after `+`): the blue/green slot.
    pub build: Option<String>,
}

impl Version {
    /// Whether this is a pre-release.
    pub fn is_prerelease(&self) -> bool {
        !self.pre.is_empty()
    }

    /// Precedence order (build metadata ignored).
    pub fn cmp_precedence(&self, other: &Self) -> Ordering {
        let n = self.numbers.len().max(other.numbers.len());
        for i in 0..n {
            let (a, b) = (self.numbers.get(i).unwrap_or(&0), other.numbers.get(i).unwrap_or(&0));
            match a.cmp(b) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        cmp_pre(&self.pre, &other.pre)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.tag)
    }
}

/// How tags are parsed: SemVer, or CalVer with a format.
#[derive(Debug, Clone)]
pub enum Scheme {
    /// Semantic versioning.
    SemVer,
    /// Calendar versioning with the given format.
    CalVer(CalVerFormat),
}

impl Scheme {
    /// Parses a tag; `None` when it is not a version of this scheme.
    pub fn parse(&self, tag: &str) -> Option<Version> {
        match self {
            Self::SemVer => parse_semver(tag),
            Self::CalVer(format) => format.parse(tag),
        }
    }
}

fn semver_regex() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+([0-9A-Za-z.-]+))?$").expect("valid regex")
    })
}

/// Parses a SemVer tag such as `v1.2.3-rc.1+blue`.
pub fn parse_semver(tag: &str) -> Option<Version> {
    let c = semver_regex().captures(tag)?;
    let numbers = (1..=3).map(|i| c[i].parse::<u64>().ok()).collect::<Option<Vec<_>>>()?;
    let pre = c.get(4).map(|m| parse_pre(m.as_str())).unwrap_or_default();
    Some(Version {
        tag: tag.to_owned(),
        numbers,
        pre,
        build: c.get(5).map(|m| m.as_str().to_owned()),
    })
}

/// A CalVer format such as `YYYY.0M.0D.MICRO`.
#[derive(Debug, Clone)]
pub struct CalVerFormat {
    format: String,
    regex: Regex,
    groups: usize,
}

/// The tokens of Dewy's CalVer formats, in the order they are tried.
const TOKENS: &[(&str, &str)] = &[
    ("YYYY", r"\d{4}"),
    ("0Y", r"\d{2,3}"),
    ("YY", r"\d{1,3}"),
    ("0M", r"0[1-9]|1[0-2]"),
    ("MM", r"[1-9]|1[0-2]"),
    ("0W", r"0[1-9]|[1-4]\d|5[0-3]"),
    ("WW", r"[1-9]|[1-4]\d|5[0-3]"),
    ("0D", r"0[1-9]|[12]\d|3[01]"),
    ("DD", r"[1-9]|[12]\d|3[01]"),
    ("MICRO", r"\d+"),
];

impl CalVerFormat {
    /// Parses a format; it must contain at least one token.
    pub fn new(format: &str) -> Result<Self, String> {
        let mut pattern = String::from("^v?");
        let mut rest = format;
        let mut groups = 0;
        while !rest.is_empty() {
            if let Some((token, re)) = TOKENS.iter().find(|(t, _)| rest.starts_with(t)) {
                pattern.push_str(&format!("({re})"));
                rest = &rest[token.len()..];
                groups += 1;
            } else {
                let c = rest.chars().next().expect("non-empty");
                pattern.push_str(&regex::escape(&c.to_string()));
                rest = &rest[c.len_utf8()..];
            }
        }
        if groups == 0 {
            return Err(format!(
                "invalid calver format `{format}`: it has none of the tokens YYYY, YY, 0Y, MM, 0M, WW, 0W, DD, 0D, MICRO"
            ));
        }
        pattern.push_str(r"(?:-([0-9A-Za-z.-]+))?(?:\+([0-9A-Za-z.-]+))?$");
        let regex = Regex::new(&pattern).map_err(|e| format!("invalid calver format `{format}`: {e}"))?;
        Ok(Self {
            format: format.to_owned(),
            regex,
            groups,
        })
    }

    /// The format string.
    pub fn as_str(&self) -> &str {
        &self.format
    }

    fn parse(&self, tag: &str) -> Option<Version> {
        let c = self.regex.captures(tag)?;
        let numbers = (1..=self.groups)
            .map(|i| c[i].parse::<u64>().ok())
            .collect::<Option<Vec<_>>>()?;
        let pre = c
            .get(self.groups + 1)
            .map(|m| parse_pre(m.as_str()))
            .unwrap_or_default();
        let build = c.get(self.groups + 2).map(|m| m.as_str().to_owned());
        Some(Version {
            tag: tag.to_owned(),
            numbers,
            pre,
            build,
        })
    }
}

/// What [`choose_latest`] considers.
#[derive(Debug, Clone)]
pub struct Selection {
    /// SemVer or CalVer.
    pub scheme: Scheme,
    /// Whether pre-releases may be chosen.
    pub pre_release: bool,
    /// Only releases whose build metadata equals this slot.
    pub slot: Option<String>,
}

impl Selection {
    /// SemVer, no pre-releases, no slot.
    pub fn semver() -> Self {
        Self {
            scheme: Scheme::SemVer,
            pre_release: false,
            slot: None,
        }
    }
}

/// Picks the highest version among `tags` under `selection`. Tags that parse
/// as no version are skipped with a debug log. The slot filter is applied
/// *before* choosing, so a slot host never starves behind another slot's
/// newer tag. Ties (same precedence, e.g. `v1.0.0` and `1.0.0`) are broken by
/// the tag string, so the answer does not depend on listing order.
pub fn choose_latest<'a>(tags: impl IntoIterator<Item = &'a str>, selection: &Selection) -> Option<Version> {
    let mut best: Option<Version> = None;
    for tag in tags {
        let Some(v) = selection.scheme.parse(tag) else {
            if crate::first_time(format!("version\0{tag}")) {
                tracing::info!(tag, "Skipping a release that is not a version of the configured scheme");
            }
            continue;
        };
        if v.is_prerelease() && !selection.pre_release {
            continue;
        }
        if let Some(slot) = &selection.slot
            && v.build.as_deref() != Some(slot.as_str())
        {
            continue;
        }
        let better = match &best {
            None => true,
            Some(b) => match v.cmp_precedence(b) {
                Ordering::Greater => true,
                Ordering::Equal => v.tag > b.tag,
                Ordering::Less => false,
            },
        };
        if better {
            best = Some(v);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latest(tags: &[&str], pre: bool, slot: Option<&str>) -> Option<String> {
        let sel = Selection {
            scheme: Scheme::SemVer,
            pre_release: pre,
            slot: slot.map(str::to_owned),
        };
        choose_latest(tags.iter().copied(), &sel).map(|v| v.tag)
    }

    #[test]
    fn semver_precedence_table() {
        type Case<'a> = (&'a [&'a str], bool, Option<&'a str>, Option<&'a str>);
        let cases: &[Case<'_>] = &[
            (&["v1.0.0", "v1.2.0", "v1.10.0", "v1.9.9"], false, None, Some("v1.10.0")),
            (&["1.0.0", "v2.0.0", "latest", "nightly"], false, None, Some("v2.0.0")),
            (&["v1.0.0", "v2.0.0-rc.1"], false, None, Some("v1.0.0")),
            (&["v1.0.0", "v2.0.0-rc.1"], true, None, Some("v2.0.0-rc.1")),
            (&["v2.0.0-rc.1", "v2.0.0"], true, None, Some("v2.0.0")),
            (
                &[
                    "1.0.0-alpha",
                    "1.0.0-alpha.1",
                    "1.0.0-beta",
                    "1.0.0-beta.2",
                    "1.0.0-beta.11",
                    "1.0.0-rc.1",
                ],
                true,
                None,
                Some("1.0.0-rc.1"),
            ),
            (&["1.0.0-beta.2", "1.0.0-beta.11"], true, None, Some("1.0.0-beta.11")),
            (
                &["1.0.0-alpha.1", "1.0.0-alpha.beta"],
                true,
                None,
                Some("1.0.0-alpha.beta"),
            ),
            (&["v01.02.03", "v1.2.2"], false, None, Some("v01.02.03")),
            // Build metadata is ignored for order; the tie is broken by the tag.
            (&["v1.0.0+b", "v1.0.0+a"], false, None, Some("v1.0.0+b")),
            (&["v1.0.0+a", "v1.0.0+b"], false, None, Some("v1.0.0+b")),
            // Slots: the newest *blue* wins even when a newer green exists
            // (the Go original starves here).
            (
                &["v1.0.0+blue", "v1.1.0+green", "v1.0.1+blue"],
                false,
                Some("blue"),
                Some("v1.0.1+blue"),
            ),
            (&["v1.1.0+green"], false, Some("blue"), None),
            (&["V1.0.0", "release-1", "v1.0", "1.2.3.4"], false, None, None),
            (&[], false, None, None),
        ];
        for (tags, pre, slot, want) in cases {
            assert_eq!(
                latest(tags, *pre, *slot).as_deref(),
                *want,
                "{tags:?} pre={pre} slot={slot:?}"
            );
        }
    }

    #[test]
    fn calver_table() {
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            (
                "YYYY.0M.0D.MICRO",
                &["2024.01.15.1", "2024.01.15.10", "2024.01.15.2", "2023.12.31.99"],
                Some("2024.01.15.10"),
            ),
            (
                "YYYY.MM.DD",
                &["2024.1.15", "2024.12.1", "2024.2.30"],
                Some("2024.12.1"),
            ),
            ("vYY.0W", &["v24.05", "v24.52", "v24.54"], Some("v24.52")),
            (
                "YYYY.0M.MICRO",
                &["2024.01.1", "2024.01.1-rc.1", "2024.13.1"],
                Some("2024.01.1"),
            ),
            ("YYYY.0M", &["2024-01", "v1.2.3"], None),
        ];
        for (format, tags, want) in cases {
            let f = CalVerFormat::new(format).unwrap();
            let sel = Selection {
                scheme: Scheme::CalVer(f),
                pre_release: false,
                slot: None,
            };
            assert_eq!(
                choose_latest(tags.iter().copied(), &sel).map(|v| v.tag).as_deref(),
                *want,
                "{format}"
            );
        }
        assert!(CalVerFormat::new("abc").is_err());
        let f = CalVerFormat::new("YYYY.0M.MICRO").unwrap();
        let v = f.parse("v2024.03.7-beta+blue").unwrap();
        assert!(v.is_prerelease());
        assert_eq!(v.build.as_deref(), Some("blue"));
    }
}
