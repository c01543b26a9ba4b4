//! Structured logs (tracing) on stderr. `LIFEBOAT_LOG` (an env-filter directive) overrides `-v`.

use tracing_subscriber::EnvFilter;

/// Install the global subscriber: warnings by default, more with each `-v`; JSON lines with `--json`.
pub fn init(verbose: u8, json: bool) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter =
        EnvFilter::try_from_env("LIFEBOAT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
