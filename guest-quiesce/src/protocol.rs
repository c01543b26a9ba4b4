//! The QEMU guest agent (QGA) protocol: typed commands, request encoding and reply decoding.
//! No I/O here; see [`crate::Agent`] for the client and [`crate::Transport`] for transports.
//!
//! Wire format (see `repo-format/FORMAT.md`, section 4): a request is one JSON object
//! `{"execute":"NAME","arguments":{…}}` (no `arguments` member for commands without
//! arguments); a reply is `{"return":VALUE}` or `{"error":{"class":"…","desc":"…"}}`.

use std::time::Duration;

use base64::Engine as _;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// The byte that `guest-sync-delimited` makes the agent emit before its reply, and that a client
/// sends before the sync request to make the agent's JSON parser discard partial input.
/// Fixed by the QGA protocol; do not modify.
pub const SYNC_DELIMITER: u8 = 0xFF;

/// A QGA command: its wire name, its arguments (the `Serialize` impl; a unit struct or an empty
/// struct means "no arguments"), the type of its `return` value and its default timeout.
pub trait Command: Serialize {
    /// The command name sent as `execute`.
    const NAME: &'static str;
    /// Default timeout for one call of this command.
    const TIMEOUT: Duration;
    /// Type of the `return` member of a successful reply.
    type Ok: DeserializeOwned;
}

/// The `return` value of commands that return an empty object (`guest-ping`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Empty {}

/// Encodes a request: `{"execute":NAME}` or `{"execute":NAME,"arguments":{…}}`.
pub fn encode_request<C: Command>(cmd: &C) -> Result<String> {
    let args = serde_json::to_value(cmd).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidArgument,
            format!("encoding arguments of {}", C::NAME),
            e,
        )
    })?;
    let mut req = serde_json::Map::new();
    req.insert("execute".into(), C::NAME.into());
    match args {
        serde_json::Value::Null => {}
        serde_json::Value::Object(ref m) if m.is_empty() => {}
        serde_json::Value::Object(_) => {
            req.insert("arguments".into(), args);
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("arguments of {} must serialize to a JSON object", C::NAME),
            ))
        }
    }
    Ok(serde_json::Value::Object(req).to_string())
}

/// Decodes a reply to `C`: the `return` value, or the agent's error as
/// [`ErrorKind::AgentError`]; anything else is [`ErrorKind::Protocol`].
pub fn decode_reply<C: Command>(reply: &str) -> Result<C::Ok> {
    decode_reply_value::<C::Ok>(C::NAME, reply)
}

fn decode_reply_value<T: DeserializeOwned>(name: &str, reply: &str) -> Result<T> {
    let v: serde_json::Value = serde_json::from_str(reply.trim()).map_err(|e| {
        Error::with_source(
            ErrorKind::Protocol,
            format!("reply to {name} is not JSON: {}", excerpt(reply)),
            e,
        )
    })?;
    let serde_json::Value::Object(mut obj) = v else {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("reply to {name} is not a JSON object: {}", excerpt(reply)),
        ));
    };
    if let Some(ret) = obj.remove("return") {
        return serde_json::from_value(ret).map_err(|e| {
            Error::with_source(
                ErrorKind::Protocol,
                format!("unexpected return value for {name}: {}", excerpt(reply)),
                e,
            )
        });
    }
    if let Some(err) = obj.get("error") {
        let class = err.get("class").and_then(|c| c.as_str());
        let desc = err.get("desc").and_then(|c| c.as_str());
        return match (class, desc) {
            (Some(class), desc) => Err(Error::new(
                ErrorKind::AgentError {
                    class: class.to_owned(),
                    desc: desc.unwrap_or_default().to_owned(),
                },
                format!("{name} failed"),
            )),
            _ => Err(Error::new(
                ErrorKind::Protocol,
                format!("malformed error reply to {name}: {}", excerpt(reply)),
            )),
        };
    }
    Err(Error::new(
        ErrorKind::Protocol,
        format!(
            "reply to {name} has neither \"return\" nor \"error\": {}",
            excerpt(reply)
        ),
    ))
}

/// At most 200 characters of `s`, for error messages.
fn excerpt(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// `guest-ping`: checks the agent is alive. Returns `{}`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestPing;
impl Command for GuestPing {
    const NAME: &'static str = "guest-ping";
    const TIMEOUT: Duration = Duration::from_secs(5);
    type Ok = Empty;
}

/// `guest-sync-delimited {id}`: the agent emits [`SYNC_DELIMITER`] then returns `id`. Used to
/// resynchronise a stream after a timeout or on connect.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestSyncDelimited {
    /// Arbitrary id echoed back; keep it below 2^53 so it survives JSON number handling.
    pub id: u64,
}
impl Command for GuestSyncDelimited {
    const NAME: &'static str = "guest-sync-delimited";
    const TIMEOUT: Duration = Duration::from_secs(5);
    type Ok = u64;
}

/// `guest-info`: agent version and supported commands.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestInfo;
impl Command for GuestInfo {
    const NAME: &'static str = "guest-info";
    const TIMEOUT: Duration = Duration::from_secs(5);
    type Ok = GuestInfoReply;
}

/// Reply of [`GuestInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestInfoReply {
    /// Agent version, e.g. `7.2.22`.
    pub version: String,
    /// Commands the agent knows.
    #[serde(rename = "supported_commands", default)]
    pub supported_commands: Vec<SupportedCommand>,
}

/// One entry of [`GuestInfoReply::supported_commands`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SupportedCommand {
    /// Command name.
    pub name: String,
    /// False when disabled by the guest's configuration (`--blacklist`/`--block-rpcs`).
    pub enabled: bool,
    /// False for commands that send no reply (`guest-shutdown`).
    #[serde(rename = "success-response", default)]
    pub success_response: bool,
}

impl GuestInfoReply {
    /// True when the agent supports `name` and it is enabled.
    pub fn supports(&self, name: &str) -> bool {
        self.supported_commands
            .iter()
            .any(|c| c.name == name && c.enabled)
    }
}

/// Freeze state of the guest's filesystems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    /// Filesystems are not frozen.
    Thawed,
    /// Filesystems are frozen (writes block in the guest).
    Frozen,
}

impl FreezeStatus {
    /// `"thawed"` or `"frozen"`, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FreezeStatus::Thawed => "thawed",
            FreezeStatus::Frozen => "frozen",
        }
    }
}

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestFsfreezeStatus;
impl Command for GuestFsfreezeStatus {
    const NAME: &'static str = "guest-fsfreeze-status";
    const TIMEOUT: Duration = Duration::from_secs(5);
    type Ok = FreezeStatus;
}

/// `guest-fsfreeze-freeze`: freezes every freezable filesystem; returns how many were frozen.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestFsfreezeFreeze;
impl Command for GuestFsfreezeFreeze {
    const NAME: &'static str = "guest-fsfreeze-freeze";
    const TIMEOUT: Duration = Duration::from_secs(60);
    type Ok = u32;
}

/// `guest-fsfreeze-freeze-list {mountpoints}`: freezes the listed mount points (all when
/// `mountpoints` is `None`); returns how many were frozen.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestFsfreezeFreezeList {
    /// Guest mount points, e.g. `["/", "/srv"]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mountpoints: Option<Vec<String>>,
}
impl Command for GuestFsfreezeFreezeList {
    const NAME: &'static str = "guest-fsfreeze-freeze-list";
    const TIMEOUT: Duration = Duration::from_secs(60);
    type Ok = u32;
}

/// `guest-fsfreeze-thaw`: thaws all frozen filesystems; returns how many were thawed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestFsfreezeThaw;
impl Command for GuestFsfreezeThaw {
    const NAME: &'static str = "guest-fsfreeze-thaw";
    const TIMEOUT: Duration = Duration::from_secs(30);
    type Ok = u32;
}

/// `guest-exec`: starts a process in the guest; returns its pid (poll with [`GuestExecStatus`]).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestExec {
    /// Absolute path of the program in the guest.
    pub path: String,
    /// Arguments (without argv\[0\]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arg: Option<Vec<String>>,
    /// Environment, `NAME=value` entries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Standard input, base64-encoded (see [`GuestExec::with_input`]).
    #[serde(rename = "input-data", skip_serializing_if = "Option::is_none")]
    pub input_data: Option<String>,
    /// Capture stdout and stderr (returned by `guest-exec-status`).
    #[serde(rename = "capture-output", skip_serializing_if = "Option::is_none")]
    pub capture_output: Option<bool>,
}
impl Command for GuestExec {
    const NAME: &'static str = "guest-exec";
    const TIMEOUT: Duration = Duration::from_secs(10);
    type Ok = GuestExecReply;
}

impl GuestExec {
    /// A command running `path` with `args`, capturing its output.
    pub fn new<S: AsRef<str>>(path: &str, args: &[S]) -> Self {
        GuestExec {
            path: path.to_owned(),
            arg: Some(args.iter().map(|a| a.as_ref().to_owned()).collect()),
            env: None,
            input_data: None,
            capture_output: Some(true),
        }
    }

    /// Sets the standard input (base64-encodes `data`).
    pub fn with_input(mut self, data: &[u8]) -> Self {
        self.input_data = Some(base64::engine::general_purpose::STANDARD.encode(data));
        self
    }
}

/// Reply of [`GuestExec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct GuestExecReply {
    /// Guest pid, the handle for [`GuestExecStatus`].
    pub pid: i64,
}

/// `guest-exec-status {pid}`: state of a process started by [`GuestExec`]. Once it reports
/// `exited`, the agent forgets the pid.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GuestExecStatus {
    /// Pid returned by [`GuestExec`].
    pub pid: i64,
}
impl Command for GuestExecStatus {
    const NAME: &'static str = "guest-exec-status";
    const TIMEOUT: Duration = Duration::from_secs(10);
    type Ok = GuestExecStatusReply;
}

/// Reply of [`GuestExecStatus`], as on the wire (output still base64-encoded; see
/// [`GuestExecStatusReply::stdout`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct GuestExecStatusReply {
    /// True once the process has exited.
    pub exited: bool,
    /// Exit code, when it exited normally.
    #[serde(rename = "exitcode", default)]
    pub exit_code: Option<i32>,
    /// Signal number, when it was killed by a signal.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Base64 stdout.
    #[serde(rename = "out-data", default)]
    pub out_data: Option<String>,
    /// Base64 stderr.
    #[serde(rename = "err-data", default)]
    pub err_data: Option<String>,
    /// The agent dropped stdout beyond its buffer limit.
    #[serde(rename = "out-truncated", default)]
    pub out_truncated: bool,
    /// The agent dropped stderr beyond its buffer limit.
    #[serde(rename = "err-truncated", default)]
    pub err_truncated: bool,
}

impl GuestExecStatusReply {
    /// Decoded stdout (empty when absent).
    pub fn stdout(&self) -> Result<Vec<u8>> {
        decode_b64(self.out_data.as_deref(), "out-data")
    }

    /// Decoded stderr (empty when absent).
    pub fn stderr(&self) -> Result<Vec<u8>> {
        decode_b64(self.err_data.as_deref(), "err-data")
    }
}

fn decode_b64(data: Option<&str>, what: &str) -> Result<Vec<u8>> {
    match data {
        None => Ok(Vec::new()),
        Some(s) => base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|e| {
                Error::with_source(
                    ErrorKind::Protocol,
                    format!("guest-exec-status {what} is not valid base64"),
                    e,
                )
            }),
    }
}

/// `guest-get-fsinfo`: the guest's mounted filesystems.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct GuestGetFsinfo;
impl Command for GuestGetFsinfo {
    const NAME: &'static str = "guest-get-fsinfo";
    const TIMEOUT: Duration = Duration::from_secs(10);
    type Ok = Vec<GuestFilesystemInfo>;
}

/// One entry of the [`GuestGetFsinfo`] reply (fields we use; others are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestFilesystemInfo {
    /// Guest device name, e.g. `vdb`.
    pub name: String,
    /// Mount point.
    pub mountpoint: String,
    /// Filesystem type, e.g. `ext4`.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Bytes used, when the agent reports it.
    #[serde(rename = "used-bytes", default)]
    pub used_bytes: Option<u64>,
    /// Total bytes, when the agent reports it.
    #[serde(rename = "total-bytes", default)]
    pub total_bytes: Option<u64>,
    /// Disks backing the filesystem.
    #[serde(default)]
    pub disk: Vec<GuestDiskAddress>,
}

/// A disk backing a filesystem in [`GuestFilesystemInfo`] (fields we use).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GuestDiskAddress {
    /// Bus type, e.g. `virtio`.
    #[serde(rename = "bus-type", default)]
    pub bus_type: Option<String>,
    /// Disk serial, when set.
    #[serde(default)]
    pub serial: Option<String>,
    /// Guest device node, e.g. `/dev/vdb`.
    #[serde(default)]
    pub dev: Option<String>,
}
