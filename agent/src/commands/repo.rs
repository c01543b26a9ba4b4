//! `lifeboat repo init | add-key | generate-key-file`.

use std::io::Write;

use repo_format::{Cipher, Encryption, InitOptions, KdfParams, KeyFile, Repository, Secret};
use serde_json::json;

use super::emit;
use crate::cli::{AddKeyArgs, CipherArg, EncryptionArg, GenerateKeyFileArgs, GlobalOpts, InitArgs};
use crate::error::{repo_err, Context, Error, ErrorKind, Result};
use crate::repo::{self, blocking};

/// `lifeboat repo init [LOCATION]`
pub async fn init(global: &GlobalOpts, args: InitArgs) -> Result<()> {
    let loc = repo::location(global, args.location.as_deref())?.to_string();
    let chunk_size = u32::try_from(args.chunk_size).map_err(|_| {
        Error::new(
            ErrorKind::Usage,
            format!("chunk size {} is too large", args.chunk_size),
        )
    })?;
    // 0 (or a frame not smaller than the chunk) means unframed chunk objects.
    let frame_size = match u32::try_from(args.frame_size) {
        Ok(0) => None,
        Ok(f) => Some(f).filter(|f| *f < chunk_size),
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Usage,
                format!("frame size {} is too large", args.frame_size),
            ))
        }
    };
    let encryption = match args.encryption {
        EncryptionArg::None => Encryption::None,
        EncryptionArg::Repokey => {
            let secret = repo::secret(global)?.ok_or_else(|| {
                Error::new(
                    ErrorKind::Key,
                    "an encrypted repository needs a passphrase or key file: set LIFEBOAT_PASSWORD, \
                     or use --password-file or --key-file (or --encryption none, not recommended)",
                )
            })?;
            Encryption::Encrypted {
                secret,
                kdf: KdfParams::default(),
            }
        }
    };
    let backend = repo::backend(&loc)?;
    let loc2 = loc.clone();
    let repo = blocking(move || {
        Repository::init(
            backend,
            InitOptions {
                encryption,
                chunk_size,
                zstd_level: args.zstd_level,
                frame_size,
                cipher: match args.cipher {
                    CipherArg::Auto => Cipher::preferred(),
                    CipherArg::Aegis256 => Cipher::Aegis256,
                    CipherArg::Xchacha20poly1305 => Cipher::XChaCha20Poly1305,
                },
            },
        )
        .map_err(|e| repo_err(e, format!("cannot create a repository at '{loc2}'")))
    })
    .await?;
    let id = repo.id().to_string();
    emit(
        global,
        &json!({ "repository": loc, "id": id, "chunk_size": chunk_size,
                 "frame_size": repo.frame_size(), "encrypted": repo.is_encrypted(),
                 "encryption": repo.config().encryption,
                 "format_version": repo.config().version }),
        &format!(
            "created {} repository {id} at {loc} (format version {}, chunk size {}{})",
            match repo.config().encryption.cipher() {
                Some(Cipher::Aegis256) => "encrypted (AEGIS-256)",
                Some(Cipher::XChaCha20Poly1305) => "encrypted (XChaCha20-Poly1305)",
                None => "UNENCRYPTED",
            },
            repo.config().version,
            super::human_bytes(u64::from(chunk_size)),
            match repo.frame_size() {
                Some(f) => format!(", frames of {}", super::human_bytes(u64::from(f))),
                None => ", unframed".to_string(),
            }
        ),
    );
    Ok(())
}

/// `lifeboat repo add-key`
pub async fn add_key(global: &GlobalOpts, args: AddKeyArgs) -> Result<()> {
    let new_secret = if let Some(p) = &args.new_key_file {
        Secret::KeyFile(repo::read_key_file(p)?)
    } else if let Some(p) = &args.new_password_file {
        Secret::Password(repo::read_password_file(p)?)
    } else {
        return Err(Error::new(
            ErrorKind::Usage,
            "say what to add: --new-key-file FILE or --new-password-file FILE",
        ));
    };
    let g_repo = global.repo.clone();
    let opened = repo::open_async(global).await?;
    let label = args.label.clone();
    let slot = blocking(move || {
        opened
            .add_key(&new_secret, KdfParams::default(), &label)
            .map_err(|e| repo_err(e, "cannot add the key slot"))
    })
    .await?;
    emit(
        global,
        &json!({ "repository": g_repo, "key_slot": slot.to_string() }),
        &format!("added key slot {slot}"),
    );
    Ok(())
}

/// `lifeboat repo generate-key-file PATH`
pub fn generate_key_file(global: &GlobalOpts, args: GenerateKeyFileArgs) -> Result<()> {
    let text = KeyFile::generate();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&args.path).ctx(ErrorKind::Usage, || {
        format!("cannot create key file '{}'", args.path.display())
    })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .ctx(ErrorKind::Other, || {
            format!("cannot write key file '{}'", args.path.display())
        })?;
    emit(
        global,
        &json!({ "key_file": args.path }),
        &format!(
            "wrote key file {} — keep a copy off this host: without it (or a passphrase slot) the backups cannot be read",
            args.path.display()
        ),
    );
    Ok(())
}
