//! Shared by the restore / instant-restore tests: the `lifeboat` binary, a scratch repository,
//! disk images and domain XML for the test guest.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Result};
use lifeboat_e2e::{run, run_output, test_guest, VM_ROOT};

pub use lifeboat_e2e::lifeboat_bin;

/// A scratch directory under VM_ROOT, removed on drop (unless LIFEBOAT_KEEP_TEST_VMS).
pub struct Scratch {
    pub dir: PathBuf,
    pub repo: PathBuf,
    pub bin: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Result<Scratch> {
        let dir = PathBuf::from(VM_ROOT).join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        set_mode(&dir, 0o755)?;
        let s = Scratch {
            repo: dir.join("repo"),
            dir,
            bin: lifeboat_bin()?,
        };
        s.ok(&["repo", "init", "--chunk-size", "256K"])?;
        Ok(s)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("LIFEBOAT_REPO", &self.repo)
            .env("LIFEBOAT_PASSWORD", "test passphrase")
            .env_remove("LIFEBOAT_PASSWORD_FILE")
            .env_remove("LIFEBOAT_KEY_FILE");
        c
    }

    pub fn output(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        run_output(&mut self.cmd(args), timeout)
    }

    /// Runs lifeboat, fails unless it exits 0; returns stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.output(args, Duration::from_secs(600))?;
        if !out.status.success() {
            bail!(
                "lifeboat {args:?} failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("LIFEBOAT_KEEP_TEST_VMS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Domain XML for the test guest (like `TestVm`'s), with the given disks (target, path, format).
pub fn guest_domain_xml(name: &str, dir: &Path, disks: &[(&str, &Path, &str)]) -> Result<String> {
    let g = test_guest()?;
    // The test's own copy of kernel and initramfs: restore_host boots this domain on a second
    // libvirtd, and two daemons labelling (chown) the shared cached files make the system daemon
    // refuse other tests' guests ("Setting different DAC user or group … already in use").
    let copy = |from: &Path, name: &str| -> Result<PathBuf> {
        let to = dir.join(name);
        if !to.exists() {
            std::fs::copy(from, &to)?;
            set_mode(&to, 0o644)?;
        }
        Ok(to)
    };
    let kernel = copy(&g.kernel, "vmlinuz")?;
    let initrd = copy(&g.initrd, "initrd.img")?;
    let mut d = String::new();
    for (t, p, f) in disks {
        d.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{f}' cache='none'/>\n      <source file='{}'/>\n      <target dev='{t}' bus='virtio'/>\n      <serial>{t}</serial>\n    </disk>\n",
            p.display()
        ));
    }
    Ok(format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <uuid>6f1e2d3c-0000-4000-8000-{:012x}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{}</kernel>
    <initrd>{}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{d}    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{}/console.log'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <interface type='network'>
      <mac address='52:54:00:12:34:56'/>
      <source network='lifeboat-missing-net'/>
      <model type='virtio'/>
    </interface>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
",
        std::process::id(),
        kernel.display(),
        initrd.display(),
        dir.display()
    ))
}

/// A raw image of `size` bytes with `data` written at each offset (sparse elsewhere).
pub fn make_raw(path: &Path, size: u64, data: &[(u64, Vec<u8>)]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    for (off, d) in data {
        f.write_all_at(d, *off)?;
    }
    f.sync_all()?;
    set_mode(path, 0o644)
}

pub fn qemu_img(args: &[&str]) -> Result<String> {
    run(
        Command::new("qemu-img").args(args),
        Duration::from_secs(600),
    )
}
