//! Serving gRPC services on the unix socket a CSI endpoint names.

use std::future::Future;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("CSI endpoint {0:?} is not unix://<absolute path>")]
    Endpoint(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot remove the stale socket {path}: {source}")]
    Stale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("gRPC server on {path} failed: {source}")]
    Serve {
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// The socket path of a `unix:///path` (or `unix:/path`) endpoint.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .filter(|path| path.starts_with('/'))
        .ok_or_else(|| ServeError::Endpoint(endpoint.to_owned()))?;
    Ok(PathBuf::from(path))
}

/// Binds `path`, first removing a socket left by an earlier run (a socket
/// file outlives its process), but nothing that is not a socket.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| ServeError::Stale {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServeError::Stale {
                path: path.to_owned(),
                source,
            });
        }
    }
    UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Serves `router` on `listener` until `stop` resolves.
pub async fn serve(
    router: Router,
    listener: UnixListener,
    path: &Path,
    stop: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        .await
        .map_err(|source| ServeError::Serve {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
        for bad in [
            "/csi/csi.sock",
            "tcp://1.2.3.4:5",
            "unix://relative.sock",
            "",
        ] {
            assert!(
                matches!(socket_path(bad), Err(ServeError::Endpoint(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("csi.sock");
        let first = bind(&path).unwrap();
        drop(first);
        assert!(path.exists(), "the socket file outlives its listener");
        bind(&path).unwrap();

        let file = dir.path().join("data");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(bind(&file), Err(ServeError::NotASocket(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    }
}
