//! The self-contained HTML report of a boot test (inline CSS, the screenshot as a `data:` URI,
//! everything from the guest escaped): something an administrator attaches to an audit. Pure.

use base64::Engine as _;
use repo_format::{BootTestResult, CheckKind, Verdict};

/// HTML-escapes text (also quotes, so it is safe in attributes).
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |s| format!("{s:.1} s"))
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:70em;color:#1b1b1b;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.verdict{display:inline-block;padding:.25em .8em;border-radius:.3em;font-weight:bold;color:#fff}
.pass{background:#1e7b34}.fail{background:#b3261e}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #ddd;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4;width:14em}td.ok{color:#1e7b34;font-weight:bold}td.bad{color:#b3261e;font-weight:bold}
pre{background:#111;color:#e6e6e6;padding:.8em;overflow:auto;max-height:40em;font-size:.85em;white-space:pre-wrap;word-break:break-all}
code{background:#f4f4f4;padding:0 .2em}img{max-width:100%;border:1px solid #ccc}.muted{color:#666}";

/// Renders the report. `snapshot_time` is the backup's time (RFC 3339), if known.
pub fn render(r: &BootTestResult, snapshot_time: Option<&str>) -> String {
    let v = r.verdict.as_str();
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
    h.push_str(&format!(
        "<title>Boot test of {} — {}</title>\n<style>{CSS}</style></head><body>\n",
        html_escape(&r.name),
        v.to_uppercase()
    ));
    h.push_str(&format!(
        "<h1>Boot test of <code>{}</code></h1>\n<p><span class=\"verdict {v}\">{}</span> {}</p>\n",
        html_escape(&r.name),
        v.to_uppercase(),
        html_escape(&r.reason)
    ));
    let rto = match (r.verdict, r.rto_seconds) {
        (Verdict::Pass, Some(s)) => {
            format!("<b>{s:.1} s</b> (from the start of the test until every check passed)")
        }
        _ => "not reached".to_string(),
    };
    let rows: Vec<(&str, String)> = vec![
        ("Recovery time (RTO)", rto),
        (
            "Snapshot",
            format!(
                "<code>{}</code>{}",
                r.snapshot,
                snapshot_time
                    .map(|t| format!(" taken {}", html_escape(t)))
                    .unwrap_or_default()
            ),
        ),
        (
            "Sandbox domain",
            format!("<code>{}</code>", html_escape(&r.sandbox)),
        ),
        ("Host", html_escape(&r.hostname)),
        ("Started", html_escape(&r.started.to_string())),
        ("Finished", html_escape(&r.finished.to_string())),
        (
            "Guest up after",
            format!(
                "{}{}",
                secs(r.ready_seconds),
                r.readiness
                    .as_ref()
                    .map(|x| format!(" ({})", html_escape(x)))
                    .unwrap_or_default()
            ),
        ),
        ("Time limit", format!("{:.0} s", r.timeout_seconds)),
        ("Lifeboat", html_escape(&r.tool_version)),
    ];
    h.push_str("<h2>Summary</h2>\n<table>\n");
    for (k, val) in rows {
        h.push_str(&format!("<tr><th>{k}</th><td>{val}</td></tr>\n"));
    }
    h.push_str("</table>\n");
    if !r.notes.is_empty() {
        h.push_str("<ul>\n");
        for n in &r.notes {
            h.push_str(&format!("<li>{}</li>\n", html_escape(n)));
        }
        h.push_str("</ul>\n");
    }

    h.push_str("<h2>Checks</h2>\n");
    if r.checks.is_empty() {
        h.push_str("<p class=\"muted\">No checks: the verdict is about the boot alone.</p>\n");
    } else {
        h.push_str("<table>\n<tr><th>Check</th><th>Result</th><th>Exit</th><th>Attempts</th><th>Passed after</th><th>Output (tail)</th></tr>\n");
        for c in &r.checks {
            let what = match &c.check {
                CheckKind::Command { command } => format!("<code>{}</code>", html_escape(command)),
                CheckKind::Port { port } => format!("TCP port {port} listening"),
            };
            let (cls, res) = if c.passed {
                ("ok", "pass")
            } else {
                ("bad", "FAIL")
            };
            let exit = match (c.exit_code, c.signal) {
                (Some(e), _) => e.to_string(),
                (None, Some(s)) => format!("signal {s}"),
                _ => "—".into(),
            };
            let mut out = String::new();
            for (label, t) in [("stdout", &c.stdout_tail), ("stderr", &c.stderr_tail)] {
                if !t.trim().is_empty() {
                    out.push_str(&format!(
                        "<div class=\"muted\">{label}</div><pre>{}</pre>",
                        html_escape(t)
                    ));
                }
            }
            if let Some(e) = &c.error {
                out.push_str(&format!(
                    "<div class=\"muted\">error</div><pre>{}</pre>",
                    html_escape(e)
                ));
            }
            h.push_str(&format!(
                "<tr><td>{what}</td><td class=\"{cls}\">{res}</td><td>{exit}</td><td>{}</td><td>{}</td><td>{out}</td></tr>\n",
                c.attempts,
                secs(c.passed_after_seconds)
            ));
        }
        h.push_str("</table>\n");
    }

    if let Some(png) = &r.screenshot_png {
        h.push_str(&format!(
            "<h2>Screen</h2>\n<img alt=\"screenshot of the sandbox display\" src=\"data:image/png;base64,{}\">\n",
            base64::engine::general_purpose::STANDARD.encode(png)
        ));
    }
    h.push_str("<h2>Console (tail)</h2>\n");
    if r.console_tail.is_empty() {
        h.push_str("<p class=\"muted\">The guest printed nothing on its serial console.</p>\n");
    } else {
        h.push_str(&format!("<pre>{}</pre>\n", html_escape(&r.console_tail)));
    }
    h.push_str(&format!(
        "<p class=\"muted\">Generated by lifeboat boot-test on {}. The sandbox ran on throw-away overlays without network; the backup was not modified.</p>\n</body></html>\n",
        html_escape(&r.hostname)
    ));
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic in a test is a failure with a backtrace
mod tests {
    use super::*;
    use repo_format::{CheckResult, SnapshotId};

    #[test]
    fn report_escapes_and_embeds() {
        let t: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        let r = BootTestResult {
            version: 1,
            snapshot: SnapshotId::from_bytes([0xab; 32]),
            name: "web<1>".into(),
            sandbox: "lifeboat-boottest-web".into(),
            hostname: "h".into(),
            tool_version: "0.1.0".into(),
            started: t,
            finished: t,
            verdict: Verdict::Fail,
            reason: "check `test -s /x` failed".into(),
            rto_seconds: None,
            ready_seconds: Some(8.2),
            readiness: Some("guest-agent".into()),
            timeout_seconds: 60.0,
            checks: vec![CheckResult {
                name: "test -s /x".into(),
                check: CheckKind::Command {
                    command: "test -s /x && echo '<ok>'".into(),
                },
                passed: false,
                exit_code: Some(1),
                signal: None,
                stdout_tail: String::new(),
                stderr_tail: "</pre><script>alert(1)</script>".into(),
                error: None,
                attempts: 3,
                passed_after_seconds: None,
            }],
            console_tail: "boot <script>\nlogin: ".into(),
            screenshot_png: Some(vec![1, 2, 3]),
            notes: vec![],
        };
        let h = render(&r, Some("2026-01-01T00:00:00Z"));
        assert!(!h.contains("<script>"));
        assert!(h.contains("&lt;/pre&gt;&lt;script&gt;"));
        assert!(h.contains("data:image/png;base64,AQID"));
        assert!(h.contains("class=\"verdict fail\""));
        assert!(h.contains("web&lt;1&gt;"));
        assert!(h.contains("not reached"));
        assert!(h.contains("FAIL"));
    }
}
