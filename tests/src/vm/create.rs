//! Creating a [`TestVm`]: its disks and domain XML, `virsh define`, and hot-plugged disks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use guest_quiesce::Agent;

use crate::cmd::{run, virsh, wait_until};
use crate::env::{
    ensure_libvirt, set_mode, test_guest, GuestFiles, DOMAIN_PREFIX, SYSTEM_URI, VM_ROOT,
};
use crate::slots::acquire_slot;

use super::{DiskSpec, TestVm, VirshTransport, VmOptions};

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
}
