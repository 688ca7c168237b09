//! The plugin's imports, forwarded to the core: each call is a [`ToCore::Import`] answered by a
//! [`ToWorker::ImportReply`] with the same id. The core checks the grants again; the checks the
//! worker makes first (in `state.rs`) only spare the core the obvious refusals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hvisd_protocol::worker::{self as wire, ErrorKind, Import, ImportReply, PluginError, ToCore};
use tokio::sync::oneshot;

use super::Outbox;
use crate::types::{KvpError, KvpFuture, KvpStore, Pool, Value};

/// Imports waiting for the core's answer.
pub(crate) type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ImportReply>>>>;

/// Hands the core's answer to the import that waits for it (an unknown id is ignored).
pub(crate) fn complete(pending: &Pending, id: u64, reply: ImportReply) {
    let waiter = pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
    if let Some(tx) = waiter {
        let _ = tx.send(reply);
    }
}

/// The `kvp-store` import of a worker.
pub(crate) struct ForwardingKvpStore {
    outbox: Outbox,
    pending: Pending,
    next: AtomicU64,
}

impl ForwardingKvpStore {
    pub(crate) fn new(outbox: Outbox, pending: Pending) -> Self {
        Self::new_with_ids(outbox, pending, 1)
    }

    /// Import ids from `first` (two forwarders sharing `pending` use disjoint ranges).
    pub(crate) fn new_with_ids(outbox: Outbox, pending: Pending, first: u64) -> Self {
        Self {
            outbox,
            pending,
            next: AtomicU64::new(first),
        }
    }

    fn ask(&self, import: Import) -> impl Future<Output = Result<ImportReply, KvpError>> + use<> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let outbox = self.outbox.clone();
        let pending = self.pending.clone();
        async move {
            let frame = wire::encode_to_core(&ToCore::Import { id, import });
            if outbox.send(frame).await.is_err() {
                pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(KvpError::Unavailable("the core is gone".into()));
            }
            rx.await
                .map_err(|_| KvpError::Unavailable("the core did not answer".into()))
        }
    }
}

fn kvp_error(e: PluginError) -> KvpError {
    match e.kind {
        ErrorKind::NotFound => KvpError::NotFound(e.message),
        ErrorKind::Denied => KvpError::Denied(e.message),
        ErrorKind::Invalid => KvpError::Invalid(e.message),
        ErrorKind::Unavailable => KvpError::Unavailable(e.message),
        ErrorKind::Failed => KvpError::Failed(e.message),
    }
}

fn mismatch<T>() -> Result<T, KvpError> {
    Err(KvpError::Failed("the core answered another import".into()))
}

impl KvpStore for ForwardingKvpStore {
    fn get(&self, pool: Pool, key: String) -> KvpFuture<Option<Value>> {
        let reply = self.ask(Import::KvpGet { pool, key });
        Box::pin(async move {
            match reply.await? {
                ImportReply::KvpGet(r) => r.map_err(kvp_error),
                _ => mismatch(),
            }
        })
    }
    fn set(&self, pool: Pool, key: String, value: Value) -> KvpFuture<()> {
        let reply = self.ask(Import::KvpSet { pool, key, value });
        Box::pin(async move {
            match reply.await? {
                ImportReply::KvpSet(r) => r.map_err(kvp_error),
                _ => mismatch(),
            }
        })
    }
    fn delete(&self, pool: Pool, key: String) -> KvpFuture<bool> {
        let reply = self.ask(Import::KvpDelete { pool, key });
        Box::pin(async move {
            match reply.await? {
                ImportReply::KvpDelete(r) => r.map_err(kvp_error),
                _ => mismatch(),
            }
        })
    }
    fn list(&self, pool: Pool) -> KvpFuture<Vec<String>> {
        let reply = self.ask(Import::KvpList { pool });
        Box::pin(async move {
            match reply.await? {
                ImportReply::KvpList(r) => r.map_err(kvp_error),
                _ => mismatch(),
            }
        })
    }
}

/// The `hvsock` import of a worker: the core checks the grant and connects; the connection's
/// socket end arrives on the stream socket, tagged with the id the reply names.
pub(crate) struct ForwardingConnector {
    ask: ForwardingKvpStore,
    inbox: Arc<super::streams::StreamInbox>,
}

impl ForwardingConnector {
    pub(crate) fn new(
        outbox: Outbox,
        pending: Pending,
        inbox: Arc<super::streams::StreamInbox>,
    ) -> Self {
        Self {
            ask: ForwardingKvpStore::new_with_ids(outbox, pending, 1 << 63),
            inbox,
        }
    }
}

impl crate::HvsockConnector for ForwardingConnector {
    fn connect(&self, service: &str) -> crate::ConnectFuture<'_> {
        let reply = self.ask.ask(Import::HvsockConnect {
            service: service.to_owned(),
        });
        Box::pin(async move {
            let conn = match reply.await? {
                ImportReply::HvsockConnect(r) => r.map_err(kvp_error)?,
                _ => return mismatch(),
            };
            let fd = self
                .inbox
                .take(conn, std::time::Duration::from_secs(5))
                .await
                .ok_or_else(|| {
                    KvpError::Unavailable("the connection's stream did not arrive".into())
                })?;
            let stream = super::streams::tokio_stream(fd)
                .map_err(|e| KvpError::Failed(format!("the connection's stream: {e}")))?;
            let (r, w) = stream.into_split();
            Ok((
                Box::pin(r) as crate::BoxedReader,
                Box::pin(w) as crate::BoxedWriter,
            ))
        })
    }
}
