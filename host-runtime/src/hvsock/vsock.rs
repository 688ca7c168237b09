//! hvsock over the kernel's AF_VSOCK, for a guest whose kernel runs `hv_sock`: the kernel owns
//! the VMBus pipes and hvisd sees sockets.
//!
//! Linux's `hv_sock` maps vsock port `P` to the service GUID `P-facb-11e6-bd58-64006a7986d3`
//! (both directions), listens with `VMADDR_CID_ANY` and connects to the host as
//! `VMADDR_CID_HOST` (2). Sockets come from `tokio-vsock` (the rust-vsock project's async
//! crate, on top of its `vsock` crate).

use super::{ConnectError, ConnectionInfo, Hvsock, HvsockStream, HvsockTransport, Initiator};
use hvisd_protocol::guid::Guid;
use std::io;
use std::time::Duration;
use tokio::sync::watch;
use tokio_vsock::{VsockAddr, VsockListener, VsockStream};

pub use tokio_vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_LOCAL};

/// The vsock port a service GUID stands for, if it follows the template.
pub fn port_for(service_id: &Guid) -> Option<u32> {
    service_id.vsock_port()
}

/// The service GUID of vsock port `port`.
pub fn service_for(port: u32) -> Guid {
    Guid::for_vsock_port(port)
}

/// Listens on `port` at `cid` (`VMADDR_CID_ANY` on a guest; `VMADDR_CID_LOCAL` in tests).
pub fn bind(cid: u32, port: u32) -> io::Result<VsockListener> {
    VsockListener::bind(VsockAddr::new(cid, port))
}

/// Accepts connections on `listener` (bound to `port`) until `stop`, handing each to `hvsock`'s
/// acceptor as a host-initiated connection to the port's service GUID.
pub async fn serve(
    listener: VsockListener,
    port: u32,
    hvsock: Hvsock,
    mut stop: watch::Receiver<bool>,
) {
    let service_id = service_for(port);
    while !*stop.borrow() {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let info = ConnectionInfo {
                        service_id,
                        endpoint_id: None,
                        transport: HvsockTransport::Vsock,
                        initiator: Initiator::Host,
                        label: format!("hvsock {service_id} (vsock port {port} from cid {} port {})", peer.cid(), peer.port()),
                    };
                    hvsock.accept(HvsockStream::vsock(stream, info));
                }
                Err(e) => {
                    hvisd_protocol::throttled!(warn, "hvsock vsock port {port}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
}

/// Connects to the host service `service_id` (a vsock-template GUID) at `cid`.
pub async fn connect(
    cid: u32,
    service_id: Guid,
    timeout: Duration,
) -> Result<HvsockStream, ConnectError> {
    let port = port_for(&service_id).ok_or(ConnectError::NotVsockService { service_id })?;
    let stream = tokio::time::timeout(timeout, VsockStream::connect(VsockAddr::new(cid, port)))
        .await
        .map_err(|_| ConnectError::Timeout {
            service_id,
            after: timeout,
            stage: "vsock connect",
        })?
        .map_err(|source| ConnectError::Vsock {
            service_id,
            cid,
            port,
            source,
        })?;
    let info = ConnectionInfo {
        service_id,
        endpoint_id: None,
        transport: HvsockTransport::Vsock,
        initiator: Initiator::Guest,
        label: format!("hvsock {service_id} (vsock cid {cid} port {port}, guest-initiated)"),
    };
    Ok(HvsockStream::vsock(stream, info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn ports_map_to_the_hv_sock_template_and_back() {
        let id = service_for(5000);
        assert_eq!(id.to_string(), "00001388-facb-11e6-bd58-64006a7986d3");
        assert_eq!(port_for(&id), Some(5000));
        assert_eq!(port_for(&hvisd_protocol::guid::class_id::KVP), None);
    }

    #[tokio::test]
    async fn a_non_template_service_is_refused_before_any_socket_is_made() {
        let kvp = hvisd_protocol::guid::class_id::KVP;
        // CID 2 would be the host: the check must fail first, without connecting anywhere.
        let err = connect(VMADDR_CID_HOST, kvp, Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::NotVsockService { .. }), "{err}");
    }

    /// Loopback only (CID 1), and only where the kernel has the `vsock_loopback` transport;
    /// skipped (with a note) elsewhere. Never CID 2.
    #[tokio::test]
    async fn loopback_listen_and_connect_when_the_kernel_has_vsock_loopback() {
        let port = 0x4856_0000 | (std::process::id() & 0xffff);
        let listener = match bind(VMADDR_CID_LOCAL, port) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skipped: no vsock loopback here ({e})");
                return;
            }
        };
        let (acceptor_tx, mut acceptor_rx) = tokio::sync::mpsc::channel(1);
        let hvsock = Hvsock::new(
            Some(std::sync::Arc::new(acceptor_tx)),
            super::super::HvsockOptions::default(),
        );
        let (_stop_tx, stop) = watch::channel(false);
        tokio::spawn(serve(listener, port, hvsock, stop));
        let mut client =
            match connect(VMADDR_CID_LOCAL, service_for(port), Duration::from_secs(2)).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("skipped: vsock loopback connect failed ({e})");
                    return;
                }
            };
        let (service, mut server) = acceptor_rx.recv().await.unwrap();
        assert_eq!(service, service_for(port));
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
