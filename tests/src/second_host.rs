//! [`SecondHost`]: a second, independent libvirtd on this machine, for restore-elsewhere and
//! migration-like tests. It runs in its own mount namespace (`unshare --mount`) with private
//! bind mounts over `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt` and
//! `/var/cache/libvirt`, so its domains, state and sockets are its own; its client socket lives
//! outside those mounts, in `/var/lib/lifeboat-tests/host2-<pid>-<n>/sock/`, and [`SecondHost::uri`]
//! points there. `/var/lib/lifeboat-tests` and `/var/cache/lifeboat-tests` are shared, so test
//! disks and the test guest work on both hosts. It does not use virtlogd (`stdio_handler =
//! "file"`) and does not remember file owners; its guests boot their own copy of the kernel and
//! initramfs, because two daemons relabelling one shared file break each other's DAC labels.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cmd::{run, run_output, virsh_timeout, wait_until};
use crate::env::{ensure_libvirt, set_mode, VM_ROOT};

/// A private libvirtd; stopped (with all its domains destroyed) on drop.
#[derive(Debug)]
pub struct SecondHost {
    /// libvirt URI of this daemon (`qemu:///system?socket=…`).
    pub uri: String,
    /// Its directory (configuration, state, logs, socket).
    pub dir: PathBuf,
    child: Child,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

const PRIVATE: &[(&str, &str)] = &[
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

impl SecondHost {
    /// Starts the daemon and waits (up to 60 s) until `virsh -c URI version` answers.
    pub fn start() -> Result<SecondHost> {
        ensure_libvirt()?;
        let dir = PathBuf::from(VM_ROOT).join(format!(
            "host2-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        for sub in ["etc", "run", "lib", "log", "cache", "sock"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        set_mode(&dir, 0o755)?;
        prepare_config(&dir.join("etc"))?;
        for (sub, _) in PRIVATE {
            set_mode(&dir.join(sub), 0o755)?;
        }
        // /var/lib/libvirt/qemu must exist and belong to the qemu user for channel sockets.
        for d in [
            "lib/qemu",
            "lib/qemu/channel",
            "lib/qemu/channel/target",
            "cache/qemu",
        ] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let _ = run(
            Command::new("chown")
                .arg("-R")
                .arg("libvirt-qemu:kvm")
                .arg(dir.join("lib/qemu"))
                .arg(dir.join("cache/qemu")),
            Duration::from_secs(30),
        );

        let uri = format!(
            "qemu:///system?socket={}",
            dir.join("sock/libvirt-sock").display()
        );
        let child = spawn_daemon(&dir)?;
        let mut host = SecondHost { uri, dir, child };
        host.wait_ready()?;
        Ok(host)
    }

    /// Restarts the daemon as `systemctl restart libvirtd` would: SIGTERM (running domains
    /// keep running), wait until it has exited (up to 30 s), start it again on the same
    /// configuration and state, and wait until it answers. The running domains are reconnected
    /// by the new daemon.
    pub fn restart(&mut self) -> Result<()> {
        self.stop_daemon(Duration::from_secs(30))?;
        self.child = spawn_daemon(&self.dir)?;
        self.wait_ready()
    }

    /// SIGTERM to the daemon; SIGKILL if it has not exited within `grace`.
    fn stop_daemon(&mut self, grace: Duration) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.child.id().to_string();
        run_output(
            Command::new("kill").args(["-TERM", &pid]),
            Duration::from_secs(5),
        )?;
        let stopped = wait_until(grace, Duration::from_millis(100), || {
            Ok(self.child.try_wait()?.map(|_| ()))
        });
        if stopped.is_err() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }

    /// Waits (up to 60 s) until `virsh -c URI version` answers; on failure the error holds
    /// the daemon's stderr and the tail of its log.
    fn wait_ready(&mut self) -> Result<()> {
        let ready = wait_until(Duration::from_secs(60), Duration::from_millis(200), || {
            if let Some(st) = self.child.try_wait()? {
                bail!("second libvirtd exited ({st})");
            }
            let out = run_output(
                Command::new("virsh").args(["-c", &self.uri, "version"]),
                Duration::from_secs(10),
            )?;
            Ok(out.status.success().then_some(()))
        });
        if let Err(e) = ready {
            let stderr =
                std::fs::read_to_string(self.dir.join("libvirtd.stderr")).unwrap_or_default();
            let log =
                std::fs::read_to_string(self.dir.join("log/libvirtd.log")).unwrap_or_default();
            bail!(
                "second libvirtd did not start: {e:#}\nstderr:\n{stderr}\nlog (tail):\n{}",
                log.lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(())
    }

    /// `virsh -c <this host> ARGS…` (60 s timeout).
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        virsh_timeout(&self.uri, args, Duration::from_secs(60))
    }
}

/// Starts `libvirtd` in a new mount namespace with `dir`'s private bind mounts; its stderr is
/// appended to `dir/libvirtd.stderr`.
fn spawn_daemon(dir: &Path) -> Result<Child> {
    let mut script = String::from("set -e\n");
    for (sub, target) in PRIVATE {
        script.push_str(&format!(
            "mkdir -p {target}\nmount --bind '{}' {target}\n",
            dir.join(sub).display()
        ));
    }
    script.push_str(&format!(
        "exec libvirtd -f '{}' -p '{}'\n",
        dir.join("etc/libvirtd.conf").display(),
        dir.join("libvirtd.pid").display()
    ));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("libvirtd.stderr"))?;
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning unshare … libvirtd (util-linux; run scripts/install-deps.sh)")
}

/// Private copy of the libvirt configuration: the host's `*.conf` files (no domain or network
/// definitions), with our socket directory, a file log and no virtlogd.
fn prepare_config(etc: &Path) -> Result<()> {
    for e in std::fs::read_dir("/etc/libvirt").context("reading /etc/libvirt")? {
        let e = e?;
        let name = e.file_name();
        if e.file_type()?.is_file() && name.to_string_lossy().ends_with(".conf") {
            std::fs::copy(e.path(), etc.join(&name))?;
        }
    }
    for d in [
        "qemu/networks/autostart",
        "qemu/autostart",
        "nwfilter",
        "secrets",
        "hooks",
        "storage",
    ] {
        std::fs::create_dir_all(etc.join(d))?;
    }
    let sock_dir = etc
        .parent()
        .context("config dir has no parent")?
        .join("sock");
    let mut libvirtd = std::fs::read_to_string(etc.join("libvirtd.conf")).unwrap_or_default();
    libvirtd.push_str(&format!(
        "\n# lifeboat-e2e second host\nunix_sock_dir = \"{}\"\nlog_outputs = \"3:file:/var/log/libvirt/libvirtd.log\"\n",
        sock_dir.display()
    ));
    std::fs::write(etc.join("libvirtd.conf"), libvirtd)?;
    let mut qemu = std::fs::read_to_string(etc.join("qemu.conf")).unwrap_or_default();
    qemu.push_str("\n# lifeboat-e2e second host\nstdio_handler = \"file\"\nremember_owner = 0\n");
    std::fs::write(etc.join("qemu.conf"), qemu)?;
    Ok(())
}

impl Drop for SecondHost {
    fn drop(&mut self) {
        if let Ok(list) = self.virsh(&["list", "--all", "--name"]) {
            for name in list.lines().map(str::trim).filter(|n| !n.is_empty()) {
                crate::vm::remove_domain(&self.uri, name);
            }
        }
        if self.stop_daemon(Duration::from_secs(15)).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::env::var_os("LIFEBOAT_KEEP_TEST_VMS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
