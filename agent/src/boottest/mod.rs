//! Boot tests: prove that a snapshot recovers by booting it in an isolated sandbox, running
//! checks inside the guest, and measuring the recovery time (RTO).
//!
//! The pure parts live here and in the submodules — the YAML [`Policy`], durations, the check
//! commands, console analysis (readiness, kernel panics), the sandbox domain XML ([`xml`]),
//! PPM→PNG ([`image`]) and the HTML report ([`report`]); [`sandbox`] owns everything the test
//! creates (NBD server, overlays, transient domain) and tears it down on every path;
//! `commands::boot_test` drives the run.

pub mod image;
pub mod report;
pub mod sandbox;
pub mod xml;

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, ErrorKind, Result};

/// Bytes of console output kept as evidence.
pub const CONSOLE_TAIL_BYTES: usize = 16 * 1024;
/// Bytes of a check's stdout / stderr kept.
pub const OUTPUT_TAIL_BYTES: usize = 4 * 1024;
/// Default time limit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Prefix of every sandbox domain name.
pub const SANDBOX_PREFIX: &str = "lifeboat-boottest-";

/// A per-VM policy file (YAML):
///
/// ```yaml
/// checks:
///   - systemctl is-active postgresql
///   - test -s /var/lib/app/db
/// ports: [5432]
/// timeout: 10m
/// settle: 2m
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Shell commands run in the guest (`/bin/sh -c`); each must exit 0.
    #[serde(default)]
    pub checks: Vec<String>,
    /// TCP ports that must be listening inside the guest.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Overall time limit (e.g. `10m`).
    #[serde(default)]
    pub timeout: Option<String>,
    /// How long checks are retried after the guest is up (default: until the time limit).
    #[serde(default)]
    pub settle: Option<String>,
}

impl Policy {
    /// Parses a policy from YAML text.
    pub fn parse(text: &str) -> Result<Policy> {
        let p: Policy = serde_norway::from_str(text)
            .map_err(|e| Error::with_source(ErrorKind::Usage, "invalid boot-test policy", e))?;
        for c in &p.checks {
            if c.trim().is_empty() {
                return Err(Error::new(
                    ErrorKind::Usage,
                    "invalid boot-test policy: empty check",
                ));
            }
        }
        if let Some(t) = &p.timeout {
            parse_duration(t)?;
        }
        if let Some(t) = &p.settle {
            parse_duration(t)?;
        }
        Ok(p)
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::with_source(
                ErrorKind::Usage,
                format!("cannot read policy '{}'", path.display()),
                e,
            )
        })?;
        Self::parse(&text).map_err(|e| {
            Error::with_source(
                ErrorKind::Usage,
                format!("policy '{}' is unusable", path.display()),
                e,
            )
        })
    }
}

/// Parses `90`, `90s`, `10m`, `1h30m`, `2h`, `1d` (bare numbers are seconds).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || {
        Error::new(
            ErrorKind::Usage,
            format!("invalid duration {s:?}: use e.g. 90s, 10m, 1h30m"),
        )
    };
    let t = s.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

/// One check to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `/bin/sh -c COMMAND`, passes on exit 0.
    Command(String),
    /// A listening TCP socket on this port.
    Port(u16),
}

impl Check {
    /// Display name.
    pub fn name(&self) -> String {
        match self {
            Check::Command(c) => c.clone(),
            Check::Port(p) => format!("port {p}"),
        }
    }

    /// The shell command that implements it in the guest.
    pub fn shell(&self) -> String {
        match self {
            Check::Command(c) => c.clone(),
            Check::Port(p) => port_check_command(*p),
        }
    }

    /// The stored form.
    pub fn kind(&self) -> repo_format::CheckKind {
        match self {
            Check::Command(c) => repo_format::CheckKind::Command { command: c.clone() },
            Check::Port(p) => repo_format::CheckKind::Port { port: *p },
        }
    }
}

/// A shell command that exits 0 iff a TCP socket listens on `port` in the guest: it reads
/// `/proc/net/tcp` and `/proc/net/tcp6` (present everywhere, unlike `ss`/`netstat`) for a
/// local address ending in the port in upper-case hex with state `0A` (LISTEN).
pub fn port_check_command(port: u16) -> String {
    format!(
        "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | grep -Eq '^ *[0-9]+: [0-9A-F]+:{port:04X} [0-9A-F]+:[0-9A-F]+ 0A '"
    )
}

/// The checks of a run: the policy's, then the command line's (commands before ports).
pub fn merge_checks(policy: &Policy, commands: &[String], ports: &[u16]) -> Vec<Check> {
    let mut out: Vec<Check> = Vec::new();
    for c in policy.checks.iter().chain(commands) {
        let c = Check::Command(c.clone());
        if !out.contains(&c) {
            out.push(c);
        }
    }
    for p in policy.ports.iter().chain(ports) {
        let c = Check::Port(*p);
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// The sandbox domain's name: `lifeboat-boottest-<vm>-<12 hex of the snapshot>-<UTC time>`,
/// with characters outside `[A-Za-z0-9_.-]` of the VM name replaced by `_` and the name cut
/// to 32 characters.
pub fn sandbox_name(vm: &str, snapshot_hex: &str, now: jiff::Timestamp) -> String {
    let vm: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let vm = if vm.is_empty() || vm.starts_with('.') {
        format!("vm{vm}")
    } else {
        vm
    };
    format!(
        "{SANDBOX_PREFIX}{vm}-{}-{}",
        snapshot_hex.get(..12).unwrap_or(snapshot_hex),
        now.strftime("%Y%m%dT%H%M%S")
    )
}

/// The last `max` bytes of `data` as text: lossy UTF-8, ANSI escape sequences and control
/// characters other than newline and tab removed, `\r\n` folded.
pub fn text_tail(data: &[u8], max: usize) -> String {
    let start = data.len().saturating_sub(max);
    let s = String::from_utf8_lossy(data.get(start..).unwrap_or_default());
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: drop the next char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// What the console says about the boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleSignal {
    /// The kernel panicked (the line).
    Panic(String),
    /// A login prompt is the last thing printed.
    LoginPrompt,
    /// Nothing conclusive.
    Nothing,
}

/// Looks at console text for a kernel panic or a trailing login prompt.
pub fn console_signal(text: &str) -> ConsoleSignal {
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Kernel panic - not syncing"))
    {
        return ConsoleSignal::Panic(line.trim().to_string());
    }
    let last = text.trim_end_matches([' ', '\n', '\t']);
    if last
        .lines()
        .last()
        .is_some_and(|l| l.trim_end().ends_with("login:"))
    {
        return ConsoleSignal::LoginPrompt;
    }
    ConsoleSignal::Nothing
}

/// Console-based readiness for guests without an agent: output appeared and then did not change
/// for `quiet` (the boot finished and the guest idles), or a login prompt is showing.
#[derive(Debug, Default)]
pub struct ConsoleWatch {
    last_len: u64,
    last_change: Option<Duration>,
}

impl ConsoleWatch {
    /// Feeds the console size at time `now` (since the start); returns the readiness reason
    /// (`console-login` / `console-quiet`) once reached.
    pub fn observe(
        &mut self,
        now: Duration,
        len: u64,
        signal: &ConsoleSignal,
        quiet: Duration,
    ) -> Option<&'static str> {
        if *signal == ConsoleSignal::LoginPrompt {
            return Some("console-login");
        }
        if len != self.last_len {
            self.last_len = len;
            self.last_change = Some(now);
            return None;
        }
        match self.last_change {
            Some(t) if len > 0 && now.saturating_sub(t) >= quiet => Some("console-quiet"),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        for bad in ["", "m", "10x", "10m5", "-1", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_yaml() {
        let p = Policy::parse(
            "checks:\n  - systemctl is-active postgresql\n  - test -s /var/lib/app/db\nports: [5432]\ntimeout: 10m\n",
        )
        .unwrap();
        assert_eq!(p.checks.len(), 2);
        assert_eq!(p.ports, vec![5432]);
        assert_eq!(p.timeout.as_deref(), Some("10m"));
        assert!(Policy::parse("checks: [\"\"]").is_err());
        assert!(Policy::parse("unknown: 1").is_err());
        assert!(Policy::parse("ports: [70000]").is_err());
        assert!(Policy::parse("timeout: soon").is_err());
        assert_eq!(Policy::parse("{}").unwrap(), Policy::default());
        for f in ["postgres.yaml", "webapp.yaml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../examples/policies")
                .join(f);
            Policy::load(&path).unwrap();
        }
    }

    #[test]
    fn merged_checks_and_port_command() {
        let p = Policy {
            checks: vec!["a".into()],
            ports: vec![22],
            ..Policy::default()
        };
        let c = merge_checks(&p, &["b".into(), "a".into()], &[80, 22]);
        assert_eq!(
            c,
            vec![
                Check::Command("a".into()),
                Check::Command("b".into()),
                Check::Port(22),
                Check::Port(80)
            ]
        );
        assert_eq!(c[3].name(), "port 80");
        assert!(port_check_command(5432).contains(":1538 "));
    }

    #[test]
    fn port_regex_matches_proc_net_tcp() {
        // The pattern, checked with the host's grep against real /proc/net/tcp lines.
        let lines = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:0050 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 20 4 30 10 -1\n";
        let run = |port: u16| {
            let cmd = port_check_command(port).replace(
                "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null",
                &format!("printf '%s' '{lines}'"),
            );
            std::process::Command::new("sh")
                .args(["-c", &cmd])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        assert!(run(5432));
        assert!(!run(80), "port 80 is only an established connection");
        assert!(!run(40000), "a remote port is not a listener");
    }

    #[test]
    fn names() {
        let t: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        assert_eq!(
            sandbox_name("web/1 x", &"ab".repeat(32), t),
            "lifeboat-boottest-web_1_x-abababababab-20260102T030405"
        );
        assert!(sandbox_name("", "abcd", t).starts_with("lifeboat-boottest-vm-abcd-"));
    }

    #[test]
    fn console() {
        let raw = b"\x1b[0;32mOK\x1b[0m boot\r\nKernel panic - not syncing: No working init found.\r\n\x07";
        let t = text_tail(raw, 1024);
        assert_eq!(
            t,
            "OK boot\nKernel panic - not syncing: No working init found.\n"
        );
        assert!(matches!(console_signal(&t), ConsoleSignal::Panic(_)));
        assert_eq!(
            console_signal("Debian 12 host ttyS0\n\nhost login: "),
            ConsoleSignal::LoginPrompt
        );
        assert_eq!(console_signal("booting"), ConsoleSignal::Nothing);
        assert_eq!(text_tail(b"abcdef", 3), "def");
        let q = Duration::from_secs(5);
        let mut w = ConsoleWatch::default();
        let n = ConsoleSignal::Nothing;
        assert_eq!(w.observe(Duration::from_secs(1), 0, &n, q), None);
        assert_eq!(w.observe(Duration::from_secs(10), 0, &n, q), None);
        assert_eq!(w.observe(Duration::from_secs(11), 100, &n, q), None);
        assert_eq!(w.observe(Duration::from_secs(14), 100, &n, q), None);
        assert_eq!(
            w.observe(Duration::from_secs(16), 100, &n, q),
            Some("console-quiet")
        );
        assert_eq!(
            w.observe(Duration::from_secs(17), 200, &ConsoleSignal::LoginPrompt, q),
            Some("console-login")
        );
    }
}
