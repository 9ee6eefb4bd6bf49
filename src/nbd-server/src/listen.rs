//! Listen addresses (`unix:PATH`, `tcp:HOST:PORT`) and the listeners bound to them.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::net::{TcpListener, UnixListener};

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP address (loopback by default).
    Tcp(SocketAddr),
}

/// A listen address that could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ListenAddrError {
    /// Neither prefix was given.
    #[error("listen address {0:?} must start with unix: or tcp: (e.g. unix:/run/pairbd.sock, tcp:127.0.0.1:10809)")]
    MissingScheme(String),
    /// `unix:` without a path.
    #[error("listen address {0:?} has an empty socket path")]
    EmptyPath(String),
    /// `tcp:` with something that is not HOST:PORT.
    #[error(
        "listen address {0:?}: {1} (use tcp:IP:PORT, e.g. tcp:127.0.0.1:10809 or tcp:[::1]:10809)"
    )]
    BadTcp(String, std::net::AddrParseError),
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenAddrError::EmptyPath(text.to_string()));
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(address) = text.strip_prefix("tcp:") {
            address
                .parse()
                .map(ListenAddr::Tcp)
                .map_err(|error| ListenAddrError::BadTcp(text.to_string(), error))
        } else {
            Err(ListenAddrError::MissingScheme(text.to_string()))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(address) => write!(f, "tcp:{address}"),
        }
    }
}

/// A bound listener.
pub(crate) enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds `address`. A leftover Unix socket file with nobody listening on it is
    /// replaced; one with a live listener is an error (another server owns it).
    pub(crate) async fn bind(address: &ListenAddr) -> io::Result<Listener> {
        match address {
            ListenAddr::Tcp(socket_address) => {
                Ok(Listener::Tcp(TcpListener::bind(socket_address).await?))
            }
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).await?;
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            // Best effort: a socket file left behind is replaced at the next start anyway.
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is in use by a running server", path.display()),
        ));
    }
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_schemes_and_rejects_the_rest() {
        assert_eq!(
            "unix:/run/x.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert!("tcp:[::1]:10809".parse::<ListenAddr>().is_ok());
        assert!(matches!(
            "127.0.0.1:1".parse::<ListenAddr>(),
            Err(ListenAddrError::MissingScheme(_))
        ));
        assert!(matches!(
            "unix:".parse::<ListenAddr>(),
            Err(ListenAddrError::EmptyPath(_))
        ));
        assert!(matches!(
            "tcp:localhost".parse::<ListenAddr>(),
            Err(ListenAddrError::BadTcp(..))
        ));
    }
}
