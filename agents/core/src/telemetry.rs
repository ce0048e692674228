//! Logging through `tracing`, with an env filter (`BATON_LOG`, then `RUST_LOG`, default `info`)
//! and a plain or JSON format.

use tracing_subscriber::{fmt, EnvFilter};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Installs the global subscriber (once; later calls do nothing) and rustls' crypto provider.
pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// As [`init`], with another default level (the CLI keeps its output for people: `warn`).
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    install_crypto_provider();
    let filter = std::env::var("BATON_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default_filter));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// rustls needs its crypto provider installed explicitly when more than one could be used.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
