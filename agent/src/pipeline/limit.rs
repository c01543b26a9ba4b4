//! Limits on a backup's load on the host: how fast it reads the disks (`--limit-read`) and how
//! many chunks it hashes, compresses and encrypts at once (`--cpus`).
//!
//! The read limit paces the NBD read requests of every disk a [`Limits`] is given to on one
//! virtual clock (clones share it): a request of `n` bytes starts no earlier than the clock and
//! moves the clock `n / rate` seconds on. Time the backup spends without reading is not banked,
//! so the rate is never exceeded by a burst after a pause (beyond the one request that starts at
//! once).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A backup's limits (none by default). Cheap to clone: clones share the read clock.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    read: Option<Arc<ReadPace>>,
    sealing: Option<Arc<Semaphore>>,
}

impl Limits {
    /// Limits for one run: reads paced to `read_bytes_per_s` in all, at most `cpus` chunks
    /// sealed at once.
    pub fn new(read_bytes_per_s: Option<u64>, cpus: Option<usize>) -> Limits {
        Limits {
            read: read_bytes_per_s
                .filter(|r| *r > 0)
                .map(|r| Arc::new(ReadPace::new(r))),
            sealing: cpus.filter(|n| *n > 0).map(|n| Arc::new(Semaphore::new(n))),
        }
    }

    /// Waits until a read of `n` bytes may start.
    pub async fn before_read(&self, n: u64) {
        if let Some(pace) = &self.read {
            let start = pace.reserve(Instant::now(), n);
            tokio::time::sleep_until(start.into()).await;
        }
    }

    /// A place to seal one chunk in (`None` without a limit); hold it while sealing.
    pub async fn sealing_place(&self) -> Option<OwnedSemaphorePermit> {
        match &self.sealing {
            // The semaphore is never closed.
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        }
    }
}

/// The read limit's virtual clock.
#[derive(Debug)]
struct ReadPace {
    bytes_per_s: u64,
    next: Mutex<Option<Instant>>,
}

impl ReadPace {
    fn new(bytes_per_s: u64) -> ReadPace {
        ReadPace {
            bytes_per_s,
            next: Mutex::new(None),
        }
    }

    /// When a read of `n` bytes asked for at `now` may start; moves the clock on.
    fn reserve(&self, now: Instant, n: u64) -> Instant {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        let (start, after) = schedule(*next, now, n, self.bytes_per_s);
        *next = Some(after);
        start
    }
}

/// The pacing rule: a request of `n` bytes asked for at `now`, with the clock at `next` (`None`:
/// nothing read yet), starts at the later of the two and moves the clock `n / rate` on.
fn schedule(next: Option<Instant>, now: Instant, n: u64, bytes_per_s: u64) -> (Instant, Instant) {
    let start = next.map_or(now, |t| t.max(now));
    let secs = n as f64 / bytes_per_s.max(1) as f64;
    let after = start
        .checked_add(Duration::from_secs_f64(secs.min(1e9)))
        .unwrap_or(start);
    (start, after)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn requests_are_spaced_by_their_size_over_the_rate() {
        let t0 = Instant::now();
        let (s1, n1) = schedule(None, t0, MIB, 4 * MIB);
        assert_eq!(s1, t0);
        assert_eq!(n1, t0 + Duration::from_millis(250));
        // Asked for at once: waits for the clock.
        let (s2, n2) = schedule(Some(n1), t0, 2 * MIB, 4 * MIB);
        assert_eq!(s2, n1);
        assert_eq!(n2, t0 + Duration::from_millis(750));
    }

    #[test]
    fn idle_time_is_not_banked() {
        let t0 = Instant::now();
        let (_, n1) = schedule(None, t0, MIB, MIB);
        let later = t0 + Duration::from_secs(10);
        let (s2, n2) = schedule(Some(n1), later, MIB, MIB);
        assert_eq!(s2, later);
        assert_eq!(n2, later + Duration::from_secs(1));
    }

    #[test]
    fn the_average_rate_holds_over_many_requests() {
        let pace = ReadPace::new(8 * MIB);
        let t0 = Instant::now();
        let mut last = t0;
        for _ in 0..64 {
            last = pace.reserve(t0, MIB);
        }
        // 64 MiB at 8 MiB/s: the last request starts after 63 of them, 7.875 s.
        assert_eq!(last - t0, Duration::from_secs_f64(63.0 / 8.0));
    }

    #[tokio::test]
    async fn sealing_places_are_bounded() {
        let limits = Limits::new(None, Some(2));
        let a = limits.sealing_place().await;
        let b = limits.sealing_place().await;
        assert!(a.is_some() && b.is_some());
        let third = tokio::time::timeout(Duration::from_millis(50), limits.sealing_place()).await;
        assert!(third.is_err(), "a third place while two are held");
        drop(a);
        assert!(limits.sealing_place().await.is_some());
        assert!(Limits::default().sealing_place().await.is_none());
    }
}
