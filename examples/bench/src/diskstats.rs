//! What the work directory's block device did while a command ran: `/proc/diskstats` sampled
//! every 50 ms by a thread. A backup whose repository shares the device with the disk it reads
//! (the live section: QEMU reads the domain's image with `cache=none`) can be bound by the
//! device rather than the CPU; this shows when.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Counters of one `/proc/diskstats` line (sectors are 512 bytes whatever the device).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    read_sectors: u64,
    written_sectors: u64,
    /// Milliseconds the device had I/O in flight (`io_ticks`).
    busy_ms: u64,
    /// Flush requests completed (kernel 5.5+; 0 where absent).
    flushes: u64,
}

/// The counters of device `name` in the text of `/proc/diskstats`.
pub fn parse(text: &str, name: &str) -> Option<Counters> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.get(2) != Some(&name) {
            return None;
        }
        let n = |i: usize| f.get(3 + i).and_then(|v| v.parse::<u64>().ok());
        Some(Counters {
            read_sectors: n(2)?,
            written_sectors: n(6)?,
            busy_ms: n(9)?,
            flushes: n(15).unwrap_or(0),
        })
    })
}

/// The device's work over one run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceUse {
    /// Seconds sampled.
    pub secs: f64,
    /// Bytes read from the device.
    pub read: u64,
    /// Bytes written to the device.
    pub written: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Share of the time the device had I/O in flight.
    pub busy: f64,
    /// Seconds of the 50 ms intervals in which it had I/O in flight ≥ 90 % of the time.
    pub saturated_secs: f64,
}

/// Sums timestamped samples (seconds, counters) into a [`DeviceUse`].
pub fn summarize(samples: &[(f64, Counters)]) -> Option<DeviceUse> {
    let (first, last) = (samples.first()?, samples.last()?);
    let secs = last.0 - first.0;
    if secs <= 0.0 {
        return None;
    }
    let saturated_secs = samples
        .windows(2)
        .map(|w| {
            let dt = w[1].0 - w[0].0;
            let busy = w[1].1.busy_ms.saturating_sub(w[0].1.busy_ms) as f64 / 1000.0;
            if dt > 0.0 && busy >= 0.9 * dt - 1e-9 {
                dt
            } else {
                0.0
            }
        })
        .sum();
    let d = |f: fn(&Counters) -> u64| f(&last.1).saturating_sub(f(&first.1));
    Some(DeviceUse {
        secs,
        read: d(|c| c.read_sectors) * 512,
        written: d(|c| c.written_sectors) * 512,
        flushes: d(|c| c.flushes),
        busy: (d(|c| c.busy_ms) as f64 / 1000.0 / secs).min(1.0),
        saturated_secs,
    })
}

/// The kernel name (`vda`, `nvme0n1p2`) of the block device holding `dir`, if it is one.
pub fn device_of(dir: &Path) -> Option<String> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent")).ok()?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .map(str::to_owned)
}

/// Samples a device every 50 ms until [`Sampler::stop`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(f64, Counters)>>,
}

impl Sampler {
    /// Starts sampling `device` (a name in `/proc/diskstats`); `None` if it is not there.
    pub fn start(device: &str) -> Option<Sampler> {
        let read = |name: &str| {
            std::fs::read_to_string("/proc/diskstats")
                .ok()
                .and_then(|t| parse(&t, name))
        };
        read(device)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (stop.clone(), device.to_owned());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut samples = Vec::new();
            loop {
                let done = flag.load(Ordering::Relaxed);
                if let Some(c) = read(&name) {
                    samples.push((t0.elapsed().as_secs_f64(), c));
                }
                if done {
                    return samples;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Some(Sampler { stop, thread })
    }

    /// Stops sampling (one last sample) and sums up.
    pub fn stop(self) -> Option<DeviceUse> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().ok().and_then(|s| summarize(&s))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    const TEXT: &str = "\
 253       0 vda 100 5 8000 40 200 7 16000 90 0 300 130 0 0 0 0 12 20
 253       1 vda1 1 8 0 0
   7       0 loop0 9 0 72 0 0 0 0 0 0 4 0 0 0 0 0
";

    #[test]
    fn parses_the_named_line_only() {
        let c = parse(TEXT, "vda").unwrap();
        assert_eq!(
            c,
            Counters {
                read_sectors: 8000,
                written_sectors: 16000,
                busy_ms: 300,
                flushes: 12
            }
        );
        // An old kernel's line without flush counters, a line with too few fields, and a
        // device that is not there.
        assert_eq!(parse(TEXT, "loop0").unwrap().flushes, 0);
        assert_eq!(parse(TEXT, "vda1"), None);
        assert_eq!(parse(TEXT, "vdb"), None);
    }

    #[test]
    fn sums_bytes_busy_share_and_saturated_time() {
        let c = |r: u64, w: u64, busy: u64, f: u64| Counters {
            read_sectors: r,
            written_sectors: w,
            busy_ms: busy,
            flushes: f,
        };
        // Four 50 ms intervals: idle, 100 % busy, 90 % busy, 40 % busy.
        let s = [
            (0.0, c(0, 0, 1000, 5)),
            (0.05, c(0, 0, 1000, 5)),
            (0.10, c(2048, 0, 1050, 6)),
            (0.15, c(4096, 1024, 1095, 9)),
            (0.20, c(4096, 2048, 1115, 10)),
        ];
        let u = summarize(&s).unwrap();
        assert!((u.secs - 0.2).abs() < 1e-9);
        assert_eq!((u.read, u.written, u.flushes), (4096 * 512, 2048 * 512, 5));
        assert!((u.busy - 0.575).abs() < 1e-9, "{}", u.busy);
        assert!(
            (u.saturated_secs - 0.10).abs() < 1e-9,
            "{}",
            u.saturated_secs
        );
        assert_eq!(summarize(&s[..1]), None);
    }
}
