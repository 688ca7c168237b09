//! A test acceptor that echoes every connection (debug builds, tests and benchmarks only; the
//! production binary has none). Used by the end-to-end tests through the debug-only
//! `[hvsock.test] echo = true` config key, and by `hvisd bench hvsock`.

use super::{HvsockAcceptor, HvsockStream};
use hvisd_protocol::guid::Guid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Echoes each connection: copies what it reads back through one buffer (8 KiB by default),
/// sends its FIN once the peer's arrives, and logs the outcome.
#[derive(Debug, Clone, Copy)]
pub struct EchoAcceptor {
    buffer: usize,
}

impl Default for EchoAcceptor {
    fn default() -> Self {
        Self::with_buffer(8 << 10)
    }
}

impl EchoAcceptor {
    /// An echo that reads and writes up to `buffer` bytes at a time.
    pub fn with_buffer(buffer: usize) -> Self {
        Self {
            buffer: buffer.max(1),
        }
    }
}

impl HvsockAcceptor for EchoAcceptor {
    fn accept(&self, service_id: Guid, stream: HvsockStream) {
        let label = stream.info().label.clone();
        let size = self.buffer;
        tokio::spawn(async move {
            let (mut rx, mut tx) = stream.into_split();
            let copied = async {
                let mut buf = vec![0u8; size];
                let mut total = 0u64;
                loop {
                    let n = rx.read(&mut buf).await?;
                    if n == 0 {
                        return Ok::<_, std::io::Error>(total);
                    }
                    tx.write_all(&buf[..n]).await?;
                    total += n as u64;
                }
            }
            .await;
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

/// Makes the debug config's test connects, one after the other, and logs each outcome as
/// `hvsock test connect to SERVICE: ...` (the end-to-end tests read the log).
#[cfg(debug_assertions)]
pub async fn run_test_connects(
    hvsock: super::Hvsock,
    connects: Vec<crate::config::HvsockTestConnect>,
) {
    for spec in connects {
        let Some(service_id) = super::unix::parse_service(&spec.service) else {
            tracing::error!(
                "hvsock test connect: {:?} is not a service GUID or port",
                spec.service
            );
            continue;
        };
        let sent = spec.text.repeat(spec.repeat).into_bytes();
        let outcome = async {
            let stream = hvsock.connect(service_id).await?;
            let (mut rx, mut tx) = stream.into_split();
            let writer = async {
                tx.write_all(&sent).await?;
                tx.shutdown().await
            };
            let mut got = Vec::new();
            let (w, r) = tokio::join!(writer, rx.read_to_end(&mut got));
            w?;
            r?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(got)
        }
        .await;
        match outcome {
            Ok(got) => tracing::info!(
                "hvsock test connect to {service_id}: sent {} bytes, received {} bytes, {}",
                sent.len(),
                got.len(),
                if got == sent {
                    "echo ok"
                } else {
                    "echo mismatch"
                }
            ),
            Err(e) => tracing::warn!("hvsock test connect to {service_id} failed: {e}"),
        }
    }
}
