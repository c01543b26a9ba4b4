//! A host-wide cap on concurrently running test guests (default 2; `LIFEBOAT_TEST_MAX_GUESTS`):
//! one `flock`ed file per slot under `/var/lib/lifeboat-tests/.slots/`, so the cap holds across
//! test threads and test binaries, and a crashed test frees its slot.

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::fs::{flock, FlockOperation};

use crate::env::VM_ROOT;

/// A held guest slot; released on drop.
#[derive(Debug)]
pub struct GuestSlot {
    _file: File,
    /// Slot number.
    pub index: usize,
}

fn max_guests() -> usize {
    std::env::var("LIFEBOAT_TEST_MAX_GUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2)
}

/// Waits (up to `timeout`) for a free guest slot.
pub fn acquire_slot(timeout: Duration) -> Result<GuestSlot> {
    let dir = PathBuf::from(VM_ROOT).join(".slots");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let deadline = Instant::now() + timeout;
    let n = max_guests();
    loop {
        for index in 0..n {
            let path = dir.join(format!("slot-{index}"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            if flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok() {
                return Ok(GuestSlot { _file: file, index });
            }
        }
        if Instant::now() >= deadline {
            bail!("no free test guest slot (of {n}) within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
