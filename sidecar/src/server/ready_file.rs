//! The ready file: the bound address, written once the server is serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Writes `address` (such as `127.0.0.1:41234`, no newline) to `path`
/// through a temporary file in the same directory and a rename, so a reader
/// never sees a partial address.
pub(super) async fn write(path: &Path, address: SocketAddr) -> std::io::Result<()> {
    let temporary = temporary_path(path);
    tokio::fs::write(&temporary, address.to_string()).await?;
    if let Err(err) = tokio::fs::rename(&temporary, path).await {
        let _ = tokio::fs::remove_file(&temporary).await;
        return Err(err);
    }
    Ok(())
}

/// Removes the ready file at shutdown so no one reads a stale address.
pub(super) async fn remove(path: &Path) -> std::io::Result<()> {
    match tokio::fs::remove_file(path).await {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_address_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready");
        let address: SocketAddr = "127.0.0.1:41234".parse().unwrap();

        write(&path, address).await.unwrap();

        assert_eq!(std::fs::read_to_string(&path).unwrap(), "127.0.0.1:41234");
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 1);
    }

    #[tokio::test]
    async fn replaces_stale_file_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready");
        std::fs::write(&path, "127.0.0.1:1").unwrap();

        write(&path, "[::1]:9000".parse().unwrap()).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "[::1]:9000");

        remove(&path).await.unwrap();
        assert!(!path.exists());
        remove(&path).await.unwrap();
    }
}
