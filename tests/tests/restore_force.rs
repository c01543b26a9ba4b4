//! `restore --define --force` over an existing (shut-off) domain: a definition libvirt refuses
//! leaves the old domain defined (same UUID); a good one replaces it (new UUID). No guest boots.

mod restore_common;

use std::time::Duration;

use anyhow::{ensure, Result};
use lifeboat_e2e::{remove_domain, virsh, SYSTEM_URI};
use restore_common::*;

const MIB: u64 = 1 << 20;

/// Undefines a test domain on drop.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        remove_domain(SYSTEM_URI, &self.0);
    }
}

#[test]
fn force_keeps_the_old_domain_when_the_new_definition_fails() -> Result<()> {
    let s = Scratch::new("restore-force")?;
    let pid = std::process::id();
    let existing = format!("lbt-rforce-{pid}");
    let _guard = DomainGuard(existing.clone());
    // The domain to be replaced.
    let old_img = s.dir.join("old.raw");
    make_raw(&old_img, 16 * MIB, &[])?;
    let old_xml = s.dir.join("old.xml");
    std::fs::write(
        &old_xml,
        guest_domain_xml(&existing, &s.dir, &[("vda", &old_img, "raw")])?,
    )?;
    virsh(SYSTEM_URI, &["define", &old_xml.to_string_lossy()])?;
    let old_uuid = virsh(SYSTEM_URI, &["domuuid", &existing])?
        .trim()
        .to_owned();

    // Two snapshots: one whose domain XML libvirt refuses (no such emulator), one good.
    let img = s.dir.join("src.raw");
    make_raw(&img, 16 * MIB, &[(0, pseudo_random(MIB as usize, 3))])?;
    let good = guest_domain_xml("lbt-rforce-src", &s.dir, &[("vda", &img, "raw")])?;
    let bad = good.replace(
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
        "<emulator>/nonexistent/qemu-system-x86_64</emulator>",
    );
    ensure!(bad != good, "test XML has no emulator line");
    for (name, xml) in [("bad", &bad), ("good", &good)] {
        let p = s.dir.join(format!("{name}.xml"));
        std::fs::write(&p, xml)?;
        s.ok(&[
            "backup-image",
            &img.to_string_lossy(),
            "--name",
            name,
            "--disk",
            "vda",
            "--domain-xml",
            &p.to_string_lossy(),
        ])?;
    }

    let restore = |snap: &str, dir: &str| {
        s.output(
            &[
                "restore",
                snap,
                "--to",
                &s.dir.join(dir).to_string_lossy(),
                "--define",
                "--name",
                &existing,
                "--force",
                "--no-network",
            ],
            Duration::from_secs(300),
        )
    };
    let out = restore("bad@latest", "to-bad")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the bad definition was accepted");
    ensure!(err.contains("defined again"), "{err}");
    let uuid = virsh(SYSTEM_URI, &["domuuid", &existing])?;
    ensure!(
        uuid.trim() == old_uuid,
        "the old domain is gone or changed after a failed --force: {uuid} vs {old_uuid}\n{err}"
    );

    let out = restore("good@latest", "to-good")?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uuid = virsh(SYSTEM_URI, &["domuuid", &existing])?;
    ensure!(uuid.trim() != old_uuid, "not replaced");
    ensure!(
        virsh(SYSTEM_URI, &["domblklist", &existing])?.contains("to-good"),
        "the replaced domain does not use the restored disk"
    );
    Ok(())
}
