//! [`TestVm`]: a libvirt test domain booting the cached test guest, with its own disks under
//! `/var/lib/lifeboat-tests/<name>/`; and [`VirshTransport`], a guest-quiesce transport over
//! `virsh qemu-agent-command`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_quiesce::protocol::GuestExec as GuestExecRequest;
use guest_quiesce::{Agent, ErrorKind as QgaErrorKind, Transport};

use crate::cmd::{run, run_output, virsh, virsh_timeout, wait_until};
use crate::env::{
    ensure_libvirt, set_mode, test_guest, GuestFiles, DOMAIN_PREFIX, SYSTEM_URI, VM_ROOT,
};
use crate::slots::{acquire_slot, GuestSlot};

/// One virtio disk of a [`TestVm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// libvirt target (`vda`, `vdb`, …); also the disk's serial, so the guest mounts it at
    /// `/mnt/<target>` whatever name its kernel gives it.
    pub target: String,
    /// `qcow2` (compat 1.1) or `raw`.
    pub format: String,
    /// Virtual size in MiB.
    pub size_mib: u64,
    /// Format with ext4 on the host (the guest mounts it at `/mnt/<target>`).
    pub ext4: bool,
}

impl DiskSpec {
    /// A disk `target` of `size_mib` MiB in `format`, ext4-formatted.
    pub fn ext4(target: &str, format: &str, size_mib: u64) -> Self {
        DiskSpec {
            target: target.into(),
            format: format.into(),
            size_mib,
            ext4: true,
        }
    }

    /// An unformatted disk.
    pub fn blank(target: &str, format: &str, size_mib: u64) -> Self {
        DiskSpec {
            ext4: false,
            ..DiskSpec::ext4(target, format, size_mib)
        }
    }
}

/// Options of [`TestVm::create_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOptions {
    /// libvirt URI (default `qemu:///system`).
    pub uri: String,
    /// Disks.
    pub disks: Vec<DiskSpec>,
    /// Guest memory in MiB (default 384).
    pub memory_mib: u64,
    /// Also expose a second qemu-ga on a unix socket at [`TestVm::direct_agent_socket`]
    /// (virtio-serial port `org.lifeboat.qga.direct`), for talking to the agent without
    /// libvirt (guest-quiesce's `UnixSocketTransport`).
    pub direct_agent: bool,
    /// Boot through UEFI firmware (`<os firmware='efi'>`: libvirt picks OVMF from package
    /// `ovmf`, no secure boot) instead of SeaBIOS, with the per-VM variable store (NVRAM) at
    /// [`TestVm::nvram_path`], created by libvirt from OVMF's template at the first start. The
    /// kernel and initramfs are still loaded directly (OVMF boots the kernel's EFI stub); the
    /// guest mounts efivarfs at `/sys/firmware/efi/efivars`.
    pub uefi: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            uri: SYSTEM_URI.to_owned(),
            disks: Vec::new(),
            memory_mib: 384,
            direct_agent: false,
            uefi: false,
        }
    }
}

/// Output of [`TestVm::exec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code (128 + signal when killed by a signal).
    pub exit: i32,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

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

/// A test domain: `type='qemu'` (TCG), 384 MiB, 1 vCPU, direct kernel boot of the test guest,
/// serial console logged to `<dir>/console.log`, a libvirt-managed agent channel, virtio disks
/// from [`DiskSpec`]s, no network. Persistent (`virsh define`). Dropping it destroys and
/// undefines the domain and deletes `dir` (set `LIFEBOAT_KEEP_TEST_VMS=1` to keep the files).
///
/// Each test VM holds one of the host's guest slots (see `LIFEBOAT_TEST_MAX_GUESTS`) from
/// creation to drop.
#[derive(Debug)]
pub struct TestVm {
    /// Domain name, `lbt-<prefix>-<pid>-<n>`.
    pub name: String,
    /// `/var/lib/lifeboat-tests/<name>/`: disks, console log, domain XML.
    pub dir: PathBuf,
    /// libvirt URI (`qemu:///system`).
    pub uri: String,
    /// Disks as created.
    pub disks: Vec<DiskSpec>,
    /// Options it was created with.
    pub options: VmOptions,
    /// Kernel and initrd booted.
    pub guest: GuestFiles,
    agent: Agent<VirshTransport>,
    started: Mutex<Option<Instant>>,
    _slot: GuestSlot,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn valid_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl TestVm {
    /// Creates the disks and defines (does not start) a test domain. Blocks while all guest
    /// slots are taken.
    pub fn create(name_prefix: &str, disks: &[DiskSpec]) -> Result<TestVm> {
        Self::create_with(
            name_prefix,
            &VmOptions {
                disks: disks.to_vec(),
                ..VmOptions::default()
            },
        )
    }

    /// Like [`TestVm::create`] on the libvirt at `uri` (e.g. a second host).
    pub fn create_on(uri: &str, name_prefix: &str, disks: &[DiskSpec]) -> Result<TestVm> {
        Self::create_with(
            name_prefix,
            &VmOptions {
                uri: uri.to_owned(),
                disks: disks.to_vec(),
                ..VmOptions::default()
            },
        )
    }

    /// Like [`TestVm::create`] with all options.
    pub fn create_with(name_prefix: &str, options: &VmOptions) -> Result<TestVm> {
        let uri = options.uri.as_str();
        let disks = options.disks.as_slice();
        ensure_libvirt()?;
        let guest = test_guest()?;
        if !valid_name_part(name_prefix) {
            bail!("TestVm name prefix {name_prefix:?}: use [A-Za-z0-9_-]");
        }
        let slot = acquire_slot(Duration::from_secs(1800))?;
        let name = format!(
            "{DOMAIN_PREFIX}{name_prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = PathBuf::from(VM_ROOT).join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        set_mode(&dir, 0o755)?;
        // Another libvirtd (a SecondHost) gets its own copy of the kernel and initramfs: two
        // daemons labelling (chown) one file fight, and the system daemon then refuses to start
        // guests ("Setting different DAC user or group on …vmlinuz which is already in use").
        let guest = if uri == SYSTEM_URI {
            guest
        } else {
            let copy = |from: &Path, name: &str| -> Result<PathBuf> {
                let to = dir.join(name);
                std::fs::copy(from, &to)
                    .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
                set_mode(&to, 0o644)?;
                Ok(to)
            };
            GuestFiles {
                kernel: copy(&guest.kernel, "vmlinuz")?,
                initrd: copy(&guest.initrd, "initrd.img")?,
            }
        };
        let vm = TestVm {
            agent: Agent::new(VirshTransport {
                uri: uri.to_owned(),
                domain: name.clone(),
            })
            .with_timeout_scale(3.0),
            name,
            dir,
            uri: uri.to_owned(),
            disks: disks.to_vec(),
            options: options.clone(),
            guest,
            started: Mutex::new(None),
            _slot: slot,
        };
        // From here on, Drop cleans up on failure.
        for d in disks {
            vm.create_disk(d)?;
        }
        let xml_path = vm.dir.join("domain.xml");
        std::fs::write(&xml_path, vm.domain_xml()?)
            .with_context(|| format!("writing {}", xml_path.display()))?;
        virsh(&vm.uri, &["define", &xml_path.to_string_lossy()])?;
        Ok(vm)
    }

    fn create_disk(&self, d: &DiskSpec) -> Result<()> {
        if !valid_name_part(&d.target) || !d.target.starts_with("vd") {
            bail!("disk target {:?}: use vda, vdb, …", d.target);
        }
        let path = self.disk_path(&d.target);
        let bytes = d.size_mib << 20;
        match (d.format.as_str(), d.ext4) {
            ("raw" | "qcow2", true) => {
                let raw = self.dir.join(format!("{}.raw-tmp", d.target));
                std::fs::File::create(&raw)
                    .and_then(|f| f.set_len(bytes))
                    .with_context(|| format!("creating {}", raw.display()))?;
                run(
                    Command::new("mkfs.ext4")
                        .args(["-q", "-F", "-L", &d.target])
                        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
                        .arg(&raw),
                    Duration::from_secs(120),
                )?;
                if d.format == "raw" {
                    std::fs::rename(&raw, &path)?;
                } else {
                    run(
                        Command::new("qemu-img")
                            .args(["convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1"])
                            .arg(&raw)
                            .arg(&path),
                        Duration::from_secs(120),
                    )?;
                    std::fs::remove_file(&raw)?;
                }
            }
            ("raw" | "qcow2", false) => {
                run(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", &d.format])
                        .args(if d.format == "qcow2" {
                            &["-o", "compat=1.1"][..]
                        } else {
                            &[][..]
                        })
                        .arg(&path)
                        .arg(bytes.to_string()),
                    Duration::from_secs(60),
                )?;
            }
            (f, _) => bail!("disk {}: unsupported format {f:?} (qcow2 or raw)", d.target),
        }
        set_mode(&path, 0o644)
    }

    fn domain_xml(&self) -> Result<String> {
        let esc = |p: &Path| {
            p.to_string_lossy()
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('\'', "&apos;")
        };
        let mut disks = String::new();
        for d in &self.disks {
            disks.push_str(&format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{fmt}' cache='none' discard='unmap'/>\n      <source file='{src}'/>\n      <target dev='{t}' bus='virtio'/>\n      <serial>{t}</serial>\n    </disk>\n",
                fmt = d.format,
                src = esc(&self.disk_path(&d.target)),
                t = d.target,
            ));
        }
        let direct = if self.options.direct_agent {
            format!(
                "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      <target type='virtio' name='org.lifeboat.qga.direct'/>\n    </channel>\n",
                esc(&self.direct_agent_socket())
            )
        } else {
            String::new()
        };
        let (firmware, nvram) = if self.options.uefi {
            (
                " firmware='efi'",
                format!("\n    <nvram>{}</nvram>", esc(&self.nvram_path())),
            )
        } else {
            ("", String::new())
        };
        Ok(format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>1</vcpu>
  <os{firmware}>
    <type arch='x86_64' machine='pc'>hvm</type>{nvram}
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks}    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
{direct}    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
",
            name = self.name,
            mem = self.options.memory_mib,
            kernel = esc(&self.guest.kernel),
            initrd = esc(&self.guest.initrd),
            console = esc(&self.console_path()),
        ))
    }

    /// Creates disk `d` and attaches it to the domain, persistently (`virsh attach-disk
    /// --persistent` when the domain runs, `--config` when shut off), with the target as its
    /// serial. A running guest mounts an ext4 disk at `/mnt/<target>` (the guest's init only
    /// mounts the disks present at boot, so the mount is done here through the agent).
    pub fn attach_disk(&mut self, d: DiskSpec) -> Result<()> {
        if self.disks.iter().any(|x| x.target == d.target) {
            bail!("{}: disk {} exists", self.name, d.target);
        }
        self.disks.push(d.clone());
        self.create_disk(&d)?;
        let path = self.disk_path(&d.target);
        let live = self.is_running()?;
        virsh(
            &self.uri,
            &[
                "attach-disk",
                &self.name,
                &path.to_string_lossy(),
                &d.target,
                "--driver",
                "qemu",
                "--subdriver",
                &d.format,
                "--targetbus",
                "virtio",
                "--serial",
                &d.target,
                "--cache",
                "none",
                if live { "--persistent" } else { "--config" },
            ],
        )?;
        let target = d.target;
        if live && d.ext4 {
            // The guest kernel names the hot-plugged disk as it likes: find it by serial.
            let script = format!(
                "for b in /sys/block/vd*; do [ \"$(cat $b/serial 2>/dev/null)\" = {target} ] && \
                 mkdir -p /mnt/{target} && mount -t ext4 /dev/${{b##*/}} /mnt/{target} && exit 0; done; exit 1"
            );
            wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
                Ok((self.exec(&script)?.exit == 0).then_some(()))
            })
            .with_context(|| format!("{}: hot-plugged {target} not mounted", self.name))?;
        }
        Ok(())
    }

    /// Lifeboat's per-run directories of this domain (`/run/lifeboat/<domain>.<pid>`: NBD
    /// sockets of a backup job) that still exist; empty when every run cleaned up.
    pub fn lifeboat_run_dirs(&self) -> Vec<PathBuf> {
        let prefix = format!("{}.", self.name);
        std::fs::read_dir("/run/lifeboat")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect()
    }

    /// Path of the image of disk `target` (`<dir>/<target>.<format>`).
    pub fn disk_path(&self, target: &str) -> PathBuf {
        let fmt = self
            .disks
            .iter()
            .find(|d| d.target == target)
            .map(|d| d.format.as_str())
            .unwrap_or("img");
        self.dir.join(format!("{target}.{fmt}"))
    }

    /// The UEFI variable store of a [`VmOptions::uefi`] domain (`<dir>/VARS.fd`; exists once
    /// the domain has started).
    pub fn nvram_path(&self) -> PathBuf {
        self.dir.join("VARS.fd")
    }

    /// Unix socket of the direct agent ([`VmOptions::direct_agent`]).
    pub fn direct_agent_socket(&self) -> PathBuf {
        self.dir.join("qga-direct.sock")
    }

    /// Path of the serial console log.
    pub fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The serial console output so far (empty if none yet).
    pub fn console_log(&self) -> String {
        std::fs::read(self.console_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The guest agent client (over `virsh qemu-agent-command`, timeouts ×3 for TCG).
    pub fn agent(&self) -> &Agent<VirshTransport> {
        &self.agent
    }

    /// `virsh start`.
    pub fn start(&self) -> Result<()> {
        if let Ok(mut s) = self.started.lock() {
            *s = Some(Instant::now());
        }
        virsh(&self.uri, &["start", &self.name])?;
        Ok(())
    }

    /// Waits until `guest-ping` answers; returns the time since [`TestVm::start`] (or since
    /// this call, if not started through this object). On timeout the error holds the tail of
    /// the console log.
    pub fn wait_agent(&self, timeout: Duration) -> Result<Duration> {
        let t0 = self
            .started
            .lock()
            .ok()
            .and_then(|s| *s)
            .unwrap_or_else(Instant::now);
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let last = match self
                .agent
                .call_timeout(&guest_quiesce::protocol::GuestPing, Duration::from_secs(2))
            {
                Ok(_) => return Ok(t0.elapsed()),
                Err(e) => e.to_string(),
            };
            if remaining.is_zero() {
                bail!(
                    "{}: guest agent did not answer within {timeout:?} (last error: {last}); console:\n{}",
                    self.name,
                    tail(&self.console_log(), 30)
                );
            }
            if !self.is_running()? {
                bail!(
                    "{}: domain stopped while waiting for the agent; console:\n{}",
                    self.name,
                    tail(&self.console_log(), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs `/bin/sh -c cmd` in the guest (guest-exec with captured output), waiting up to
    /// 120 s.
    pub fn exec(&self, cmd: &str) -> Result<ExecOutput> {
        self.exec_timeout(cmd, Duration::from_secs(120))
    }

    /// Like [`TestVm::exec`] with a timeout.
    pub fn exec_timeout(&self, cmd: &str, timeout: Duration) -> Result<ExecOutput> {
        self.exec_request(&GuestExecRequest::new("/bin/sh", &["-c", cmd]), timeout)
            .with_context(|| format!("{}: exec {cmd:?}", self.name))
    }

    fn exec_request(&self, req: &GuestExecRequest, timeout: Duration) -> Result<ExecOutput> {
        let r = self.agent.exec_request(req, timeout)?;
        Ok(ExecOutput {
            exit: r.exit_code.or(r.signal.map(|s| 128 + s)).unwrap_or(-1),
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// Like [`TestVm::exec`] but fails unless the exit code is 0; returns stdout.
    pub fn exec_ok(&self, cmd: &str) -> Result<String> {
        let out = self.exec(cmd)?;
        if out.exit != 0 {
            bail!(
                "{}: {cmd:?} exited {}: {}{}",
                self.name,
                out.exit,
                out.stderr.trim(),
                out.stdout.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Writes `data` to `path` in the guest (guest-exec `cat` with stdin; in 64 KiB pieces,
    /// since one virsh argument is limited to 128 KiB).
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<()> {
        let mut first = true;
        let mut chunks: Vec<&[u8]> = data.chunks(64 << 10).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let script = if first {
                "cat > \"$1\""
            } else {
                "cat >> \"$1\""
            };
            first = false;
            let req =
                GuestExecRequest::new("/bin/sh", &["-c", script, "sh", path]).with_input(chunk);
            let out = self
                .exec_request(&req, Duration::from_secs(120))
                .with_context(|| format!("{}: writing {path}", self.name))?;
            if out.exit != 0 {
                bail!(
                    "{}: writing {path}: exit {}: {}",
                    self.name,
                    out.exit,
                    out.stderr
                );
            }
        }
        Ok(())
    }

    /// Reads `path` in the guest (guest-exec `cat`; the agent caps output at 16 MiB).
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let req = GuestExecRequest::new("/bin/cat", &[path]);
        let r = self
            .agent
            .exec_request(&req, Duration::from_secs(120))
            .with_context(|| format!("{}: reading {path}", self.name))?;
        if !r.success() || r.truncated {
            bail!(
                "{}: cat {path}: exit {:?}{}: {}",
                self.name,
                r.exit_code,
                if r.truncated { " (truncated)" } else { "" },
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(r.stdout)
    }

    /// `guest-fsfreeze-status`: `"thawed"` or `"frozen"`.
    pub fn fsfreeze_status(&self) -> Result<String> {
        Ok(self.agent.freeze_status()?.as_str().to_owned())
    }

    /// Clean shutdown through the agent (`virsh shutdown --mode agent`: the guest unmounts its
    /// data disks and powers off); waits until the domain is shut off.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        virsh(&self.uri, &["shutdown", "--mode", "agent", &self.name])?;
        wait_until(timeout, Duration::from_millis(200), || {
            Ok((!self.is_running()?).then_some(()))
        })
        .with_context(|| format!("{}: not shut off after {timeout:?}", self.name))
    }

    /// `virsh destroy` (no error when already off).
    pub fn destroy(&self) -> Result<()> {
        if self.is_running()? {
            virsh(&self.uri, &["destroy", &self.name])?;
        }
        Ok(())
    }

    /// True unless the domain is shut off.
    pub fn is_running(&self) -> Result<bool> {
        let st = virsh_timeout(
            &self.uri,
            &["domstate", &self.name],
            Duration::from_secs(30),
        )?;
        Ok(st.trim() != "shut off")
    }

    /// `virsh domstate`.
    pub fn state(&self) -> Result<String> {
        Ok(virsh(&self.uri, &["domstate", &self.name])?
            .trim()
            .to_owned())
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Destroys and undefines domain `name` (with checkpoint/snapshot metadata and NVRAM), ignoring
/// errors.
pub fn remove_domain(uri: &str, name: &str) {
    let _ = virsh_timeout(uri, &["destroy", name], Duration::from_secs(30));
    let full = virsh_timeout(
        uri,
        &[
            "undefine",
            "--checkpoints-metadata",
            "--snapshots-metadata",
            "--nvram",
            name,
        ],
        Duration::from_secs(30),
    );
    if full.is_err() {
        let _ = virsh_timeout(uri, &["undefine", name], Duration::from_secs(30));
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "lifeboat-e2e: {} console (last 40 lines):\n{}",
                self.name,
                tail(&self.console_log(), 40)
            );
        }
        remove_domain(&self.uri, &self.name);
        if std::env::var_os("LIFEBOAT_KEEP_TEST_VMS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("lifeboat-e2e: keeping {}", self.dir.display());
        }
    }
}
