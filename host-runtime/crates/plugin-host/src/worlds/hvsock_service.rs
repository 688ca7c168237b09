//! The `hvsock-service` world: one accepted connection served by a fresh
//! instance of the plugin listening on its service.

use std::time::Duration;

use crate::CallError;
use crate::lifecycle::PluginHost;
use crate::manifest::World;
use crate::state::bindings::exports::hyperv::integration::hvsock_service;
use crate::state::{BoxedReader, BoxedWriter, push_streams};
use crate::text::truncate;
use crate::types::KvpError;

impl PluginHost {
    /// hvsock services to listen on, and the plugin serving each.
    pub fn hvsock_services(&self) -> Vec<(String, String)> {
        let mut v = Vec::new();
        for p in self.current().plugins.values() {
            for s in &p.manifest().hvsock.listen {
                v.push((s.clone(), p.name().to_owned()));
            }
        }
        v
    }

    /// Serves one accepted connection on `service` in a fresh instance of the
    /// plugin that listens there; the streams are host-backed wasi:io streams
    /// over `reader` and `writer`. Ends within the manifest's connection deadline.
    pub async fn serve_hvsock(
        &self,
        service: &str,
        reader: BoxedReader,
        writer: BoxedWriter,
    ) -> Result<(), CallError> {
        let p = self
            .current()
            .plugins
            .values()
            .find(|p| p.manifest().hvsock.listen.iter().any(|s| s == service))
            .cloned()
            .ok_or_else(|| CallError::NoSuchPlugin(format!("(listening on `{service}`)")))?;
        let idx = p
            .exports
            .hvsock
            .as_ref()
            .ok_or_else(|| CallError::NotProvided {
                plugin: p.name().to_owned(),
                world: World::HvsockService,
            })?;
        let deadline = Duration::from_millis(p.manifest().limits.connection_deadline_ms);
        let r = p
            .fresh_call(
                deadline,
                |s, i| idx.load(s, i),
                async |g: &hvsock_service::Guest, s| {
                    let (i, o) = push_streams(&mut s.data_mut().table, reader, writer)?;
                    g.call_serve(s, service, i, o).await
                },
            )
            .await?;
        r.map_err(|reason| {
            CallError::Plugin(KvpError::Failed(format!(
                "plugin `{}` ended the connection with an error: {}",
                p.name(),
                truncate(&reason, 1024)
            )))
        })
    }
}
