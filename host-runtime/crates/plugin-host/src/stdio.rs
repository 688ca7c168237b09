//! A plugin's stdout and stderr, turned into tracing lines tagged with the plugin.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::text::truncate;

/// Longest line kept; a plugin writing without newlines is cut into lines of this size.
const MAX_LINE: usize = 4096;

/// stdout or stderr of one plugin.
#[derive(Clone)]
pub(crate) struct TracingStdio {
    plugin: Arc<str>,
    stderr: bool,
    line: Arc<Mutex<Vec<u8>>>,
}

impl TracingStdio {
    pub(crate) fn new(plugin: &str, stderr: bool) -> Self {
        TracingStdio {
            plugin: plugin.into(),
            stderr,
            line: Arc::default(),
        }
    }

    fn emit(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let text = truncate(text.trim_end_matches(['\n', '\r']), MAX_LINE);
        let plugin = &*self.plugin;
        if self.stderr {
            tracing::warn!(target: "hvisd::plugin", plugin, stream = "stderr", "{text}");
        } else {
            tracing::info!(target: "hvisd::plugin", plugin, stream = "stdout", "{text}");
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut line = self
            .line
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for &b in bytes {
            line.push(b);
            if b == b'\n' || line.len() >= MAX_LINE {
                self.emit(&line);
                line.clear();
            }
        }
    }
}

impl IsTerminal for TracingStdio {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for TracingStdio {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for TracingStdio {
    async fn ready(&mut self) {}
}

impl OutputStream for TracingStdio {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_LINE)
    }
}

impl tokio::io::AsyncWrite for TracingStdio {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
