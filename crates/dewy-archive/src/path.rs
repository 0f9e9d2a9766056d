//! Lexical path checks for entry names and link targets.

use std::path::{Component, Path, PathBuf};

use crate::UnsafeReason;

/// Validates an entry name and returns it normalized: no `.`, no `..`,
/// relative, non-empty.
pub(crate) fn normalize_entry(raw: &[u8]) -> Result<PathBuf, UnsafeReason> {
    let name = std::str::from_utf8(raw).map_err(|_| UnsafeReason::NonUtf8Name)?;
    if name.chars().any(char::is_control) {
        return Err(UnsafeReason::ControlCharacter);
    }
    let path = Path::new(name);
    let mut out: Vec<&str> = Vec::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => return Err(UnsafeReason::AbsolutePath),
            Component::CurDir => {}
            Component::ParentDir => {
                if out.pop().is_none() {
                    return Err(UnsafeReason::EscapesRoot);
                }
            }
            Component::Normal(c) => out.push(c.to_str().ok_or(UnsafeReason::NonUtf8Name)?),
        }
    }
    if out.is_empty() {
        return Err(UnsafeReason::EmptyName);
    }
    Ok(out.iter().collect())
}

/// Validates a link target string: UTF-8, no control characters.
pub(crate) fn check_target(raw: &[u8]) -> Result<String, UnsafeReason> {
    let target = std::str::from_utf8(raw).map_err(|_| UnsafeReason::NonUtf8Name)?;
    if target.chars().any(char::is_control) {
        return Err(UnsafeReason::ControlCharacter);
    }
    Ok(target.to_owned())
}

/// Resolves `target` lexically from the folder `from` (relative to the root),
/// following the archive's own symbolic links in `links` (link path ->
/// target), and returns the resolved path relative to the root, or why it
/// leaves the root.
pub(crate) fn resolve_link(
    from: &Path,
    target: &str,
    links: &dyn Fn(&Path) -> Option<String>,
    depth: usize,
) -> Result<PathBuf, UnsafeReason> {
    if depth > 32 {
        return Err(UnsafeReason::LinkLoop);
    }
    if Path::new(target).is_absolute() {
        return Err(UnsafeReason::AbsoluteLinkTarget(target.to_owned()));
    }
    let mut current: PathBuf = from.to_path_buf();
    for component in Path::new(target).components() {
        match component {
            Component::Prefix(_) | Component::RootDir => {
                return Err(UnsafeReason::AbsoluteLinkTarget(target.to_owned()));
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if !current.pop() {
                    return Err(UnsafeReason::LinkEscapesRoot(target.to_owned()));
                }
            }
            Component::Normal(c) => {
                current.push(c);
                if let Some(next) = links(&current) {
                    let folder = current.parent().map(Path::to_path_buf).unwrap_or_default();
                    current = resolve_link(&folder, &next, links, depth + 1).map_err(|e| match e {
                        UnsafeReason::LinkEscapesRoot(_) => UnsafeReason::LinkEscapesRoot(target.to_owned()),
                        other => other,
                    })?;
                }
            }
        }
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names() {
        let ok = [("a/b", "a/b"), ("./a", "a"), ("a/../b", "b"), ("a//b/", "a/b")];
        for (raw, want) in ok {
            assert_eq!(normalize_entry(raw.as_bytes()).unwrap(), PathBuf::from(want), "{raw}");
        }
        let bad = [
            ("/etc/passwd", UnsafeReason::AbsolutePath),
            ("../x", UnsafeReason::EscapesRoot),
            ("a/../../x", UnsafeReason::EscapesRoot),
            ("a\0b", UnsafeReason::ControlCharacter),
            ("a\nb", UnsafeReason::ControlCharacter),
            (".", UnsafeReason::EmptyName),
        ];
        for (raw, want) in bad {
            assert_eq!(normalize_entry(raw.as_bytes()).unwrap_err(), want, "{raw:?}");
        }
        assert_eq!(normalize_entry(b"a\xffb").unwrap_err(), UnsafeReason::NonUtf8Name);
    }

    #[test]
    fn link_resolution() {
        let none = |_: &Path| None;
        assert_eq!(
            resolve_link(Path::new("a/b"), "../c", &none, 0).unwrap(),
            PathBuf::from("a/c")
        );
        assert_eq!(
            resolve_link(Path::new(""), "..", &none, 0),
            Err(UnsafeReason::LinkEscapesRoot("..".into()))
        );
        // a/b -> .. resolves to the root; c -> a/b/.. then leaves it.
        let chain = |p: &Path| (p == Path::new("a/b")).then(|| "..".to_owned());
        assert!(matches!(
            resolve_link(Path::new(""), "a/b/..", &chain, 0),
            Err(UnsafeReason::LinkEscapesRoot(_))
        ));
        let looped = |p: &Path| (p == Path::new("x")).then(|| "x".to_owned());
        assert_eq!(
            resolve_link(Path::new(""), "x", &looped, 0),
            Err(UnsafeReason::LinkLoop)
        );
    }
}
