//! Opening repositories from command-line options: location, backend and secret.

use std::path::Path;
use std::sync::Arc;

use repo_format::{Backend, KeyFile, LocalBackend, Repository, Secret};

use crate::cli::GlobalOpts;
use crate::error::{repo_err, Context, Error, ErrorKind, Result};

/// The environment variable holding the passphrase (restic's habit).
pub const PASSWORD_ENV: &str = "LIFEBOAT_PASSWORD";

/// The repository location from `--repo` / `LIFEBOAT_REPO`, or an explicit override.
pub fn location<'a>(global: &'a GlobalOpts, explicit: Option<&'a str>) -> Result<&'a str> {
    explicit.or(global.repo.as_deref()).ok_or_else(|| {
        Error::new(
            ErrorKind::Usage,
            "no repository given: use --repo or set LIFEBOAT_REPO",
        )
    })
}

/// The storage backend for a location. Today: a local directory.
pub fn backend(location: &str) -> Result<Arc<dyn Backend>> {
    if location.contains("://") {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("repository '{location}': only local directories are supported so far"),
        ));
    }
    Ok(Arc::new(LocalBackend::new(Path::new(location))))
}

/// The secret from `--key-file`, `--password-file` or `LIFEBOAT_PASSWORD`, if any.
pub fn secret(global: &GlobalOpts) -> Result<Option<Secret>> {
    if let Some(path) = &global.key_file {
        return read_key_file(path).map(|k| Some(Secret::KeyFile(k)));
    }
    if let Some(path) = &global.password_file {
        return read_password_file(path).map(|p| Some(Secret::Password(p)));
    }
    match std::env::var(PASSWORD_ENV) {
        Ok(p) if !p.is_empty() => Ok(Some(Secret::Password(p))),
        _ => Ok(None),
    }
}

/// Read a passphrase: the first line of the file, without its line ending.
pub fn read_password_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).ctx(ErrorKind::Key, || {
        format!("cannot read password file '{}'", path.display())
    })?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.is_empty() {
        return Err(Error::new(
            ErrorKind::Key,
            format!("password file '{}' is empty", path.display()),
        ));
    }
    Ok(line)
}

/// Read and parse a key file.
pub fn read_key_file(path: &Path) -> Result<KeyFile> {
    let text = std::fs::read_to_string(path).ctx(ErrorKind::Key, || {
        format!("cannot read key file '{}'", path.display())
    })?;
    KeyFile::parse(&text).map_err(|e| {
        Error::with_source(
            ErrorKind::Key,
            format!("'{}' is not a Lifeboat key file", path.display()),
            e,
        )
    })
}

/// Open the repository named by the global options (blocking: runs the KDF).
pub fn open(global: &GlobalOpts) -> Result<Arc<Repository>> {
    let loc = location(global, None)?;
    let backend = backend(loc)?;
    let secret = secret(global)?;
    let repo = Repository::open(backend, secret.as_ref())
        .map_err(|e| repo_err(e, format!("cannot open repository '{loc}'")))?;
    Ok(Arc::new(repo))
}

/// Open the repository on the blocking pool (the KDF takes a noticeable moment).
pub async fn open_async(global: &GlobalOpts) -> Result<Arc<Repository>> {
    let g = global.clone();
    blocking(move || open(&g)).await
}

/// Run blocking work (repository I/O, KDF, hashing) off the async workers.
pub async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Other, "a worker thread failed", e))?
}
