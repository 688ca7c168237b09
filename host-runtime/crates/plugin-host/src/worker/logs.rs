//! Every tracing event in a worker (the plugin's `logging` import, its stdout and stderr, the
//! worker's own warnings) becomes a [`ToCore::Log`] frame. The core writes it, attributed to the
//! plugin, escaped and within the plugin's log budget; the worker only formats and forwards. When
//! the core is slow the outbox fills and lines are dropped here rather than queued without bound.

use std::fmt::Write as _;

use hvisd_protocol::worker::{self as wire, LogLevel, ToCore};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use super::Outbox;

/// Longest line forwarded (the core cuts again).
const MAX_LINE: usize = 4096;

struct Forward(Outbox);

#[derive(Default)]
struct Line {
    message: String,
    fields: String,
}

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            // The core attributes lines to the plugin itself; a `plugin` field from here would be
            // noise at best and a forgery at worst.
            "plugin" => {}
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "plugin" => {}
            name => {
                let _ = write!(self.fields, " {name}={value}");
            }
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Forward {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::TRACE => LogLevel::Trace,
            tracing::Level::DEBUG => LogLevel::Debug,
            tracing::Level::INFO => LogLevel::Info,
            tracing::Level::WARN => LogLevel::Warn,
            tracing::Level::ERROR => LogLevel::Error,
        };
        let mut line = Line::default();
        event.record(&mut line);
        let mut message = line.message;
        message.push_str(&line.fields);
        if message.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let _ = self
            .0
            .try_send(wire::encode_to_core(&ToCore::Log { level, message }));
    }
}

/// Installs the forwarding subscriber for the rest of the worker's life: the plugin's own lines
/// (target `hvisd::plugin`) from debug up, the engine's and the worker's from warn up.
pub(crate) fn install(outbox: Outbox) {
    let filter = tracing_subscriber::filter::Targets::new()
        .with_target("hvisd::plugin", tracing::Level::DEBUG)
        .with_default(tracing::Level::WARN);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(Forward(outbox))
        .try_init();
}
