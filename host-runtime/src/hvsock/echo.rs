//! A test acceptor that echoes every connection (debug builds, tests and benchmarks only; the
//! production binary has none). Used by the end-to-end tests through the debug-only
//! `[hvsock.test] echo = true` config key, and by `hvisd bench hvsock`.

use super::{HvsockAcceptor, HvsockStream};
use hvisd_protocol::guid::Guid;
use tokio::io::AsyncWriteExt;

/// Echoes each connection: copies what it reads back (through a bounded 8 KiB buffer), sends
/// its FIN once the peer's arrives, and logs the outcome.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoAcceptor;

impl HvsockAcceptor for EchoAcceptor {
    fn accept(&self, service_id: Guid, stream: HvsockStream) {
        let label = stream.info().label.clone();
        tokio::spawn(async move {
            let (mut rx, mut tx) = stream.into_split();
            let copied = tokio::io::copy(&mut rx, &mut tx).await;
            let result = match copied {
                Ok(n) => tx.shutdown().await.map(|()| n),
                Err(e) => Err(e),
            };
            match result {
                Ok(n) => {
                    tracing::info!(connection = %label, service = %service_id, "hvsock echo: {n} bytes echoed")
                }
                Err(e) => {
                    tracing::warn!(connection = %label, service = %service_id, "hvsock echo stopped: {e}")
                }
            }
        });
    }
}
