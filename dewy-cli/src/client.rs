//! The client side of the admin API: the one-shot commands talk to a
//! running dewy over its unix socket.

use std::path::{Path, PathBuf};

/// The path of the admin socket of an app folder.
pub(crate) fn socket_path(root: &Path) -> PathBuf {
    root.join(".dewy/admin.sock")
}

/// One request to the running dewy over its admin socket.
pub(crate) fn request(root: &std::path::Path, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket_path(root))?;
    s.write_all(format!("{method} {path} HTTP/1.0\r\nHost: dewy\r\nContent-Length: 0\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    ))
}
