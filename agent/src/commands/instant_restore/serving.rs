//! Serving a snapshot's disks over NBD for a running VM, and the local qcow2 overlays backed by
//! those exports (also used by boot tests' sandboxes).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use repo_format::{Manifest, Repository};
use tokio::sync::watch;
use vmdisk::nbd::{BlockSource, Server, ServerOptions};

use super::StateDisk;
use crate::error::{Context, Error, ErrorKind, Result};
use crate::pipeline::serve::RepoSource;

/// Fewest chunks cached per disk, whatever the budget: QEMU reads a chunk in many small pieces.
const MIN_CACHE_CHUNKS_PER_DISK: usize = 4;

/// The running NBD server: stops (and removes its sockets) when dropped.
pub(crate) struct Serving {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sources: Vec<(String, Arc<RepoSource>)>,
    index_loads: std::sync::Mutex<Vec<tokio::task::JoinHandle<std::result::Result<(), String>>>>,
}

impl Serving {
    /// Waits until every index is loaded; the first failure is a "corrupt" error.
    pub(crate) async fn wait_indexes(&self) -> Result<()> {
        let loads: Vec<_> = match self.index_loads.lock() {
            Ok(mut l) => l.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for l in loads {
            l.await
                .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))?
                .map_err(|e| Error::new(ErrorKind::Corrupt, e))?;
        }
        Ok(())
    }

    /// An index that has already failed to load, if any (does not wait).
    pub(crate) fn index_failure(&self) -> Option<String> {
        self.sources
            .iter()
            .find_map(|(_, s)| s.index_state().and_then(|r| r.err()))
    }

    pub(crate) async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    pub(crate) fn failures(&self) -> Option<String> {
        self.sources.iter().find_map(|(d, s)| {
            let (n, last) = s.failures();
            (n > 0).then(|| {
                format!(
                    "disk {d}: {n} failed reads, last: {}",
                    last.unwrap_or_default()
                )
            })
        })
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Load every index, start serving each disk on its socket (fails if an index cannot be
/// loaded).
pub(crate) async fn serve(
    repo: &Arc<Repository>,
    manifest: &Manifest,
    disks: &[StateDisk],
    cache_chunks: usize,
) -> Result<Serving> {
    let serving = serve_lazy(repo, manifest, disks, cache_chunks).await?;
    serving.wait_indexes().await?;
    Ok(serving)
}

/// Start serving each disk on its socket at once; the indexes (O(disk size)) load in the
/// background and requests that arrive earlier wait for them (see
/// [`RepoSource::lazy`](crate::pipeline::serve::RepoSource::lazy)). Check
/// [`Serving::index_failure`] / [`Serving::wait_indexes`] before relying on the data.
pub(crate) async fn serve_lazy(
    repo: &Arc<Repository>,
    manifest: &Manifest,
    disks: &[StateDisk],
    cache_chunks: usize,
) -> Result<Serving> {
    let (stop, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut sources = Vec::new();
    let mut index_loads = Vec::new();
    // The cache budget is for the whole VM, so memory does not grow with the number of disks.
    let per_disk_cache = (cache_chunks / disks.len().max(1)).max(MIN_CACHE_CHUNKS_PER_DISK);
    for sd in disks {
        let entry = manifest
            .disks
            .iter()
            .find(|d| d.name == sd.target)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!("snapshot has no disk '{}'", sd.target),
                )
            })?;
        let src = Arc::new(RepoSource::lazy(repo.clone(), entry, per_disk_cache));
        let loader = src.clone();
        index_loads.push(tokio::task::spawn_blocking(move || {
            loader.load_index().map(|_| ())
        }));
        let mut exports: HashMap<String, Arc<dyn BlockSource>> = HashMap::new();
        exports.insert(sd.target.clone(), src.clone());
        sources.push((sd.target.clone(), src));
        let server = Arc::new(Server::new(exports, ServerOptions::default()));
        if let Some(dir) = sd.socket.parent() {
            std::fs::create_dir_all(dir).ctx(ErrorKind::Other, || {
                format!("cannot create '{}'", dir.display())
            })?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
        let listener = Server::bind_unix(&sd.socket)
            .map_err(|e| Error::with_source(ErrorKind::Other, "cannot start the NBD server", e))?;
        tasks.push(tokio::spawn(server.serve(
            listener,
            Some(sd.socket.clone()),
            rx.clone(),
        )));
    }
    Ok(Serving {
        stop,
        tasks,
        sources,
        index_loads: std::sync::Mutex::new(index_loads),
    })
}

fn backing_uri(target: &str, socket: &Path) -> String {
    format!("nbd+unix:///{target}?socket={}", socket.display())
}

/// Creates each disk's local qcow2 overlay backed by its NBD export (`disks` and
/// `manifest.disks` in the same order).
pub(crate) async fn create_overlays(manifest: &Manifest, disks: &[StateDisk]) -> Result<()> {
    for (sd, d) in disks.iter().zip(&manifest.disks) {
        let mut opts: Vec<(String, String)> = vec![
            ("backing_file".into(), backing_uri(&sd.target, &sd.socket)),
            ("backing_fmt".into(), "raw".into()),
        ];
        if d.format == "qcow2" {
            if let Some(cs) = d.create_options.get("cluster_size") {
                opts.push(("cluster_size".into(), cs.clone()));
            }
        }
        // -u: do not open the backing (an NBD connection and a probe for nothing: size and
        // backing format are known).
        vmdisk::qemu::create_image_unchecked_backing(&sd.overlay, "qcow2", d.virtual_size, &opts)
            .await
            .ctx(ErrorKind::Target, || {
                format!("cannot create the overlay '{}'", sd.overlay.display())
            })?;
    }
    Ok(())
}
