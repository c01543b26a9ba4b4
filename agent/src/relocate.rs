//! Recreating a backed-up VM on a (possibly different) libvirt host: shared by `restore --define`
//! and `instant-restore`.
//!
//! The snapshot carries the domain's inactive XML (manifest metadata [`DOMAIN_XML_KEY`]). It is
//! rewritten by [`crate::libvirt::rewrite`] (new name, UUID and MACs, disks pointing at the
//! restored files, NVRAM, networks) and defined. Every check that can fail — name taken, XML
//! unusable, restored disk missing from the XML — runs *before* any data is written, through
//! [`prepare`]; [`define`] then defines (and optionally starts) the domain and, if starting fails,
//! undefines it again so that no half-restored domain is left behind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use repo_format::Manifest;

use crate::cli::NetworkArgs;
use crate::error::{Error, ErrorKind, Result};
use crate::libvirt::rewrite::{rewrite_domain_xml, NetworkPolicy, NewDisk, RewriteSpec, Rewritten};
use crate::libvirt::{self, Hypervisor};
use crate::repo::blocking;

pub use crate::commands::backup_image::DOMAIN_XML_KEY;

/// Name of a snapshot entry that holds the UEFI variable store (NVRAM) instead of a disk (what
/// `lifeboat backup` writes; it also records it under the metadata key [`NVRAM_ENTRY_KEY`]).
pub const NVRAM_ENTRY: &str = "nvram";

/// Manifest metadata key naming the NVRAM entry (FORMAT.md, metadata keys).
pub const NVRAM_ENTRY_KEY: &str = "nvram_entry";

/// The name of the snapshot's NVRAM entry: the `nvram_entry` metadata if present, else
/// [`NVRAM_ENTRY`].
pub fn nvram_entry(m: &Manifest) -> &str {
    m.metadata
        .get(NVRAM_ENTRY_KEY)
        .map(String::as_str)
        .unwrap_or(NVRAM_ENTRY)
}

/// The domain XML stored in a snapshot.
pub fn stored_domain_xml(m: &Manifest) -> Result<&str> {
    m.metadata
        .get(DOMAIN_XML_KEY)
        .map(String::as_str)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Usage,
                format!(
                    "snapshot of '{}' carries no domain XML (it was made by backup-image without \
                     --domain-xml): restore the disks without --define, or define the VM by hand",
                    m.name
                ),
            )
        })
}

/// The name for the new domain: `requested` if given, else the original one, else
/// `ORIGINAL-restored-<time>` when the original is taken. A requested name that is taken is an
/// error unless `force` (the caller then replaces that domain).
pub fn choose_name(
    original: &str,
    requested: Option<&str>,
    force: bool,
    exists: impl Fn(&str) -> Result<bool>,
    now: jiff::Timestamp,
) -> Result<String> {
    if let Some(r) = requested {
        if exists(r)? && !force {
            return Err(Error::new(
                ErrorKind::Target,
                format!("a domain named '{r}' exists on the target: use --force to replace it, or another --name"),
            ));
        }
        return Ok(r.to_string());
    }
    if !exists(original)? {
        return Ok(original.to_string());
    }
    let stamp = now.strftime("%Y%m%dT%H%M%S").to_string();
    let mut candidate = format!("{original}-restored-{stamp}");
    let mut n = 2;
    while exists(&candidate)? {
        candidate = format!("{original}-restored-{stamp}-{n}");
        n += 1;
        if n > 100 {
            return Err(Error::new(
                ErrorKind::Target,
                "cannot find a free domain name: use --name",
            ));
        }
    }
    Ok(candidate)
}

/// The network policy from the command line.
pub fn network_policy(n: &NetworkArgs) -> NetworkPolicy {
    if n.no_network {
        NetworkPolicy::Remove
    } else if n.network_map.is_empty() {
        NetworkPolicy::Keep
    } else {
        NetworkPolicy::Remap(n.network_map.iter().cloned().collect())
    }
}

/// Where the new domain's files go, decided once its name is known.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Disk files by target.
    pub disks: BTreeMap<String, NewDisk>,
    /// NVRAM file, if one is restored.
    pub nvram: Option<PathBuf>,
    /// Directory for console logs and sockets with explicit paths.
    pub dir: PathBuf,
}

/// Everything decided before data is written.
#[derive(Debug)]
pub struct Prepared {
    /// libvirt URI.
    pub uri: String,
    /// Final domain name.
    pub name: String,
    /// The rewritten XML (paths as planned).
    pub rewritten: Rewritten,
    /// Whether an existing domain of that name is to be replaced (--force).
    pub replace_existing: bool,
}

/// Connects to `uri`, picks the name and rewrites the XML with the planned disk paths. Fails
/// (before anything is written) if the name is taken without `force`, the XML is unusable or
/// the existing domain to replace is running.
#[allow(clippy::too_many_arguments)]
pub async fn prepare(
    m: &Manifest,
    uri: &str,
    requested_name: Option<&str>,
    force: bool,
    layout: impl FnOnce(&str) -> Layout + Send + 'static,
    network: NetworkPolicy,
) -> Result<Prepared> {
    let xml = stored_domain_xml(m)?.to_string();
    let original = libvirt::parse_domain_xml(&xml)
        .map_err(|e| {
            Error::with_source(ErrorKind::Corrupt, "the stored domain XML is unusable", e)
        })?
        .name;
    let uri = uri.to_string();
    let requested = requested_name.map(str::to_string);
    blocking(move || {
        let hv = Hypervisor::connect(&uri).map_err(|e| {
            Error::with_source(ErrorKind::Target, format!("cannot connect to libvirt at {uri}"), e)
        })?;
        let exists = |n: &str| {
            hv.domain_exists(n).map_err(|e| {
                Error::with_source(ErrorKind::Target, "cannot look up domains on the target", e)
            })
        };
        let name = choose_name(&original, requested.as_deref(), force, exists, jiff::Timestamp::now())?;
        let replace_existing = exists(&name)?;
        if replace_existing {
            let dom = hv.domain(&name).map_err(|e| lv_err(e, "cannot look up the domain to replace"))?;
            if dom.is_active().map_err(|e| lv_err(e, "cannot query the domain to replace"))? {
                return Err(Error::new(
                    ErrorKind::Target,
                    format!("domain '{name}' is running: shut it down before replacing it"),
                ));
            }
        }
        let l = layout(&name);
        let spec = RewriteSpec {
            name: name.clone(),
            disks: l.disks,
            nvram: l.nvram,
            network,
            chardev_dir: Some(l.dir),
        };
        let rewritten = rewrite_domain_xml(&xml, &spec).map_err(|e| {
            Error::with_source(ErrorKind::Corrupt, "cannot rewrite the stored domain XML", e)
        })?;
        for d in &rewritten.dropped_disks {
            tracing::warn!(disk = %d, "the snapshot holds no data for this disk: it is left out of the restored VM");
        }
        for n in &rewritten.unmapped_networks {
            tracing::info!(network = %n, "interface kept on network/bridge '{n}' (use --network {n}=NEW or --no-network if it does not exist here)");
        }
        Ok(Prepared {
            uri,
            name,
            rewritten,
            replace_existing,
        })
    })
    .await
}

fn lv_err(e: libvirt::LibvirtError, what: &str) -> Error {
    Error::with_source(ErrorKind::Target, what.to_string(), e)
}

/// Defines the prepared domain and, with `start`, starts it. On any failure after the define,
/// the new domain is undefined again (and destroyed if it started), so none is left half-made.
///
/// Replacing an existing (shut-off) domain (`--force`): its inactive XML is kept, then it is
/// undefined (its NVRAM file kept) so that the new definition (new UUID) can take the name. If
/// the new definition is refused or does not start, the old XML is defined again: the old
/// domain comes back (without its checkpoint/snapshot metadata, which undefine drops).
pub async fn define(p: &Prepared, start: bool) -> Result<()> {
    define_timed(p, start).await.map(|_| ())
}

/// [`define`], returning how long the define and the start took.
pub async fn define_timed(p: &Prepared, start: bool) -> Result<(Duration, Duration)> {
    let uri = p.uri.clone();
    let name = p.name.clone();
    let xml = p.rewritten.xml.clone();
    let replace = p.replace_existing;
    blocking(move || {
        let hv = Hypervisor::connect(&uri).map_err(|e| lv_err(e, "cannot connect to libvirt"))?;
        let old_xml = if replace {
            let old = hv
                .domain(&name)
                .map_err(|e| lv_err(e, "cannot look up the domain to replace"))?;
            let old_xml = old
                .xml(true)
                .map_err(|e| lv_err(e, &format!("cannot read the definition of '{name}'")))?;
            old.undefine(true)
                .map_err(|e| lv_err(e, &format!("cannot undefine the existing domain '{name}'")))?;
            Some(old_xml)
        } else {
            None
        };
        // Puts the replaced domain back after a failure; says so in the error message.
        let restore_old = |what: String| -> String {
            match &old_xml {
                None => what,
                Some(x) => match hv.define_xml(x) {
                    Ok(_) => format!("{what}; the previous domain '{name}' was defined again"),
                    Err(e) => {
                        tracing::error!(error = %e, "could not define the previous '{name}' again");
                        format!("{what}; the previous domain '{name}' could NOT be defined again ({e})")
                    }
                },
            }
        };
        let t = Instant::now();
        let dom = match hv.define_xml(&xml) {
            Ok(d) => d,
            Err(e) => {
                let msg = restore_old(format!("libvirt refused to define domain '{name}'"));
                return Err(lv_err(e, &msg));
            }
        };
        let defined = t.elapsed();
        if start {
            if let Err(e) = dom.start() {
                let _ = dom.destroy();
                if let Err(u) = dom.undefine(true) {
                    tracing::error!(error = %u, "could not undefine '{name}' after a failed start");
                }
                let msg =
                    restore_old(format!("cannot start domain '{name}' (it was undefined again)"));
                return Err(lv_err(e, &msg));
            }
        }
        Ok((defined, t.elapsed() - defined))
    })
    .await
}

/// Destroys and undefines a domain we defined (cleanup after a later failure).
pub async fn undo_define(uri: &str, name: &str) {
    let uri = uri.to_string();
    let name = name.to_string();
    let _ = blocking(move || {
        let hv = Hypervisor::connect(&uri).map_err(|e| lv_err(e, "connect"))?;
        let dom = hv.domain(&name).map_err(|e| lv_err(e, "lookup"))?;
        let _ = dom.destroy();
        dom.undefine(true).map_err(|e| lv_err(e, "undefine"))
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(list: &'static [&'static str]) -> impl Fn(&str) -> Result<bool> {
        move |n| Ok(list.contains(&n))
    }

    #[test]
    fn names() {
        let now: jiff::Timestamp = "2026-11-25T10:00:00Z".parse().expect("ts");
        assert_eq!(
            choose_name("web", None, false, taken(&[]), now).expect("n"),
            "web"
        );
        assert_eq!(
            choose_name("web", None, false, taken(&["web"]), now).expect("n"),
            "web-restored-20261125T100000"
        );
        assert_eq!(
            choose_name(
                "web",
                None,
                false,
                taken(&["web", "web-restored-20261125T100000"]),
                now
            )
            .expect("n"),
            "web-restored-20261125T100000-2"
        );
        assert_eq!(
            choose_name("web", Some("x"), false, taken(&["web"]), now).expect("n"),
            "x"
        );
        let e = choose_name("web", Some("x"), false, taken(&["x"]), now).expect_err("taken");
        assert_eq!(e.kind(), ErrorKind::Target);
        assert_eq!(
            choose_name("web", Some("x"), true, taken(&["x"]), now).expect("n"),
            "x"
        );
    }
}
