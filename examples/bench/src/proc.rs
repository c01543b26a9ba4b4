//! Running external commands with a wall-clock time and a peak RSS.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

/// One finished command.
#[derive(Debug, Clone)]
pub struct Run {
    /// Wall-clock seconds.
    pub secs: f64,
    /// Peak resident set size in KiB (the largest of the process tree `/usr/bin/time` waited
    /// for), when measurable.
    pub max_rss_kib: Option<u64>,
    /// CPU seconds (user + system) of the process and the children it waited for (e.g. the
    /// qemu-nbd a backup starts), when measurable.
    pub cpu_secs: Option<f64>,
    /// Standard output.
    pub stdout: Vec<u8>,
}

impl Run {
    /// Standard output parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.stdout).context("command output is not JSON")
    }
}

/// Runs `argv` (through `/usr/bin/time` when present, for the peak RSS) and fails unless it
/// exits 0. `env` is added to the environment.
pub fn run(argv: &[&str], env: &[(&str, &str)], scratch: &Path) -> Result<Run> {
    let Some((prog, args)) = argv.split_first() else {
        bail!("empty command");
    };
    let time_out: PathBuf = scratch.join("time.out");
    let use_time = Path::new("/usr/bin/time").exists();
    let mut cmd = if use_time {
        let mut c = Command::new("/usr/bin/time");
        c.arg("-f")
            .arg("%M %U %S")
            .arg("-o")
            .arg(&time_out)
            .arg(prog);
        c
    } else {
        Command::new(prog)
    };
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", argv.join(" ")))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let (max_rss_kib, cpu_secs) = if use_time {
        parse_time_output(&std::fs::read_to_string(&time_out).unwrap_or_default())
    } else {
        (None, None)
    };
    Ok(Run {
        secs,
        max_rss_kib,
        cpu_secs,
        stdout: out.stdout,
    })
}

/// Parses the last line of `/usr/bin/time -f "%M %U %S"`: peak RSS KiB, user + system seconds.
pub fn parse_time_output(s: &str) -> (Option<u64>, Option<f64>) {
    let Some(line) = s.lines().last() else {
        return (None, None);
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    let rss = f.first().and_then(|x| x.parse().ok());
    let cpu = match (
        f.get(1).and_then(|x| x.parse::<f64>().ok()),
        f.get(2).and_then(|x| x.parse::<f64>().ok()),
    ) {
        (Some(u), Some(s)) => Some(u + s),
        _ => None,
    };
    (rss, cpu)
}

/// CPU seconds (user + system, all threads) this process has used so far, from
/// `/proc/self/stat` (clock ticks, assumed 100 per second as on every Linux build we run).
pub fn self_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, i.e. 12 and 13 after ")".
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs a shell pipeline (`sh -c`), timed like [`run`].
pub fn sh(script: &str, env: &[(&str, &str)], scratch: &Path) -> Result<Run> {
    run(&["sh", "-c", script], env, scratch)
}

/// Whether `tool` is on PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Output of a quick informational command, trimmed; empty on failure.
pub fn capture(argv: &[&str]) -> String {
    let Some((prog, args)) = argv.split_first() else {
        return String::new();
    };
    Command::new(prog)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Apparent disk usage of a directory tree in bytes (`du -sb`), 0 if unknown.
pub fn du_bytes(path: &Path) -> u64 {
    let p = path.to_string_lossy();
    capture(&["du", "-sb", &p])
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
