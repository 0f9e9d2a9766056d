//! URLs displayed without their secrets.

use std::fmt;

/// Query parameters whose values are secrets (compared case-insensitively;
/// a trailing `*` matches a prefix).
const SECRET_PARAMS: &[&str] = &[
    "token",
    "access_token",
    "password",
    "secret",
    "key",
    "signature",
    "sig",
    "x-amz-*",
    "x-goog-*",
    "code",
];

/// Displays a URL with the password, the user name when a password is
/// present, and secret query values replaced by `****`.
#[derive(Clone, Copy)]
pub struct SafeUrl<'a>(pub &'a str);

impl fmt::Display for SafeUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Ok(mut url) = url::Url::parse(self.0) else {
            // Not a URL: show only up to the first `?` or `@`.
            let cut = self.0.find(['?', '@']).unwrap_or(self.0.len());
            return write!(f, "{}{}", &self.0[..cut], if cut < self.0.len() { "****" } else { "" });
        };
        if url.password().is_some() {
            let _ = url.set_password(Some("****"));
        } else if !url.username().is_empty() {
            let _ = url.set_username("****");
        }
        if url.query().is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    let secret = SECRET_PARAMS.iter().any(|p| match p.strip_suffix('*') {
                        Some(prefix) => lower.starts_with(prefix),
                        None => lower == *p,
                    });
                    (k.into_owned(), if secret { "****".to_owned() } else { v.into_owned() })
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        f.write_str(url.as_str())
    }
}

impl fmt::Debug for SafeUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::SafeUrl;

    #[test]
    fn secrets_are_masked() {
        let cases = [
            ("https://user:hunter2@example.com/a", "https://user:****@example.com/a"),
            ("https://tok@example.com/a", "https://****@example.com/a"),
            (
                "https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Credential=x&part=1",
                "https://b.s3.amazonaws.com/k?X-Amz-Signature=****&X-Amz-Credential=****&part=1",
            ),
            ("https://example.com/?token=abc", "https://example.com/?token=****"),
            ("file:///srv/releases", "file:///srv/releases"),
        ];
        for (raw, want) in cases {
            assert_eq!(SafeUrl(raw).to_string(), want);
        }
        assert!(!SafeUrl("not a url?token=abc").to_string().contains("abc"));
    }
}
