//! Running external commands with a wall-clock time and a peak RSS.

use std::io::Read as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// Process groups of the commands running now ([`Timed`]), signalled on an interrupt.
static GROUPS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Set once SIGINT/SIGTERM/SIGHUP arrived: no new command starts.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// On SIGINT, SIGTERM or SIGHUP: send SIGTERM to every running command's process group (they
/// run in their own groups, so a terminal's Ctrl-C does not reach them) and refuse to start new
/// ones. The failing commands then unwind the harness through its drop guards, which remove
/// domains, jobs and files; `lifeboat` itself ends a backup job and thaws on SIGTERM.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("lifeboat-bench: interrupted; stopping the running commands and cleaning up");
        INTERRUPTED.store(true, Ordering::SeqCst);
        let groups = GROUPS.lock().map(|g| g.clone()).unwrap_or_default();
        for pid in groups {
            signal_group(pid, "-TERM");
        }
    })
    .context("cannot install the SIGINT/SIGTERM handler")
}

/// Fails once the harness was interrupted.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn signal_group(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

/// Longest any single measured command may take before [`run`] kills it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Runs `argv` (through `/usr/bin/time` when present, for the peak RSS) and fails unless it
/// exits 0. `env` is added to the environment. Killed after [`DEFAULT_TIMEOUT`].
pub fn run(argv: &[&str], env: &[(&str, &str)], scratch: &Path) -> Result<Run> {
    run_timeout(argv, env, scratch, DEFAULT_TIMEOUT)
}

/// Like [`run`], killing the command (and everything it started) after `timeout`.
pub fn run_timeout(
    argv: &[&str],
    env: &[(&str, &str)],
    scratch: &Path,
    timeout: Duration,
) -> Result<Run> {
    let time_out: PathBuf = scratch.join("time.out");
    let mut child = Timed::spawn(argv, env, &time_out, Stdio::piped())?;
    let mut so = child.child.stdout.take().context("stdout pipe")?;
    let mut se = child.child.stderr.take().context("stderr pipe")?;
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = child.wait_timeout(timeout);
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    let status = status.with_context(|| {
        format!(
            "`{}`: {}",
            argv.join(" "),
            String::from_utf8_lossy(&stderr).trim()
        )
    })?;
    let secs = child.start.elapsed().as_secs_f64();
    if !status.success() {
        bail!(
            "`{}` failed ({}):\n{}",
            argv.join(" "),
            status,
            String::from_utf8_lossy(&stderr)
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
    let (max_rss_kib, cpu_secs) = child.usage();
    Ok(Run {
        secs,
        max_rss_kib,
        cpu_secs,
        stdout,
    })
}

/// A command started in its own process group, through `/usr/bin/time` when present. Dropping
/// it while the command still runs kills the whole group.
pub struct Timed {
    /// The process (`/usr/bin/time` or the command itself).
    pub child: Child,
    /// When it was started.
    pub start: Instant,
    time_out: Option<PathBuf>,
    done: bool,
}

impl Timed {
    /// Starts `argv` with stdin closed, stderr piped and stdout as given; `/usr/bin/time`
    /// writes its figures to `time_out`.
    pub fn spawn(
        argv: &[&str],
        env: &[(&str, &str)],
        time_out: &Path,
        stdout: Stdio,
    ) -> Result<Timed> {
        let Some((prog, args)) = argv.split_first() else {
            bail!("empty command");
        };
        check_interrupted()?;
        let use_time = Path::new("/usr/bin/time").exists();
        let mut cmd = if use_time {
            let _ = std::fs::remove_file(time_out);
            let mut c = Command::new("/usr/bin/time");
            c.arg("-f")
                .arg("%M %U %S")
                .arg("-o")
                .arg(time_out)
                .arg(prog);
            c
        } else {
            Command::new(prog)
        };
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .process_group(0);
        let start = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", argv.join(" ")))?;
        if let Ok(mut g) = GROUPS.lock() {
            g.push(child.id());
        }
        Ok(Timed {
            child,
            start,
            time_out: use_time.then(|| time_out.to_path_buf()),
            done: false,
        })
    }

    /// Exit status if the command has finished.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let st = self.child.try_wait().context("waiting for a command")?;
        if st.is_some() {
            self.reaped();
        }
        Ok(st)
    }

    fn reaped(&mut self) {
        self.done = true;
        let id = self.child.id();
        if let Ok(mut g) = GROUPS.lock() {
            g.retain(|&p| p != id);
        }
    }

    /// Waits for the command; kills its process group and fails after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!("timed out after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process group (the command and what it started) and reaps the process.
    pub fn kill(&mut self) {
        if self.done {
            return;
        }
        signal_group(self.child.id(), "-KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.reaped();
    }

    /// Peak RSS (KiB) and CPU seconds from `/usr/bin/time`, once finished.
    pub fn usage(&self) -> (Option<u64>, Option<f64>) {
        match &self.time_out {
            Some(p) => parse_time_output(&std::fs::read_to_string(p).unwrap_or_default()),
            None => (None, None),
        }
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.kill();
    }
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

/// Reads every file under `path` once, so that it is in the page cache (untimed): Lifeboat
/// writes chunk objects with direct I/O, so a restore or verify right after a backup would
/// otherwise read the repository from the device while `qemu-img convert` (the restore
/// ceiling) reads its image from the page cache and the CPU ceilings work on memory.
pub fn warm_tree(path: &Path) -> Result<()> {
    let mut dirs = vec![path.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                dirs.push(entry.path());
            } else {
                std::io::copy(
                    &mut std::fs::File::open(entry.path())?,
                    &mut std::io::sink(),
                )?;
            }
        }
    }
    Ok(())
}

/// Whether this (virtual) machine returns freed memory to its host (free page reporting, as a
/// virtio balloon does): then memory the page cache grows into costs a host fault per page
/// (measured: `dd` of 1.2 GiB into the page cache 390 MB/s into free memory, 1.9 GB/s into
/// memory freed a moment before), and any writer through the page cache runs at a speed that
/// depends on what was deleted just before it. `None` where it does not.
pub fn memory_note() -> Option<String> {
    // A virtio balloon device that offers free page reporting (feature bit 5,
    // VIRTIO_BALLOON_F_REPORTING; the `features` file lists bit 0 first).
    let balloon = std::fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("features")).ok())
        .any(|f| f.as_bytes().get(5) == Some(&b'1'));
    // Some kernels also count what they reported.
    let reported = std::fs::read_to_string("/sys/module/page_reporting/parameters/reported_kib")
        .ok()
        .and_then(|k| k.trim().parse::<u64>().ok())
        .filter(|k| *k > 0);
    if !balloon && reported.is_none() {
        return None;
    }
    Some(format!(
        "free page reporting on{}: freed memory goes back to the host, and page-cache growth \
         into it costs host faults",
        reported
            .map(|k| format!(" ({:.0} GiB returned so far)", k as f64 / 1048576.0))
            .unwrap_or_default()
    ))
}

/// The device and filesystem holding `dir`, e.g. "/dev/vda (ext4 without a journal, rotational
/// per the kernel)". Whether an ext4 has a journal matters: without one, every new file scans
/// past the inodes freed in the last one to six minutes (docs/BENCHMARKS.md, "What limits").
pub fn describe_work_fs(dir: &std::path::Path) -> String {
    capture(&[
        "sh",
        "-c",
        "p=$1; set -- $(findmnt -no SOURCE,FSTYPE -T \"$p\" | head -1); \
         rota=$(lsblk -dno ROTA \"$1\" 2>/dev/null | tr -d ' '); \
         case $rota in 0) r='non-rotational';; 1) r='rotational per the kernel';; *) r='?';; esac; \
         j=''; if [ \"$2\" = ext4 ]; then \
           k=$(basename \"$(readlink -f \"$1\")\"); \
           if ls /proc/fs/jbd2 2>/dev/null | grep -q \"^$k-\"; then j=' with a journal'; \
           else j=' without a journal'; fi; fi; \
         echo \"$1 ($2$j, $r)\"",
        "sh",
        &dir.to_string_lossy(),
    ])
}

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_captures_output_and_fails_on_nonzero_exit() -> Result<()> {
        let dir = std::env::temp_dir();
        let r = run(&["sh", "-c", "echo hi; echo err >&2"], &[], &dir)?;
        assert_eq!(r.stdout, b"hi\n");
        let e = run(&["sh", "-c", "echo boom >&2; exit 3"], &[], &dir)
            .err()
            .map(|e| format!("{e:#}"))
            .unwrap_or_default();
        assert!(e.contains("boom"), "{e}");
        Ok(())
    }

    #[test]
    fn run_timeout_kills_the_command_and_what_it_started() -> Result<()> {
        let dir = std::env::temp_dir();
        let marker = dir.join(format!("lifeboat-bench-timeout-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        let m = marker.to_string_lossy().into_owned();
        let t = Instant::now();
        // A grandchild that would create the marker after 2 s unless killed with the group.
        let script = format!("(sleep 2; touch {m}) & sleep 30");
        let r = run_timeout(
            &["sh", "-c", &script],
            &[],
            &dir,
            Duration::from_millis(300),
        );
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        std::thread::sleep(Duration::from_secs(3));
        assert!(!marker.exists(), "the grandchild survived the timeout");
        Ok(())
    }
}
