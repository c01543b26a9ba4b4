//! Interruption: Ctrl-C (SIGINT), SIGTERM and SIGHUP end the running command. The command's future
//! is dropped, which runs every cleanup guard (temporary files, qemu-nbd children, ...).

use tokio::signal::unix::{signal, SignalKind};

/// Resolves with the signal's name when the process is asked to stop.
pub async fn interrupted() -> &'static str {
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        Some(_) = async { match term.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => "SIGTERM",
        Some(_) = async { match hup.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => "SIGHUP",
    }
}
