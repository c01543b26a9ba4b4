//! Boot-test results (JSON plaintext, sealed as object kind 4, stored under
//! `boottests/<snapshot id>/<result id>`).
//!
//! A boot-test result records that a snapshot was brought up in an isolated sandbox and whether
//! its checks passed: the verdict, the recovery time (RTO), per-check results and the evidence
//! (console log tail, screenshot PNG). Storing it next to the snapshot lets any host see when a
//! snapshot was last proven restorable. Pure code: no I/O.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::id::SnapshotId;
use crate::magic;

/// Outcome of a boot test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// The guest came up and every check passed.
    Pass,
    /// The guest did not come up, a check failed, or the test timed out.
    Fail,
}

impl Verdict {
    /// `"pass"` or `"fail"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
        }
    }
}

/// What a check tested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum CheckKind {
    /// A shell command run in the guest (`/bin/sh -c COMMAND`); passes on exit code 0.
    Command {
        /// The command line.
        command: String,
    },
    /// A TCP port that must have a listening socket inside the guest.
    Port {
        /// The port.
        port: u16,
    },
}

/// Result of one check (its last attempt).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Display name (the command, or `port N`).
    pub name: String,
    /// What was checked.
    #[serde(flatten)]
    pub check: CheckKind,
    /// Whether the last attempt passed.
    pub passed: bool,
    /// Exit code of the last attempt, if the process exited normally.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Signal that killed the last attempt, if any.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Tail of the last attempt's standard output (lossy UTF-8).
    #[serde(default)]
    pub stdout_tail: String,
    /// Tail of the last attempt's standard error (lossy UTF-8).
    #[serde(default)]
    pub stderr_tail: String,
    /// Why the check could not run (agent error, timeout), if so.
    #[serde(default)]
    pub error: Option<String>,
    /// How many times it ran.
    #[serde(default)]
    pub attempts: u32,
    /// Seconds from the start of the boot test until it first passed.
    #[serde(default)]
    pub passed_after_seconds: Option<f64>,
}

/// A boot-test result. Unknown fields are ignored when reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootTestResult {
    /// Version of this JSON; this build writes and reads [`BootTestResult::VERSION`].
    pub version: u32,
    /// The snapshot that was tested.
    pub snapshot: SnapshotId,
    /// The snapshot's name (VM name).
    pub name: String,
    /// Name of the sandbox domain.
    pub sandbox: String,
    /// Host that ran the test.
    pub hostname: String,
    /// Version of the tool that ran the test.
    pub tool_version: String,
    /// When the test started.
    pub started: jiff::Timestamp,
    /// When the sandbox was torn down (or the test ended).
    pub finished: jiff::Timestamp,
    /// Pass or fail.
    pub verdict: Verdict,
    /// One line: why it failed, or what passed.
    pub reason: String,
    /// Seconds from the start until every check passed (pass only).
    #[serde(default)]
    pub rto_seconds: Option<f64>,
    /// Seconds from the start until the guest was seen up (agent or console), if it was.
    #[serde(default)]
    pub ready_seconds: Option<f64>,
    /// How readiness was detected: `guest-agent`, `console-login`, `console-quiet`, or null.
    #[serde(default)]
    pub readiness: Option<String>,
    /// The time limit, in seconds.
    #[serde(default)]
    pub timeout_seconds: f64,
    /// Per-check results, in the order they were given.
    #[serde(default)]
    pub checks: Vec<CheckResult>,
    /// Tail of the guest's serial console (lossy UTF-8, control characters removed).
    #[serde(default)]
    pub console_tail: String,
    /// Screenshot of the guest's display as PNG (base64 in the JSON), when it has graphics.
    #[serde(default, with = "b64_opt")]
    pub screenshot_png: Option<Vec<u8>>,
    /// Free-form notes (e.g. what was left out of the sandbox).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl BootTestResult {
    /// The version this build writes.
    pub const VERSION: u32 = magic::BOOT_TEST_VERSION;

    /// The plaintext encoding (compact JSON).
    pub fn encode(&self) -> Result<Vec<u8>> {
        if self.version != Self::VERSION {
            return Err(Error::invalid(format!(
                "cannot write boot-test result version {}; this build writes version {}",
                self.version,
                Self::VERSION
            )));
        }
        serde_json::to_vec(self).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                "cannot encode boot-test result",
                e,
            )
        })
    }

    /// Decodes the plaintext. A version other than 1 is [`ErrorKind::UnsupportedVersion`];
    /// anything else malformed is [`ErrorKind::Corrupt`].
    pub fn decode(bytes: &[u8]) -> Result<BootTestResult> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(|e| {
            Error::with_source(
                ErrorKind::Corrupt,
                "boot-test result has no valid version field",
                e,
            )
        })?;
        if v.version != Self::VERSION {
            return Err(Error::new(
                ErrorKind::UnsupportedVersion,
                format!("boot-test result version {} is not supported", v.version),
            ));
        }
        serde_json::from_slice(bytes)
            .map_err(|e| Error::with_source(ErrorKind::Corrupt, "boot-test result is malformed", e))
    }
}

mod b64_opt {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| {
            base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(snapshot: SnapshotId, started: &str) -> BootTestResult {
        let t: jiff::Timestamp = started.parse().unwrap();
        BootTestResult {
            version: BootTestResult::VERSION,
            snapshot,
            name: "web1".into(),
            sandbox: "lifeboat-boottest-web1-abcd1234-20240501T100000".into(),
            hostname: "host".into(),
            tool_version: "0.1.0".into(),
            started: t,
            finished: t,
            verdict: Verdict::Pass,
            reason: "all 2 checks passed".into(),
            rto_seconds: Some(12.5),
            ready_seconds: Some(8.0),
            readiness: Some("guest-agent".into()),
            timeout_seconds: 600.0,
            checks: vec![
                CheckResult {
                    name: "test -s /db".into(),
                    check: CheckKind::Command {
                        command: "test -s /db".into(),
                    },
                    passed: true,
                    exit_code: Some(0),
                    signal: None,
                    stdout_tail: String::new(),
                    stderr_tail: String::new(),
                    error: None,
                    attempts: 1,
                    passed_after_seconds: Some(12.0),
                },
                CheckResult {
                    name: "port 5432".into(),
                    check: CheckKind::Port { port: 5432 },
                    passed: true,
                    exit_code: Some(0),
                    signal: None,
                    stdout_tail: String::new(),
                    stderr_tail: String::new(),
                    error: None,
                    attempts: 2,
                    passed_after_seconds: Some(12.5),
                },
            ],
            console_tail: "login: ".into(),
            screenshot_png: Some(vec![0x89, b'P', b'N', b'G']),
            notes: vec![],
        }
    }

    #[test]
    fn round_trip_and_versions() {
        let r = sample(SnapshotId::from_bytes([1; 32]), "2024-05-01T10:00:00Z");
        let enc = r.encode().unwrap();
        let text = String::from_utf8(enc.clone()).unwrap();
        assert!(text.contains(r#""screenshot_png":"iVBORw==""#), "{text}");
        assert!(text.contains(r#""kind":"port","port":5432"#), "{text}");
        assert_eq!(BootTestResult::decode(&enc).unwrap(), r);

        let mut v: serde_json::Value = serde_json::from_slice(&enc).unwrap();
        v["future"] = serde_json::json!(1);
        assert_eq!(
            BootTestResult::decode(&serde_json::to_vec(&v).unwrap()).unwrap(),
            r
        );
        v["version"] = serde_json::json!(2);
        let e = BootTestResult::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnsupportedVersion);
        v["version"] = serde_json::json!(1);
        v["screenshot_png"] = serde_json::json!("not base64!");
        let e = BootTestResult::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(
            BootTestResult::decode(b"{}").unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }
}
