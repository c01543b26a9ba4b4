//! Progress reporting: counters shared with the pipeline, drawn as a bar only on a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress sink: byte counters plus an optional terminal bar.
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
    done: Arc<AtomicU64>,
}

impl Progress {
    /// A bar on stderr when it is a terminal and `enabled`, otherwise counters only.
    pub fn new(enabled: bool, total: u64, label: &str) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(label.to_string());
            bar
        });
        Progress {
            bar,
            done: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A progress sink that draws nothing.
    pub fn hidden() -> Progress {
        Progress::new(false, 0, "")
    }

    /// Record `n` more bytes processed.
    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// Bytes processed so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Remove the bar from the terminal.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
