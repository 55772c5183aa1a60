//! Logging through `tracing`, human-readable or JSON lines (`log.format`), to stderr.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` wins over `level` when set. Calling it twice is
/// harmless (the second call is ignored), which keeps tests simple.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: written to a file or a pipe (systemd, Docker,
    // `2> log`) the escape codes would only garble the lines and break greps. Every line is
    // scrubbed of registered secrets (crate::redact): librdkafka and other libraries write
    // texts we cannot review, at every level down to trace.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::redact::ScrubbingWriter(std::io::stderr()))
        .with_ansi(std::io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
