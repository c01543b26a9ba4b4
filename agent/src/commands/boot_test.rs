//! `lifeboat boot-test SNAPSHOT [--check CMD]... [--port N]... [--policy FILE.yaml]
//! [--timeout 10m] [--connect URI] [--report FILE.html] [--keep-on-failure]`
//!
//! 1. The snapshot comes up as an isolated, transient sandbox domain on throw-away overlays
//!    backed by the repository ([`crate::boottest::sandbox`]).
//! 2. Wait for the guest: a `guest-ping` through the guest agent (repeated with short timeouts)
//!    or, for guests without an agent channel, the serial console (a login prompt, or output that
//!    stopped changing for 10 s). A kernel panic on the console or the domain stopping fails at
//!    once; otherwise the time limit applies.
//! 3. Run every check in the guest (`guest-exec /bin/sh -c CMD`; ports through `/proc/net/tcp*`),
//!    retrying the failing ones every 2 s until all pass (RTO = seconds since the command
//!    started) or the time limit / `--settle` runs out (the failing checks are named).
//! 4. Evidence: console tail, screenshot PNG when the domain has graphics. Teardown. The result
//!    is stored in the repository (`boottests/<snapshot>/…`), `--report` writes the HTML.
//!
//! A failed verdict exits with code 9.

use std::path::Path;
use std::time::{Duration, Instant};

use guest_quiesce::protocol::GuestPing;
use guest_quiesce::Agent;
use repo_format::{BootTestResult, CheckResult, Verdict};
use serde_json::json;

use super::emit;
use super::restore::resolve;
use crate::boottest::sandbox::{Sandbox, SharedDom};
use crate::boottest::{
    console_signal, image, merge_checks, parse_duration, report, sandbox_name, text_tail, Check,
    ConsoleSignal, ConsoleWatch, Policy, CONSOLE_TAIL_BYTES, DEFAULT_TIMEOUT, OUTPUT_TAIL_BYTES,
};
use crate::cli::{BootTestArgs, GlobalOpts};
use crate::error::{repo_err, Context, Error, ErrorKind, Result};
use crate::relocate::{self, NVRAM_ENTRY};
use crate::repo::{self, blocking};
use crate::vm::host::LibvirtTransport;

/// Console output unchanged this long = booted (guests without an agent).
const CONSOLE_QUIET: Duration = Duration::from_secs(10);
/// Timeout of one guest-ping.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest single check run.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between check rounds.
const CHECK_RETRY: Duration = Duration::from_secs(2);
/// Largest screenshot read (bytes of PPM).
const MAX_SCREENSHOT: usize = 64 << 20;
/// Slow (TCG) guests: scale the default QGA timeouts.
const AGENT_TIMEOUT_SCALE: f64 = 2.0;

/// What the observation of the running sandbox found.
struct Observation {
    verdict: Verdict,
    reason: String,
    rto: Option<f64>,
    ready: Option<f64>,
    readiness: Option<String>,
    checks: Vec<CheckResult>,
}

/// `lifeboat boot-test`
pub async fn run(global: &GlobalOpts, args: BootTestArgs) -> Result<()> {
    let t0 = Instant::now();
    let started = jiff::Timestamp::now();
    let policy = match &args.policy {
        Some(p) => Policy::load(p)?,
        None => Policy::default(),
    };
    let timeout = match args.timeout.as_deref().or(policy.timeout.as_deref()) {
        Some(t) => parse_duration(t)?,
        None => DEFAULT_TIMEOUT,
    };
    let settle = args
        .settle
        .as_deref()
        .or(policy.settle.as_deref())
        .map(parse_duration)
        .transpose()?;
    let checks = merge_checks(&policy, &args.checks, &args.ports);
    let deadline = t0 + timeout;

    let repo = repo::open_async(global).await?;
    let (snap_id, manifest) = resolve(&repo, &args.snapshot).await?;
    relocate::stored_domain_xml(&manifest)?;
    if manifest.disks.iter().any(|d| d.name == NVRAM_ENTRY) {
        return Err(Error::new(
            ErrorKind::Usage,
            "boot tests of VMs with UEFI variables (NVRAM) are not supported yet",
        ));
    }
    for d in &manifest.disks {
        if d.name.is_empty() || d.name.contains(['/', '?', '&']) || d.name.starts_with('.') {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("refusing disk name '{}'", d.name),
            ));
        }
    }
    let name = sandbox_name(&manifest.name, &snap_id.to_hex(), started);
    let say = |s: &str| {
        if !global.quiet && !global.json {
            eprintln!("{s}");
        }
    };
    say(&format!(
        "boot-testing {} ({}) as sandbox '{name}' (no network, throw-away overlays), limit {}s",
        manifest.name,
        snap_id.to_hex().get(..12).unwrap_or_default(),
        timeout.as_secs()
    ));
    let sandbox = Sandbox::create(&repo, &manifest, &args.connect, &args.work_dir, &name).await?;
    let mut notes: Vec<String> = sandbox
        .xml
        .removed
        .iter()
        .map(|r| format!("left out of the sandbox: {r}"))
        .collect();
    let dom = sandbox
        .dom()
        .ok_or_else(|| Error::new(ErrorKind::Other, "sandbox has no domain"))?;
    tracing::info!(
        "sandbox '{name}' running after {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    let obs = observe(
        &sandbox,
        &dom,
        &checks,
        t0,
        deadline,
        settle,
        sandbox.xml.agent_channel,
    )
    .await?;

    // Evidence, while the sandbox still runs.
    let console_tail = text_tail(
        &read_tail(&sandbox.console, CONSOLE_TAIL_BYTES * 2),
        CONSOLE_TAIL_BYTES,
    );
    let screenshot = if sandbox.xml.graphics {
        match screenshot(&dom).await {
            Ok(p) => Some(p),
            Err(e) => {
                notes.push(format!("no screenshot: {}", crate::error::format_chain(&e)));
                None
            }
        }
    } else {
        None
    };

    let mut result = BootTestResult {
        version: BootTestResult::VERSION,
        snapshot: snap_id,
        name: manifest.name.clone(),
        sandbox: name.clone(),
        hostname: super::hostname(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        started,
        finished: jiff::Timestamp::now(),
        verdict: obs.verdict,
        reason: obs.reason.clone(),
        rto_seconds: obs.rto,
        ready_seconds: obs.ready,
        readiness: obs.readiness.clone(),
        timeout_seconds: timeout.as_secs_f64(),
        checks: obs.checks,
        console_tail,
        screenshot_png: screenshot,
        notes,
    };

    let keep = args.keep_on_failure && result.verdict == Verdict::Fail;
    let mut kept = None;
    if keep {
        kept = Some((sandbox, dom));
    } else {
        drop(dom);
        let problems = sandbox.teardown().await;
        for p in &problems {
            tracing::warn!("teardown: {p}");
        }
        result
            .notes
            .extend(problems.into_iter().map(|p| format!("teardown: {p}")));
        result.finished = jiff::Timestamp::now();
    }

    let stored = if args.no_store {
        None
    } else {
        let r2 = repo.clone();
        let res = result.clone();
        Some(
            blocking(move || {
                r2.store_boot_test(&res)
                    .map_err(|e| repo_err(e, "cannot store the boot-test result"))
            })
            .await?,
        )
    };
    if let Some(path) = &args.report {
        write_report(path, &result, &manifest.time.to_string())?;
    }
    let text = summary(&result, args.report.as_deref());
    emit(
        global,
        &json!({
            "snapshot": snap_id.to_string(),
            "name": result.name,
            "sandbox": result.sandbox,
            "verdict": result.verdict,
            "reason": result.reason,
            "rto_seconds": result.rto_seconds,
            "ready_seconds": result.ready_seconds,
            "readiness": result.readiness,
            "timeout_seconds": result.timeout_seconds,
            "checks": result.checks,
            "screenshot": result.screenshot_png.is_some(),
            "console_tail": result.console_tail,
            "notes": result.notes,
            "result_id": stored.map(|s| s.to_string()),
            "report": args.report,
        }),
        &text,
    );
    if let Some((sandbox, _dom)) = kept {
        eprintln!(
            "keeping sandbox '{name}' for inspection (virsh -c {} console {name}; console log {}); press Ctrl-C to tear it down",
            args.connect,
            sandbox.console.display()
        );
        // Dropped (torn down) when the signal handler drops this future.
        std::future::pending::<()>().await;
    }
    match result.verdict {
        Verdict::Pass => Ok(()),
        Verdict::Fail => Err(Error::new(
            ErrorKind::BootTestFailed,
            format!("boot test of {} failed: {}", result.name, result.reason),
        )),
    }
}

fn summary(r: &BootTestResult, report: Option<&Path>) -> String {
    let mut t = format!(
        "boot test of {} ({}): {} — {}",
        r.name,
        r.snapshot.to_hex().get(..12).unwrap_or_default(),
        r.verdict.as_str().to_uppercase(),
        r.reason
    );
    if let Some(rto) = r.rto_seconds {
        t.push_str(&format!("\nRTO {rto:.1} s"));
    }
    for c in &r.checks {
        t.push_str(&format!(
            "\n  [{}] {}{}",
            if c.passed { "pass" } else { "FAIL" },
            c.name,
            match (c.passed, c.exit_code, &c.error) {
                (false, _, Some(e)) => format!(" ({e})"),
                (false, Some(code), _) => format!(" (exit {code})"),
                _ => String::new(),
            }
        ));
    }
    if let Some(p) = report {
        t.push_str(&format!("\nreport: {}", p.display()));
    }
    t
}

fn write_report(path: &Path, r: &BootTestResult, snapshot_time: &str) -> Result<()> {
    let html = report::render(r, Some(snapshot_time));
    let tmp = path.with_extension("html.tmp");
    std::fs::write(&tmp, html)
        .and_then(|_| std::fs::rename(&tmp, path))
        .ctx(ErrorKind::Target, || {
            format!("cannot write the report '{}'", path.display())
        })
}

/// The last `max` bytes of a file (empty if it does not exist).
fn read_tail(path: &Path, max: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(u64::try_from(max).unwrap_or(u64::MAX));
    let mut out = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.take(max as u64).read_to_end(&mut out);
    }
    out
}

fn console_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

async fn with_dom<T: Send + 'static>(
    dom: &SharedDom,
    f: impl FnOnce(&crate::libvirt::Dom) -> Result<T> + Send + 'static,
) -> Result<T> {
    let d = dom.clone();
    blocking(move || {
        let g = d
            .lock()
            .map_err(|_| Error::new(ErrorKind::Other, "libvirt handle lock poisoned"))?;
        f(&g)
    })
    .await
}

fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().chars().take(160).collect())
        .unwrap_or_else(|| "nothing on the console".into())
}

async fn observe(
    sandbox: &Sandbox,
    dom: &SharedDom,
    checks: &[Check],
    t0: Instant,
    deadline: Instant,
    settle: Option<Duration>,
    agent_channel: bool,
) -> Result<Observation> {
    let fail = |reason: String, ready: Option<f64>, readiness: Option<String>, checks| {
        Ok(Observation {
            verdict: Verdict::Fail,
            reason,
            rto: None,
            ready,
            readiness,
            checks,
        })
    };
    let mut results: Vec<CheckResult> = checks
        .iter()
        .map(|c| CheckResult {
            name: c.name(),
            check: c.kind(),
            passed: false,
            exit_code: None,
            signal: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            error: Some("not run: the guest did not come up".into()),
            attempts: 0,
            passed_after_seconds: None,
        })
        .collect();
    let limit = deadline.saturating_duration_since(t0).as_secs();

    // Phase 1: wait for the guest.
    let mut watch = ConsoleWatch::default();
    let readiness: &'static str = loop {
        let round = Instant::now();
        let active = with_dom(dom, |d| {
            d.is_active()
                .map_err(|e| Error::with_source(ErrorKind::Source, "cannot query the sandbox", e))
        })
        .await
        .unwrap_or(false);
        let text = text_tail(&read_tail(&sandbox.console, 64 * 1024), 64 * 1024);
        if !active {
            return fail(
                format!(
                    "the sandbox domain stopped during boot; console: {}",
                    last_line(&text)
                ),
                None,
                None,
                results,
            );
        }
        let signal = console_signal(&text);
        if let ConsoleSignal::Panic(line) = &signal {
            return fail(
                format!("the guest kernel panicked: {line}"),
                None,
                None,
                results,
            );
        }
        if agent_channel {
            let ok = with_dom(dom, |d| {
                Agent::new(LibvirtTransport(d))
                    .call_timeout(&GuestPing, PING_TIMEOUT)
                    .map_err(|e| Error::with_source(ErrorKind::Source, "guest-ping", e))
            })
            .await
            .is_ok();
            if ok {
                break "guest-agent";
            }
        } else if let Some(r) = watch.observe(
            t0.elapsed(),
            console_len(&sandbox.console),
            &signal,
            CONSOLE_QUIET,
        ) {
            break r;
        }
        if Instant::now() >= deadline {
            return fail(
                format!(
                    "the guest did not come up within {limit} s ({}); last console line: {}",
                    if agent_channel {
                        "no answer to guest-ping"
                    } else {
                        "no login prompt, console never went quiet"
                    },
                    last_line(&text)
                ),
                None,
                None,
                results,
            );
        }
        tokio::time::sleep(Duration::from_secs(1).saturating_sub(round.elapsed())).await;
    };
    let ready_at = t0.elapsed();
    let ready = Some(ready_at.as_secs_f64());
    let readiness_s = Some(readiness.to_string());
    tracing::info!(
        "guest up after {:.1} s ({readiness})",
        ready_at.as_secs_f64()
    );

    if checks.is_empty() {
        return Ok(Observation {
            verdict: Verdict::Pass,
            reason: format!("the guest came up ({readiness}); no checks were given"),
            rto: ready,
            ready,
            readiness: readiness_s,
            checks: results,
        });
    }
    if !agent_channel {
        for r in &mut results {
            r.error = Some("not run: the domain has no guest agent channel".into());
        }
        return fail(
            "checks need the QEMU guest agent, but the domain has no org.qemu.guest_agent.0 channel".into(),
            ready,
            readiness_s,
            results,
        );
    }
    for r in &mut results {
        r.error = None;
    }

    // Phase 2: checks, retried until they all pass.
    let end = match settle {
        Some(s) => deadline.min(Instant::now() + s),
        None => deadline,
    };
    loop {
        for (c, r) in checks.iter().zip(results.iter_mut()) {
            if r.passed {
                continue;
            }
            let remaining = end.saturating_duration_since(Instant::now());
            let to = CHECK_TIMEOUT.min(remaining).max(Duration::from_secs(1));
            let cmd = c.shell();
            let out = with_dom(dom, move |d| {
                Agent::new(LibvirtTransport(d))
                    .with_timeout_scale(AGENT_TIMEOUT_SCALE)
                    .exec("/bin/sh", &["-c", cmd.as_str()], to)
                    .map_err(|e| Error::with_source(ErrorKind::Source, "guest-exec", e))
            })
            .await;
            r.attempts += 1;
            match out {
                Ok(x) => {
                    r.passed = x.success();
                    r.exit_code = x.exit_code;
                    r.signal = x.signal;
                    r.stdout_tail = text_tail(&x.stdout, OUTPUT_TAIL_BYTES);
                    r.stderr_tail = text_tail(&x.stderr, OUTPUT_TAIL_BYTES);
                    r.error = None;
                    if r.passed {
                        r.passed_after_seconds = Some(t0.elapsed().as_secs_f64());
                    }
                }
                Err(e) => {
                    r.passed = false;
                    r.error = Some(crate::error::format_chain(&e).replace('\n', " "));
                }
            }
        }
        if results.iter().all(|r| r.passed) {
            let rto = t0.elapsed().as_secs_f64();
            return Ok(Observation {
                verdict: Verdict::Pass,
                reason: format!(
                    "all {} checks passed; guest up after {:.1} s ({readiness})",
                    results.len(),
                    ready_at.as_secs_f64()
                ),
                rto: Some(rto),
                ready,
                readiness: readiness_s,
                checks: results,
            });
        }
        let active = with_dom(dom, |d| {
            d.is_active()
                .map_err(|e| Error::with_source(ErrorKind::Source, "cannot query the sandbox", e))
        })
        .await
        .unwrap_or(false);
        if !active || Instant::now() + CHECK_RETRY >= end {
            let failing: Vec<String> = results
                .iter()
                .filter(|r| !r.passed)
                .map(|r| {
                    let why = match (&r.error, r.exit_code, &r.check) {
                        (Some(e), _, _) => e.clone(),
                        (None, _, repo_format::CheckKind::Port { .. }) => "not listening".into(),
                        (None, Some(c), _) => format!("exit {c}"),
                        (None, None, _) => "killed".into(),
                    };
                    format!("`{}` ({why})", r.name)
                })
                .collect();
            let n = failing.len();
            let head = if !active {
                "the sandbox domain stopped while checks were failing: ".to_string()
            } else if n == 1 {
                "check failed: ".to_string()
            } else {
                format!("{n} checks failed: ")
            };
            return fail(
                format!("{head}{}", failing.join("; ")),
                ready,
                readiness_s,
                results,
            );
        }
        tokio::time::sleep(CHECK_RETRY).await;
    }
}

async fn screenshot(dom: &SharedDom) -> Result<Vec<u8>> {
    let (data, mime) = with_dom(dom, |d| {
        d.screenshot(MAX_SCREENSHOT)
            .map_err(|e| Error::with_source(ErrorKind::Source, "cannot take a screenshot", e))
    })
    .await?;
    if data.starts_with(b"\x89PNG") {
        return Ok(data);
    }
    tracing::debug!(%mime, bytes = data.len(), "screenshot");
    blocking(move || image::ppm_to_png(&data)).await
}
