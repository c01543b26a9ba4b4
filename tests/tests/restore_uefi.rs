//! A UEFI guest (issue 3: the NVRAM is stored with each snapshot; issue 4: restore anywhere):
//! the guest writes a UEFI variable of its own (efivarfs), `lifeboat backup` reads the running VM
//! with its variable store, the domain, its disks and its NVRAM are deleted, and
//! `lifeboat restore --define` brings back a domain whose NVRAM file is byte-identical to the one
//! backed up; it boots through UEFI, its firmware still holds the variable, and the data disk's
//! files are intact.

mod restore_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use guest_quiesce::protocol::{GuestExec, GuestPing};
use guest_quiesce::Agent;
use lifeboat_e2e::{
    acquire_slot, remove_domain, virsh, wait_until, DiskSpec, TestVm, VirshTransport, VmOptions,
    SYSTEM_URI,
};
use restore_common::*;

/// Vendor GUID of the test's UEFI variable.
const GUID: &str = "6c1f4a2e-9b1d-4c37-8a51-2f0e7d3b9c44";

/// Destroys and undefines the restored domain (with its NVRAM) on drop.
struct Restored(String);

impl Drop for Restored {
    fn drop(&mut self) {
        remove_domain(SYSTEM_URI, &self.0);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The text of the first `<tag …>text</tag>` in `xml`.
fn element_text(xml: &str, tag: &str) -> Option<String> {
    let start = xml.find(&format!("<{tag}"))?;
    let rest = &xml[start..];
    let open_end = rest.find('>')?;
    let close = rest.find(&format!("</{tag}>"))?;
    Some(rest.get(open_end + 1..close)?.trim().to_owned())
}

#[test]
fn uefi_vm_nvram_is_backed_up_and_restored_byte_identical() -> Result<()> {
    let s = Scratch::new("restore-uefi")?;
    let data = pseudo_random(300_000, 17);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    // Unique per run, so a stale or template variable store cannot hold it.
    let value = format!("lifeboat-nvram-{}-{nanos}", std::process::id());
    let var = format!("/sys/firmware/efi/efivars/LifeboatTest-{GUID}");
    // efivarfs: 4 bytes of attributes (NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS), then
    // the data.
    let mut var_file = vec![7u8, 0, 0, 0];
    var_file.extend_from_slice(value.as_bytes());

    let (name, snap, backed_up) = {
        let vm = TestVm::create_with(
            "uefi",
            &VmOptions {
                disks: vec![DiskSpec::ext4("vdb", "qcow2", 64)],
                uefi: true,
                ..VmOptions::default()
            },
        )?;
        vm.start()?;
        let boot = vm.wait_agent(Duration::from_secs(240))?;
        eprintln!("restore_uefi: UEFI boot to a responding agent: {boot:.1?}");
        vm.exec_ok("grep -q ' /sys/firmware/efi/efivars efivarfs ' /proc/mounts")
            .context("the guest did not boot through UEFI (no efivarfs)")?;
        vm.write_file("/mnt/vdb/data.bin", &data)?;
        vm.exec_ok("echo uefi guest > /mnt/vdb/hello.txt && sync")?;
        // One write(2) of attributes + data creates the variable (printf writes it at exit).
        vm.exec_ok(&format!(
            "printf '\\007\\000\\000\\000{value}' > {var} && cat {var} >/dev/null"
        ))?;
        ensure!(vm.read_file(&var)? == var_file, "variable reads back wrong");
        let nvram = vm.nvram_path();
        let before = std::fs::read(&nvram).with_context(|| format!("{}", nvram.display()))?;
        ensure!(
            find(&before, value.as_bytes()),
            "OVMF did not write the variable to {}",
            nvram.display()
        );

        let out = s.ok(&["backup", "--json", &vm.name])?;
        let j: serde_json::Value = serde_json::from_str(&out)?;
        ensure!(j["nvram"] == true, "backup stored no NVRAM: {j}");
        ensure!(j["state"] == "running", "{j}");
        // The guest is idle: the variable store did not change while it was read, so this is
        // what the backup read.
        ensure!(
            std::fs::read(&nvram)? == before,
            "the NVRAM changed during the backup"
        );
        (vm.name.clone(), format!("{}@latest", vm.name), before)
        // Dropping the TestVm destroys and undefines the domain (with --nvram) and deletes its
        // directory: disks, NVRAM, console log.
    };
    ensure!(
        !virsh(SYSTEM_URI, &["list", "--all", "--name"])?.contains(&name),
        "original still defined"
    );

    let _slot = acquire_slot(Duration::from_secs(1800))?;
    let to = s.dir.join("restored");
    let out = s.ok(&[
        "restore",
        &snap,
        "--to",
        &to.to_string_lossy(),
        "--define",
        "--json",
    ])?;
    let _restored = Restored(name.clone());
    let j: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(j["domain"]["name"] == name.as_str(), "{j}");
    ensure!(
        j["disks"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["disk"] == "nvram")),
        "no NVRAM restored: {j}"
    );

    let xml = virsh(SYSTEM_URI, &["dumpxml", "--inactive", &name])?;
    let nvram =
        PathBuf::from(element_text(&xml, "nvram").context("no <nvram> in the restored XML")?);
    ensure!(
        nvram.starts_with(&to),
        "NVRAM outside the restore directory: {xml}"
    );
    let restored = std::fs::read(&nvram).with_context(|| format!("{}", nvram.display()))?;
    ensure!(
        restored == backed_up,
        "restored NVRAM {} ({} bytes) differs from the one backed up ({} bytes)",
        nvram.display(),
        restored.len(),
        backed_up.len()
    );

    let t0 = Instant::now();
    virsh(SYSTEM_URI, &["start", &name])?;
    let agent = Agent::new(VirshTransport {
        uri: SYSTEM_URI.to_owned(),
        domain: name.clone(),
    })
    .with_timeout_scale(3.0);
    wait_until(Duration::from_secs(240), Duration::from_millis(250), || {
        Ok(agent
            .call_timeout(&GuestPing, Duration::from_secs(2))
            .is_ok()
            .then_some(()))
    })
    .with_context(|| {
        let log = std::fs::read_to_string(to.join("console.log")).unwrap_or_default();
        format!("restored guest agent; console:\n{log}")
    })?;
    eprintln!(
        "restore_uefi: restored VM boot to a responding agent: {:.1?}",
        t0.elapsed()
    );
    let cat = |p: &str| -> Result<Vec<u8>> {
        let r = agent.exec_request(&GuestExec::new("/bin/cat", &[p]), Duration::from_secs(120))?;
        ensure!(
            r.success(),
            "cat {p}: {:?}",
            String::from_utf8_lossy(&r.stderr)
        );
        Ok(r.stdout)
    };
    // The firmware of the restored VM has the variable: it booted from the restored store.
    ensure!(cat(&var)? == var_file, "the UEFI variable is gone");
    ensure!(cat("/mnt/vdb/data.bin")? == data, "data.bin differs");
    ensure!(cat("/mnt/vdb/hello.txt")? == b"uefi guest\n");
    virsh(SYSTEM_URI, &["destroy", &name])?;
    Ok(())
}
