//! The Unix-socket stand-in for hvsock, for local development without a host.
//!
//! The runtime listens on one Unix stream socket (`[hvsock] unix_listen`, mode 0600). A client
//! connects, writes one line naming the service, then talks: the connection reaches the
//! [`HvsockAcceptor`](super::HvsockAcceptor) exactly as a host-initiated one would. The line is
//! the service GUID (`8-4-4-4-12`) or a decimal vsock port (mapped to
//! `<port>-facb-11e6-bd58-64006a7986d3`), ended by `\n`, at most [`MAX_SERVICE_LINE`] bytes,
//! within [`SERVICE_LINE_TIMEOUT`]:
//!
//! ```text
//! $ printf '5000\nhello' | socat - UNIX-CONNECT:/run/hvisd/hvsock.sock
//! ```
//!
//! [`connect`] is the other direction: a guest-initiated connection to a local stand-in host
//! listening on a Unix socket, announced by the same line.

use super::{ConnectError, ConnectionInfo, Hvsock, HvsockStream, HvsockTransport, Initiator};
use hvisd_protocol::guid::Guid;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};

/// Longest service line, newline included.
pub const MAX_SERVICE_LINE: usize = 64;

/// How long a client has to send its service line.
pub const SERVICE_LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most connections waiting for their service line at once; more are closed at once.
pub const MAX_HANDSHAKES: usize = 64;

/// The service a line names: a GUID, or a decimal vsock port. Surrounding blanks are ignored.
pub fn parse_service(line: &str) -> Option<Guid> {
    let line = line.trim();
    if let Ok(port) = line.parse::<u32>() {
        return Some(Guid::for_vsock_port(port));
    }
    line.parse().ok()
}

/// Why the stand-in could not listen.
#[derive(Debug, thiserror::Error)]
#[error("hvsock Unix stand-in on {}: {what}: {source}", path.display())]
pub struct UnixListenError {
    path: std::path::PathBuf,
    what: &'static str,
    source: io::Error,
}

/// Binds the stand-in's socket at `path` (replacing a stale socket, never another kind of file)
/// with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, UnixListenError> {
    let err = |what| {
        move |source| UnixListenError {
            path: path.to_owned(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path).map_err(err("removing the stale socket"))?
        }
        Ok(_) => {
            return Err(err("refusing to replace")(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("checking")(e)),
    }
    let listener = UnixListener::bind(path).map_err(err("binding"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(err("setting mode 0600"))?;
    Ok(listener)
}

/// Accepts stand-in connections on `listener` until `stop`, handing each to `hvsock`'s acceptor
/// once its service line has arrived.
pub async fn serve(listener: UnixListener, hvsock: Hvsock, mut stop: watch::Receiver<bool>) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    while !*stop.borrow() {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    hvisd_protocol::throttled!(warn, "hvsock Unix stand-in: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            hvisd_protocol::throttled!(
                warn,
                "hvsock Unix stand-in: {MAX_HANDSHAKES} connections still owe their service line; closing a new one"
            );
            continue;
        };
        let hvsock = hvsock.clone();
        tokio::spawn(async move {
            let _permit = permit;
            handshake(stream, &hvsock).await;
        });
    }
}

async fn handshake(mut stream: UnixStream, hvsock: &Hvsock) {
    let line = tokio::time::timeout(SERVICE_LINE_TIMEOUT, read_line(&mut stream)).await;
    let service_id = match line {
        Ok(Ok(line)) => match parse_service(&line) {
            Some(id) => id,
            None => {
                hvisd_protocol::throttled!(
                    warn,
                    "hvsock Unix stand-in: {:?} is neither a service GUID nor a port; closed",
                    hvisd_protocol::text::escape_bytes(line.as_bytes(), 64)
                );
                return;
            }
        },
        Ok(Err(e)) => {
            hvisd_protocol::throttled!(warn, "hvsock Unix stand-in: no service line: {e}");
            return;
        }
        Err(_) => {
            hvisd_protocol::throttled!(
                warn,
                "hvsock Unix stand-in: no service line within {SERVICE_LINE_TIMEOUT:?}; closed"
            );
            return;
        }
    };
    let info = ConnectionInfo {
        service_id,
        endpoint_id: None,
        transport: HvsockTransport::Unix,
        initiator: Initiator::Host,
        label: format!("hvsock {service_id} (unix)"),
    };
    hvsock.accept(HvsockStream::unix(stream, info));
}

/// Reads up to and including `\n`, byte by byte so that nothing after the line is consumed.
async fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::with_capacity(MAX_SERVICE_LINE);
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        if line.len() + 1 >= MAX_SERVICE_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("service line longer than {MAX_SERVICE_LINE} bytes"),
            ));
        }
        line.push(byte);
    }
    String::from_utf8(line)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "service line is not UTF-8"))
}

/// Connects to a stand-in host listening on the Unix socket `path` and announces `service_id`.
pub async fn connect(
    path: &Path,
    service_id: Guid,
    timeout: Duration,
) -> Result<HvsockStream, ConnectError> {
    let err = |what| {
        move |source| ConnectError::Socket {
            service_id,
            what,
            path: path.to_owned(),
            source,
        }
    };
    let attempt = async {
        let mut stream = UnixStream::connect(path)
            .await
            .map_err(err("connecting to"))?;
        stream
            .write_all(format!("{service_id}\n").as_bytes())
            .await
            .map_err(err("writing the service line to"))?;
        Ok(stream)
    };
    let stream =
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ConnectError::Timeout {
                service_id,
                after: timeout,
                stage: "connecting to the Unix stand-in",
            })??;
    let info = ConnectionInfo {
        service_id,
        endpoint_id: None,
        transport: HvsockTransport::Unix,
        initiator: Initiator::Guest,
        label: format!("hvsock {service_id} (unix, guest-initiated)"),
    };
    Ok(HvsockStream::unix(stream, info))
}
