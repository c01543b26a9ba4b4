//! [`UnixSocketTransport`]: talks to qemu-ga through its unix socket directly (a QEMU
//! `-chardev socket` backing the `org.qemu.guest_agent.0` port), resynchronising with
//! `guest-sync-delimited` on every (re)connect.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, ErrorKind as IoKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::client::Transport;
use crate::error::{Error, ErrorKind, Result};
use crate::protocol::{encode_request, GuestSyncDelimited, SYNC_DELIMITER};

/// Longest reply line accepted (guest-exec-status with captured output can be large).
const MAX_REPLY: usize = 64 << 20;

/// A QGA transport over a unix socket. One request at a time (a mutex serialises callers).
/// After any error or timeout the connection is dropped; the next call reconnects and resyncs,
/// so a late reply to an abandoned request is never taken for the answer to a new one.
#[derive(Debug)]
pub struct UnixSocketTransport {
    path: PathBuf,
    conn: Mutex<Option<BufReader<UnixStream>>>,
}

impl UnixSocketTransport {
    /// A transport for the socket at `path` (connected lazily, on the first call).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UnixSocketTransport {
            path: path.into(),
            conn: Mutex::new(None),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn connect(&self, deadline: Instant) -> Result<BufReader<UnixStream>> {
        let stream = UnixStream::connect(&self.path).map_err(|e| {
            Error::with_source(
                ErrorKind::NotResponding,
                format!("connecting to {}", self.path.display()),
                e,
            )
        })?;
        let mut conn = BufReader::new(stream);
        resync(&mut conn, deadline)?;
        Ok(conn)
    }
}

fn random_id() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    // JSON numbers above 2^53 lose precision in some parsers.
    h.finish() & ((1 << 53) - 1)
}

/// Sends 0xFF + `guest-sync-delimited {id}` and discards input up to the delimiter and the
/// matching reply.
fn resync(conn: &mut BufReader<UnixStream>, deadline: Instant) -> Result<()> {
    let id = random_id();
    let mut req = vec![SYNC_DELIMITER];
    req.extend_from_slice(encode_request(&GuestSyncDelimited { id })?.as_bytes());
    req.push(b'\n');
    write_all(conn.get_mut(), &req, deadline)?;
    loop {
        // Skip everything up to and including the delimiter, then read one reply line.
        let mut skipped = Vec::new();
        read_until(conn, SYNC_DELIMITER, &mut skipped, deadline)?;
        let mut line = Vec::new();
        read_until(conn, b'\n', &mut line, deadline)?;
        let text = String::from_utf8_lossy(&line);
        if let Ok(got) = crate::protocol::decode_reply::<GuestSyncDelimited>(&text) {
            if got == id {
                return Ok(());
            }
        }
    }
}

fn set_timeout(stream: &UnixStream, deadline: Instant, read: bool) -> Result<()> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(Error::new(ErrorKind::Timeout, "guest agent socket"));
    }
    let r = if read {
        stream.set_read_timeout(Some(remaining))
    } else {
        stream.set_write_timeout(Some(remaining))
    };
    r.map_err(|e| Error::with_source(ErrorKind::Io, "setting socket timeout", e))
}

fn io_error(e: std::io::Error, what: &str) -> Error {
    match e.kind() {
        IoKind::WouldBlock | IoKind::TimedOut => {
            Error::with_source(ErrorKind::Timeout, what.to_owned(), e)
        }
        _ => Error::with_source(ErrorKind::Io, what.to_owned(), e),
    }
}

fn write_all(stream: &mut UnixStream, mut buf: &[u8], deadline: Instant) -> Result<()> {
    while !buf.is_empty() {
        set_timeout(stream, deadline, false)?;
        match stream.write(buf) {
            Ok(0) => return Err(Error::new(ErrorKind::Io, "guest agent socket closed")),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == IoKind::Interrupted => {}
            Err(e) => return Err(io_error(e, "writing to guest agent socket")),
        }
    }
    Ok(())
}

/// Reads up to and including `delim` into `out` (without the delimiter), honouring `deadline`.
fn read_until(
    conn: &mut BufReader<UnixStream>,
    delim: u8,
    out: &mut Vec<u8>,
    deadline: Instant,
) -> Result<()> {
    loop {
        set_timeout(conn.get_ref(), deadline, true)?;
        let buf = match conn.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == IoKind::Interrupted => continue,
            Err(e) => return Err(io_error(e, "reading from guest agent socket")),
        };
        if buf.is_empty() {
            return Err(Error::new(
                ErrorKind::NotResponding,
                "guest agent socket closed",
            ));
        }
        match buf.iter().position(|&b| b == delim) {
            Some(i) => {
                out.extend_from_slice(buf.get(..i).unwrap_or_default());
                conn.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                out.extend_from_slice(buf);
                conn.consume(n);
            }
        }
        if out.len() > MAX_REPLY {
            return Err(Error::new(
                ErrorKind::Protocol,
                format!("guest agent reply longer than {MAX_REPLY} bytes"),
            ));
        }
    }
}

impl Transport for UnixSocketTransport {
    fn execute(&self, request_json: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut guard = self
            .conn
            .lock()
            .map_err(|_| Error::new(ErrorKind::Io, "guest agent connection lock poisoned"))?;
        let mut conn = match guard.take() {
            Some(c) => c,
            None => self.connect(deadline)?,
        };
        let mut req = Vec::with_capacity(request_json.len() + 1);
        req.extend_from_slice(request_json.as_bytes());
        req.push(b'\n');
        write_all(conn.get_mut(), &req, deadline)?;
        loop {
            let mut line = Vec::new();
            read_until(&mut conn, b'\n', &mut line, deadline)?;
            // Stray delimiters (from a resync racing with output) and blank lines are skipped.
            line.retain(|&b| b != SYNC_DELIMITER);
            let text = String::from_utf8(line).map_err(|e| {
                Error::with_source(ErrorKind::Protocol, "guest agent reply is not UTF-8", e)
            })?;
            if text.trim().is_empty() {
                continue;
            }
            // Keep the connection only after a complete reply.
            *guard = Some(conn);
            return Ok(text);
        }
    }
}
