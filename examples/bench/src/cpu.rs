//! In-process CPU ceilings, measured on the benchmark image's own non-zero chunks with the same
//! primitives (and crate versions) as the repository format: keyed BLAKE3, zstd at the
//! repository's level, the repository's cipher (AEGIS-256 or XChaCha20-Poly1305).

use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context as _, Result};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use repo_format::Cipher;

/// The repository's object cipher, called as the repository calls it (24-byte nonce,
/// AEGIS-256's extended with zeros; 16-byte tag appended).
enum Aead {
    XChaCha(XChaCha20Poly1305),
    Aegis256([u8; 32]),
}

impl Aead {
    fn new(cipher: Cipher, key: &[u8; 32]) -> Aead {
        match cipher {
            Cipher::XChaCha20Poly1305 => Aead::XChaCha(XChaCha20Poly1305::new(key.into())),
            Cipher::Aegis256 => Aead::Aegis256(*key),
        }
    }

    fn aegis(key: &[u8; 32], nonce: &[u8; 24]) -> aegis::aegis256::Aegis256<16> {
        let mut n = [0u8; 32];
        n[..24].copy_from_slice(nonce);
        aegis::aegis256::Aegis256::<16>::new(key, &n)
    }

    /// Encrypts `buf` in place and appends the tag.
    fn encrypt(&self, nonce: &[u8; 24], aad: &[u8], buf: &mut Vec<u8>) {
        match self {
            Aead::XChaCha(c) => {
                let _ = c.encrypt_in_place(XNonce::from_slice(nonce), aad, buf);
            }
            Aead::Aegis256(k) => {
                let tag = Self::aegis(k, nonce).encrypt_in_place(buf, aad);
                buf.extend_from_slice(&tag);
            }
        }
    }

    /// Checks the appended tag and decrypts in place (dropping the tag); false on failure.
    fn decrypt(&self, nonce: &[u8; 24], aad: &[u8], buf: &mut Vec<u8>) -> bool {
        match self {
            Aead::XChaCha(c) => c
                .decrypt_in_place(XNonce::from_slice(nonce), aad, buf)
                .is_ok(),
            Aead::Aegis256(k) => {
                let Some(at) = buf.len().checked_sub(16) else {
                    return false;
                };
                let tag: [u8; 16] = buf[at..].try_into().unwrap_or_default();
                buf.truncate(at);
                Self::aegis(k, nonce)
                    .decrypt_in_place(buf, &tag, aad)
                    .is_ok()
            }
        }
    }
}

/// Non-zero chunks sampled evenly from a raw image.
pub struct Sample {
    /// The chunks.
    pub chunks: Vec<Vec<u8>>,
}

impl Sample {
    /// Total bytes.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.len() as u64).sum()
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// Reads the non-zero `chunk`-sized pieces of `raw`, keeping an even sample of at most `limit`
/// bytes.
pub fn load_sample(raw: &Path, chunk: usize, limit: u64) -> Result<Sample> {
    let mut nonzero = Vec::new();
    let mut f = File::open(raw).with_context(|| format!("cannot open {}", raw.display()))?;
    let mut buf = vec![0u8; chunk];
    let mut idx = 0usize;
    loop {
        let n = read_full(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        if !is_zero(&buf[..n]) {
            nonzero.push(idx);
        }
        idx += 1;
    }
    let total = nonzero.len() as u64 * chunk as u64;
    let stride = total.div_ceil(limit.max(1)).max(1) as usize;
    let mut chunks = Vec::new();
    for &i in nonzero.iter().step_by(stride) {
        use std::os::unix::fs::FileExt as _;
        let mut c = vec![0u8; chunk];
        let n = f.read_at(&mut c, (i * chunk) as u64)?;
        c.truncate(n);
        chunks.push(c);
    }
    Ok(Sample { chunks })
}

fn read_full(f: &mut File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

/// Runs `f` on every item with `threads` threads (work-stealing by index); returns seconds.
fn par<T: Sync>(items: &[T], threads: usize, f: impl Fn(&T) + Sync) -> f64 {
    par_with(items, threads, || (), |_, item| f(item))
}

/// Like [`par`], with per-thread state made by `init` (zstd contexts, reused buffers: what an
/// efficient pipeline keeps per worker, so the ceiling is not slowed by allocations).
fn par_with<T: Sync, S>(
    items: &[T],
    threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, &T) + Sync,
) -> f64 {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                let mut state = init();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    f(&mut state, item);
                }
            });
        }
    });
    start.elapsed().as_secs_f64()
}

/// Per-thread state of the seal/open ceilings.
struct Worker {
    comp: Option<zstd::bulk::Compressor<'static>>,
    decomp: Option<zstd::bulk::Decompressor<'static>>,
    buf: Vec<u8>,
    plain: Vec<u8>,
}

impl Worker {
    fn new(level: i32) -> Worker {
        Worker {
            comp: zstd::bulk::Compressor::new(level).ok(),
            decomp: zstd::bulk::Decompressor::new().ok(),
            buf: Vec::new(),
            plain: Vec::new(),
        }
    }
}

/// CPU ceilings in MB/s of plaintext (10^6 bytes per second).
#[derive(Debug, Clone, Copy, Default)]
pub struct Ceilings {
    /// Keyed BLAKE3, one core.
    pub blake3_1: f64,
    /// Keyed BLAKE3, all cores.
    pub blake3_n: f64,
    /// zstd compression at the repository level, one core.
    pub zstd_1: f64,
    /// Encryption with the repository's cipher, one core.
    pub aead_1: f64,
    /// hash + compress (kept when smaller) + encrypt, all cores: the backup CPU ceiling.
    pub seal_n: f64,
    /// decrypt + decompress + hash, all cores: the verify/restore CPU ceiling.
    pub open_n: f64,
    /// Compressed size / plaintext size of the sample.
    pub compress_ratio: f64,
    /// CPU seconds per 10^6 bytes of the all-core seal (what the work costs, whatever the load).
    pub seal_cpu_per_mb: f64,
    /// CPU seconds per 10^6 bytes of the all-core open.
    pub open_cpu_per_mb: f64,
}

struct Sealed {
    id: [u8; 32],
    nonce: [u8; 24],
    ct: Vec<u8>,
    compressed: bool,
}

/// Hash, compress (kept when smaller) and encrypt in place into `w.buf`; returns what the
/// object needs besides the ciphertext.
fn seal_into(
    w: &mut Worker,
    key: &[u8; 32],
    cipher: &Aead,
    plain: &[u8],
) -> ([u8; 32], [u8; 24], bool) {
    let id = blake3::keyed_hash(key, plain);
    w.buf.clear();
    w.buf
        .reserve(zstd::zstd_safe::compress_bound(plain.len()) + 16);
    let compressed = match w.comp.as_mut() {
        Some(c) => matches!(c.compress_to_buffer(plain, &mut w.buf), Ok(n) if n < plain.len()),
        None => false,
    };
    if !compressed {
        w.buf.clear();
        w.buf.extend_from_slice(plain);
    }
    let mut nonce = [0u8; 24];
    getrandom::fill(&mut nonce).unwrap_or_default();
    cipher.encrypt(&nonce, id.as_bytes(), &mut w.buf);
    (*id.as_bytes(), nonce, compressed)
}

fn seal(key: &[u8; 32], cipher: &Aead, level: i32, plain: &[u8]) -> Sealed {
    let mut w = Worker::new(level);
    let (id, nonce, compressed) = seal_into(&mut w, key, cipher, plain);
    Sealed {
        id,
        nonce,
        ct: w.buf,
        compressed,
    }
}

/// Measures every ceiling once on `sample` (call repeatedly and keep the best).
pub fn measure(sample: &Sample, level: i32, threads: usize, cipher: Cipher) -> Ceilings {
    let key = [7u8; 32];
    let cipher = Aead::new(cipher, &key);
    let bytes = sample.bytes() as f64;
    let rate = |secs: f64| bytes / secs.max(1e-9) / 1e6;
    let ch = &sample.chunks;

    let blake3_1 = rate(par(ch, 1, |c| {
        std::hint::black_box(blake3::keyed_hash(&key, c));
    }));
    let blake3_n = rate(par(ch, threads, |c| {
        std::hint::black_box(blake3::keyed_hash(&key, c));
    }));
    let zstd_1 = rate(par(ch, 1, |c| {
        std::hint::black_box(zstd::bulk::compress(c, level).ok());
    }));
    let aead_1 = rate(par_with(ch, 1, Vec::new, |buf: &mut Vec<u8>, c| {
        // Same length as the piece (the cipher's speed does not depend on the bytes):
        // no copy of the plaintext in the measured loop.
        buf.truncate(c.len());
        buf.resize(c.len(), 0xa5);
        cipher.encrypt(&[1u8; 24], b"", buf);
        std::hint::black_box(&buf);
    }));
    let cpu0 = crate::proc::self_cpu_secs();
    let seal_n = rate(par_with(
        ch,
        threads,
        || Worker::new(level),
        |w, c| {
            std::hint::black_box(seal_into(w, &key, &cipher, c));
        },
    ));
    let seal_cpu_per_mb = (crate::proc::self_cpu_secs() - cpu0) / (bytes / 1e6);
    let sealed: Vec<(Sealed, usize)> = ch
        .iter()
        .map(|c| (seal(&key, &cipher, level, c), c.len()))
        .collect();
    let stored: usize = sealed.iter().map(|(s, _)| s.ct.len()).sum();
    let cpu0 = crate::proc::self_cpu_secs();
    let bad = AtomicUsize::new(0);
    let open_n = rate(par_with(
        &sealed,
        threads,
        || Worker::new(level),
        |w, (s, len)| {
            // Decrypt in place in a reused buffer, decompress into another reused buffer.
            w.buf.clear();
            w.buf.extend_from_slice(&s.ct);
            if !cipher.decrypt(&s.nonce, &s.id, &mut w.buf) {
                bad.fetch_add(1, Ordering::Relaxed);
            }
            let plain: &[u8] = if s.compressed {
                w.plain.clear();
                w.plain.reserve(*len);
                if let Some(d) = w.decomp.as_mut() {
                    let _ = d.decompress_to_buffer(&w.buf, &mut w.plain);
                }
                &w.plain
            } else {
                &w.buf
            };
            if blake3::keyed_hash(&key, plain) != blake3::Hash::from_bytes(s.id) {
                bad.fetch_add(1, Ordering::Relaxed);
            }
        },
    ));
    // A ceiling that skipped work would be meaningless: every chunk must open to its id.
    let open_n = match bad.load(Ordering::Relaxed) {
        0 => open_n,
        n => {
            eprintln!(
                "warning: {n} sample chunks did not open in the verify ceiling; not reported"
            );
            f64::NAN
        }
    };
    let open_cpu_per_mb = (crate::proc::self_cpu_secs() - cpu0) / (bytes / 1e6);
    Ceilings {
        seal_cpu_per_mb,
        open_cpu_per_mb,
        blake3_1,
        blake3_n,
        zstd_1,
        aead_1,
        seal_n,
        open_n,
        compress_ratio: stored as f64 / bytes.max(1.0),
    }
}
