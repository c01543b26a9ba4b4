//! `lifeboat instant-restore`: the VM runs within seconds whatever the disk size, its data moves
//! into local qcow2 overlays by block pull, and the result equals a full restore.

mod restore_common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use guest_quiesce::protocol::{GuestExec, GuestPing};
use guest_quiesce::Agent;
use lifeboat_e2e::{
    acquire_slot, remove_domain, run_output, virsh, virsh_timeout, wait_until, VirshTransport,
    SYSTEM_URI,
};
use restore_common::*;

const MIB: u64 = 1 << 20;

struct Outcome {
    running_after: f64,
    seen_running_after: Duration,
}

fn sha256_of_prefix(path: &Path, len: u64) -> Result<String> {
    let out = run_output(
        Command::new("sh").args([
            "-c",
            &format!("head -c {len} '{}' | sha256sum", path.display()),
        ]),
        Duration::from_secs(60),
    )?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// A backed-up test disk: `size`-byte raw image with data at 0 and size/2.
struct Source {
    tag: String,
    size: u64,
    img: std::path::PathBuf,
    snap: String,
    /// Full restore of the snapshot, made on first use.
    full: std::cell::OnceCell<std::path::PathBuf>,
}

fn backed_up_disk(s: &Scratch, tag: &str, size: u64) -> Result<Source> {
    let pid = std::process::id();
    let orig = format!("lbt-irsrc-{pid}-{tag}");
    let img = s.dir.join(format!("{tag}.raw"));
    let head = pseudo_random((16 * MIB) as usize, 1);
    make_raw(
        &img,
        size,
        &[(0, head), (size / 2, pseudo_random((4 * MIB) as usize, 2))],
    )?;
    let xml = s.dir.join(format!("{tag}.xml"));
    std::fs::write(
        &xml,
        guest_domain_xml(&orig, &s.dir, &[("vda", &img, "raw")])?,
    )?;
    s.ok(&[
        "backup-image",
        &img.to_string_lossy(),
        "--name",
        &orig,
        "--disk",
        "vda",
        "--domain-xml",
        &xml.to_string_lossy(),
    ])?;
    Ok(Source {
        tag: tag.into(),
        size,
        img,
        snap: format!("{orig}@latest"),
        full: Default::default(),
    })
}

/// Instant-restore `src` as a new domain (run number `n`), check what the guest reads, wait for
/// the move, check there is no NBD left and that the disk equals a full restore.
fn instant_run(s: &Scratch, src: &Source, n: u32, key_file: Option<&Path>) -> Result<Outcome> {
    let pid = std::process::id();
    let tag = format!("{}{n}", src.tag);
    let new = format!("lbt-ir-{pid}-{tag}");
    let (img, snap, size) = (&src.img, &src.snap, src.size);
    let storage = s.dir.join("storage");

    let _slot = acquire_slot(Duration::from_secs(1800))?;
    let guard = DomainGuard(new.clone());
    let t0 = Instant::now();
    let mut child = s
        .cmd(&[
            "instant-restore",
            snap,
            "--connect",
            SYSTEM_URI,
            "--name",
            &new,
            "--storage",
            &storage.to_string_lossy(),
            "--no-network",
            "--json",
        ])
        .envs(key_file.map(|k| ("LIFEBOAT_KEY_FILE", k.as_os_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let seen = wait_until(Duration::from_secs(120), Duration::from_millis(50), || {
        if let Some(st) = child.try_wait()? {
            let mut e = String::new();
            if let Some(mut se) = child.stderr.take() {
                se.read_to_string(&mut e)?;
            }
            bail!("instant-restore exited early ({st}): {e}");
        }
        let st = virsh_timeout(SYSTEM_URI, &["domstate", &new], Duration::from_secs(10));
        Ok(matches!(st, Ok(ref x) if x.trim() == "running").then(|| t0.elapsed()))
    })?;
    // The guest answers while the data is still moving (or already moved, for small disks).
    let agent = Agent::new(VirshTransport {
        uri: SYSTEM_URI.into(),
        domain: new.clone(),
    })
    .with_timeout_scale(3.0);
    wait_until(Duration::from_secs(180), Duration::from_millis(250), || {
        Ok(agent
            .call_timeout(&GuestPing, Duration::from_secs(2))
            .is_ok()
            .then_some(()))
    })
    .context("guest agent of the instantly restored VM")?;
    let r = agent.exec_request(
        &GuestExec::new(
            "/bin/sh",
            &[
                "-c",
                "dd if=/dev/vda bs=1M count=16 2>/dev/null | sha256sum",
            ],
        ),
        Duration::from_secs(300),
    )?;
    let guest_sum = String::from_utf8_lossy(&r.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        guest_sum == sha256_of_prefix(img, 16 * MIB)?,
        "guest reads different data: {guest_sum}"
    );

    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("instant-restore did not finish the move");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut so) = child.stdout.take() {
        so.read_to_string(&mut out)?;
    }
    if let Some(mut se) = child.stderr.take() {
        se.read_to_string(&mut err)?;
    }
    ensure!(status.success(), "instant-restore failed ({status}): {err}");
    let j: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let running_after = j["running_after_seconds"].as_f64().context("no timing")?;
    eprintln!(
        "{tag}: {} MiB virtual: running after {running_after:.2} s (seen by the test after {seen:?}), moved in {:.2} s; phases {}",
        size / MIB,
        j["move_seconds"].as_f64().unwrap_or(-1.0),
        j["phases"]
    );

    // No NBD left in the chain.
    let overlay = storage.join(&new).join("vda.qcow2");
    let blk = virsh(SYSTEM_URI, &["domblklist", &new])?;
    ensure!(blk.contains(&*overlay.to_string_lossy()), "{blk}");
    let live = virsh(SYSTEM_URI, &["dumpxml", &new])?;
    ensure!(
        !live.contains("protocol='nbd'"),
        "still NBD-backed:\n{live}"
    );
    let chain = qemu_img(&["info", "-U", "--backing-chain", &overlay.to_string_lossy()])?;
    ensure!(!chain.contains("backing file"), "{chain}");
    ensure!(
        !storage.join(&new).join("lifeboat-instant.json").exists(),
        "state file left behind"
    );

    // Stop the VM (the guest never wrote to vda: it is not a filesystem), compare with a full
    // restore of the same snapshot.
    virsh(SYSTEM_URI, &["destroy", &new])?;
    let full = match src.full.get() {
        Some(f) => f.clone(),
        None => {
            let full = s.dir.join(format!("full-{}", src.tag));
            s.ok(&["restore", snap, "--to", &full.to_string_lossy()])?;
            src.full.get_or_init(|| full).clone()
        }
    };
    let cmp = run_output(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&overlay)
            .arg(full.join("vda.raw")),
        Duration::from_secs(600),
    )?;
    ensure!(
        cmp.status.success(),
        "moved disk differs from a full restore: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    drop(guard);
    let _ = std::fs::remove_dir_all(storage.join(&new));
    Ok(Outcome {
        running_after,
        seen_running_after: seen,
    })
}

/// Undefines a test domain on drop.
struct DomainGuard(String);

impl Drop for DomainGuard {
    fn drop(&mut self) {
        remove_domain(SYSTEM_URI, &self.0);
    }
}

#[test]
fn instant_restore_small_and_large_disk() -> Result<()> {
    let s = Scratch::new("instant")?;
    // Time to running is ~1 s and the host is shared (other builds and guests, 2 cores), so
    // one run per size measures the load, not the size: run each size RUNS times, alternating
    // (small, large, small, …) so that a load spike hits both, and compare the fastest. Every
    // run is fully checked. What lifeboat does before the VM runs must not depend on the size
    // (the phases printed per run show where the time goes).
    //
    // The repository is opened with a key file, not the passphrase: the passphrase KDF is a
    // constant (Argon2, CPU- and memory-bound) that under load varies by ±0.3 s on its own and
    // would drown what we measure; without it the constant part is smaller, so a size-dependent
    // cost would show up *more* in the ratio, not less.
    const RUNS: u32 = 3;
    let key = s.dir.join("test.key");
    s.ok(&["repo", "generate-key-file", &key.to_string_lossy()])?;
    s.ok(&["repo", "add-key", "--new-key-file", &key.to_string_lossy()])?;
    let small = backed_up_disk(&s, "small", 1024 * MIB)?;
    let large = backed_up_disk(&s, "large", 16 * 1024 * MIB)?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let (mut seen_a, mut seen_b) = (Vec::new(), Vec::new());
    for n in 1..=RUNS {
        let o = instant_run(&s, &small, n, Some(&key))?;
        a.push(o.running_after);
        seen_a.push(o.seen_running_after.as_secs_f64());
        let o = instant_run(&s, &large, n, Some(&key))?;
        b.push(o.running_after);
        seen_b.push(o.seen_running_after.as_secs_f64());
    }
    let (ma, mb) = (median(&mut a), median(&mut b));
    eprintln!(
        "time to running: 1 GiB {a:.2?} median {ma:.2} s; 16 GiB {b:.2?} median {mb:.2} s \
         (seen running by the test: medians {:.2} s / {:.2} s)",
        median(&mut seen_a),
        median(&mut seen_b)
    );
    // What this guards against is a cost that grows with the disk: copying or indexing 16 GiB
    // before the start would add seconds. Under load (CI: 2 cores, two TCG guests, builds)
    // QEMU's start alone varies by ±0.5 s between runs, so the bound is the fastest run of
    // each size, with room for that noise; performance itself is measured by the benchmark.
    let (fa, fb) = (a[0], b[0]); // sorted by median()
    ensure!(
        fb < 1.5 * fa + 0.5,
        "time to running grows with the disk size: fastest 1 GiB run {fa:.2} s, fastest \
         16 GiB run {fb:.2} s ({a:.2?} / {b:.2?})"
    );
    assert_no_leftovers()?;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn assert_no_leftovers() -> Result<()> {
    let ps = run_output(
        Command::new("pgrep").args(["-f", "lifeboat instant-restore"]),
        Duration::from_secs(10),
    )?;
    ensure!(
        String::from_utf8_lossy(&ps.stdout).trim().is_empty(),
        "instant-restore processes left"
    );
    Ok(())
}

#[test]
fn instant_restore_of_corrupt_chunks_fails_and_leaves_no_domain() -> Result<()> {
    let s = Scratch::new("instant-corrupt")?;
    let pid = std::process::id();
    let orig = format!("lbt-ircsrc-{pid}");
    let new = format!("lbt-irc-{pid}");
    let img = s.dir.join("c.raw");
    make_raw(
        &img,
        256 * MIB,
        &[(0, pseudo_random((8 * MIB) as usize, 5))],
    )?;
    let xml = s.dir.join("c.xml");
    std::fs::write(
        &xml,
        guest_domain_xml(&orig, &s.dir, &[("vda", &img, "raw")])?,
    )?;
    s.ok(&[
        "backup-image",
        &img.to_string_lossy(),
        "--name",
        &orig,
        "--disk",
        "vda",
        "--domain-xml",
        &xml.to_string_lossy(),
    ])?;
    corrupt_all_chunks(&s.repo)?;
    let _slot = acquire_slot(Duration::from_secs(1800))?;
    let _guard = DomainGuard(new.clone());
    let out = s.output(
        &[
            "instant-restore",
            &format!("{orig}@latest"),
            "--connect",
            SYSTEM_URI,
            "--name",
            &new,
            "--storage",
            &s.dir.join("storage").to_string_lossy(),
            "--no-network",
        ],
        Duration::from_secs(600),
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    ensure!(
        out.status.code() == Some(6),
        "expected exit 6: {:?} {stderr}",
        out.status
    );
    let list = virsh(SYSTEM_URI, &["list", "--all", "--name"])?;
    ensure!(!list.contains(&new), "domain left defined: {list}");
    Ok(())
}

/// Flip one byte in the middle of every stored chunk.
pub fn corrupt_all_chunks(repo: &Path) -> Result<usize> {
    let mut n = 0;
    for d in std::fs::read_dir(repo.join("chunks"))? {
        for f in std::fs::read_dir(d?.path())? {
            let p = f?.path();
            set_mode(&p, 0o644)?;
            let mut b = std::fs::read(&p)?;
            let i = b.len() / 2;
            b[i] ^= 0x55;
            std::fs::write(&p, b)?;
            n += 1;
        }
    }
    ensure!(n > 0, "no chunks to corrupt");
    Ok(n)
}

/// Runs `sh -c script` in the guest; (exit code, stdout, stderr).
fn guest_sh(agent: &Agent<VirshTransport>, script: &str) -> Result<(i32, String, String)> {
    let r = agent.exec_request(
        &GuestExec::new("/bin/sh", &["-c", script]),
        Duration::from_secs(120),
    )?;
    Ok((
        r.exit_code.unwrap_or(-1),
        String::from_utf8_lossy(&r.stdout).trim().to_owned(),
        String::from_utf8_lossy(&r.stderr).trim().to_owned(),
    ))
}

/// `virsh blockjob --raw` progress of vda: (cur, end), None without a job.
fn pull_progress(dom: &str) -> Result<Option<(u64, u64)>> {
    let out = virsh(SYSTEM_URI, &["blockjob", dom, "vda", "--raw"])?;
    // " type=Block Pull\n bandwidth=0\n cur=1048576\n end=536870912"; empty without a job.
    let field = |k: &str| -> Option<u64> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
    };
    Ok(field("cur=").zip(field("end=")))
}

/// The server is SIGKILLed in the middle of the move (slowed down by the
/// `LIFEBOAT_TEST_SERVE_CHUNK_DELAY_MS` hook). While it is down, the VM keeps running, reads
/// of moved regions work and reads of not-yet-moved regions fail with EIO in the guest, the
/// block pull stops. `instant-restore --resume` serves again: QEMU reconnects on the next
/// request, the guest reads the region again, the move completes, no NBD backing is left and
/// the disk equals the original image.
#[test]
fn instant_restore_resume_after_the_server_is_killed() -> Result<()> {
    let s = Scratch::new("instant-resume")?;
    let pid = std::process::id();
    let orig = format!("lbt-irrsrc-{pid}");
    let new = format!("lbt-irr-{pid}");
    let img = s.dir.join("r.raw");
    // 64 MiB of data = 256 chunks of 256 KiB at the start of a 512 MiB disk; at 300 ms per
    // chunk load the pull needs over a minute for it.
    let data = pseudo_random((64 * MIB) as usize, 7);
    make_raw(&img, 512 * MIB, &[(0, data)])?;
    let xml = s.dir.join("r.xml");
    std::fs::write(
        &xml,
        guest_domain_xml(&orig, &s.dir, &[("vda", &img, "raw")])?,
    )?;
    s.ok(&[
        "backup-image",
        &img.to_string_lossy(),
        "--name",
        &orig,
        "--disk",
        "vda",
        "--domain-xml",
        &xml.to_string_lossy(),
    ])?;
    let storage = s.dir.join("storage");
    let _slot = acquire_slot(Duration::from_secs(1800))?;
    let _guard = DomainGuard(new.clone());
    let mut child = s
        .cmd(&[
            "instant-restore",
            &format!("{orig}@latest"),
            "--connect",
            SYSTEM_URI,
            "--name",
            &new,
            "--storage",
            &storage.to_string_lossy(),
            "--no-network",
            "--cache-chunks",
            "4",
        ])
        .env("LIFEBOAT_TEST_SERVE_CHUNK_DELAY_MS", "300")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // As soon as the pull has moved at least 4 MiB, kill the server.
    let (cur, end) = wait_until(Duration::from_secs(180), Duration::from_millis(100), || {
        if let Some(st) = child.try_wait()? {
            bail!("instant-restore exited before the test could kill it ({st})");
        }
        // (virsh fails until the domain is defined)
        Ok(pull_progress(&new)
            .ok()
            .flatten()
            .filter(|(c, _)| *c >= 4 * MIB))
    })
    .context("block pull progress")?;
    child.kill()?; // SIGKILL
    child.wait()?;
    eprintln!(
        "killed the server after {} MiB of {} MiB moved",
        cur / MIB,
        end / MIB
    );
    ensure!(
        cur < 48 * MIB,
        "the pull is too fast for the test: {cur}/{end}"
    );
    let agent = Agent::new(VirshTransport {
        uri: SYSTEM_URI.into(),
        domain: new.clone(),
    })
    .with_timeout_scale(3.0);
    wait_until(Duration::from_secs(180), Duration::from_millis(250), || {
        Ok(agent
            .call_timeout(&GuestPing, Duration::from_secs(2))
            .is_ok()
            .then_some(()))
    })
    .context("guest agent of the instantly restored VM (server down)")?;

    // While the server is down.
    let st = virsh(SYSTEM_URI, &["domstate", &new])?;
    ensure!(st.trim() == "running", "the VM should keep running: {st}");
    wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        Ok(pull_progress(&new)?.is_none().then_some(()))
    })
    .context("the block pull should stop when the server is gone")?;
    let moved_read = guest_sh(
        &agent,
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=1M count=1 2>&1 >/dev/null",
    )?;
    ensure!(
        moved_read.0 == 0,
        "reading a moved region failed: {moved_read:?}"
    );
    let unmoved = "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=1M skip=60 count=1 2>/dev/null | sha256sum";
    let down = guest_sh(
        &agent,
        &format!("{unmoved}; dd if=/dev/vda bs=1M skip=60 count=1 of=/dev/null"),
    )?;
    eprintln!("guest reading an unmoved region with the server down: {down:?}");
    ensure!(
        down.0 != 0 && down.2.to_lowercase().contains("error"),
        "reading an unmoved region should fail with an I/O error while the server is down: {down:?}"
    );
    let expected = {
        let out = run_output(
            Command::new("sh").args([
                "-c",
                &format!(
                    "dd if='{}' bs=1M skip=60 count=1 2>/dev/null | sha256sum",
                    img.display()
                ),
            ]),
            Duration::from_secs(60),
        )?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };

    // Resume (no delay): completes the move.
    let out = s.output(
        &[
            "instant-restore",
            "--resume",
            "--name",
            &new,
            "--storage",
            &storage.to_string_lossy(),
            "--connect",
            SYSTEM_URI,
            "--json",
        ],
        Duration::from_secs(600),
    )?;
    ensure!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up = guest_sh(&agent, unmoved)?;
    ensure!(
        up.0 == 0 && up.1.split_whitespace().next() == Some(expected.as_str()),
        "after resume the guest reads {up:?}, expected {expected}"
    );
    let live = virsh(SYSTEM_URI, &["dumpxml", &new])?;
    ensure!(
        !live.contains("protocol='nbd'"),
        "still NBD-backed:\n{live}"
    );
    let overlay = storage.join(&new).join("vda.qcow2");
    virsh(SYSTEM_URI, &["destroy", &new])?;
    let chain = qemu_img(&["info", "-U", "--backing-chain", &overlay.to_string_lossy()])?;
    ensure!(!chain.contains("backing file"), "{chain}");
    ensure!(
        !storage.join(&new).join("lifeboat-instant.json").exists(),
        "state file left behind"
    );
    let cmp = run_output(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&overlay)
            .arg(&img),
        Duration::from_secs(600),
    )?;
    ensure!(
        cmp.status.success(),
        "moved disk differs from the original: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    Ok(())
}
