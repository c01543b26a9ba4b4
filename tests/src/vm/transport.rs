//! [`VirshTransport`]: a guest-quiesce transport over `virsh qemu-agent-command`.

use std::process::Command;
use std::time::Duration;

use guest_quiesce::{ErrorKind as QgaErrorKind, Transport};

use crate::cmd::run_output;

/// A guest-quiesce [`Transport`] running `virsh -c URI qemu-agent-command --timeout N DOM JSON`
/// (libvirt does the guest-sync itself).
#[derive(Debug, Clone)]
pub struct VirshTransport {
    /// libvirt URI.
    pub uri: String,
    /// Domain name.
    pub domain: String,
}

impl Transport for VirshTransport {
    fn execute(&self, request_json: &str, timeout: Duration) -> guest_quiesce::Result<String> {
        let secs = timeout.as_secs_f64().ceil().max(1.0) as u64;
        let out = run_output(
            Command::new("virsh")
                .args(["-q", "-c", &self.uri, "qemu-agent-command", "--timeout"])
                .arg(secs.to_string())
                .arg(&self.domain)
                .arg(request_json),
            timeout + Duration::from_secs(15),
        )
        .map_err(|e| {
            let kind = if format!("{e}").contains("timed out") {
                QgaErrorKind::Timeout
            } else {
                QgaErrorKind::Io
            };
            guest_quiesce::Error::with_source(kind, "running virsh qemu-agent-command", e)
        })?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let lower = stderr.to_lowercase();
        // libvirt keeps the agent's description but drops its error class.
        let marker = "unable to execute qemu agent command";
        let kind = if lower.contains("not responding") || lower.contains("not connected") {
            QgaErrorKind::NotResponding
        } else if lower.contains("timed out") || lower.contains("timeout") {
            QgaErrorKind::Timeout
        } else if lower.contains(marker) {
            let desc = stderr
                .split_once("': ")
                .map(|(_, d)| d.to_owned())
                .unwrap_or_else(|| stderr.clone());
            QgaErrorKind::AgentError {
                class: "GenericError".into(),
                desc,
            }
        } else if lower.contains("domain is not running") {
            QgaErrorKind::NotResponding
        } else {
            QgaErrorKind::Io
        };
        Err(guest_quiesce::Error::new(
            kind,
            format!("virsh qemu-agent-command {}: {stderr}", self.domain),
        ))
    }
}
