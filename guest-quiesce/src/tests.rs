//! Unit tests: encoding, decoding, malformed replies, the client over a scripted transport and
//! the unix socket transport against a fake agent.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::*;
use crate::{Agent, ErrorKind, Transport, UnixSocketTransport};

#[test]
fn encodes_commands_without_arguments() {
    assert_eq!(
        encode_request(&GuestPing).unwrap(),
        r#"{"execute":"guest-ping"}"#
    );
    assert_eq!(
        encode_request(&GuestFsfreezeFreeze).unwrap(),
        r#"{"execute":"guest-fsfreeze-freeze"}"#
    );
    assert_eq!(
        encode_request(&GuestFsfreezeFreezeList { mountpoints: None }).unwrap(),
        r#"{"execute":"guest-fsfreeze-freeze-list"}"#
    );
}

#[test]
fn encodes_arguments() {
    let v: serde_json::Value =
        serde_json::from_str(&encode_request(&GuestSyncDelimited { id: 42 }).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"execute":"guest-sync-delimited","arguments":{"id":42}})
    );
    let v: serde_json::Value = serde_json::from_str(
        &encode_request(&GuestFsfreezeFreezeList {
            mountpoints: Some(vec!["/".into(), "/srv".into()]),
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/","/srv"]}})
    );
    let v: serde_json::Value = serde_json::from_str(
        &encode_request(&GuestExec::new("/bin/sh", &["-c", "cat"]).with_input(b"hi")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({"execute":"guest-exec","arguments":{
            "path":"/bin/sh","arg":["-c","cat"],"input-data":"aGk=","capture-output":true}})
    );
    let v: serde_json::Value =
        serde_json::from_str(&encode_request(&GuestExecStatus { pid: 7 }).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"execute":"guest-exec-status","arguments":{"pid":7}})
    );
}

#[test]
fn decodes_returns() {
    assert_eq!(
        decode_reply::<GuestPing>(r#"{"return":{}}"#).unwrap(),
        Empty {}
    );
    assert_eq!(
        decode_reply::<GuestFsfreezeStatus>("{\"return\":\"frozen\"}\n").unwrap(),
        FreezeStatus::Frozen
    );
    assert_eq!(
        decode_reply::<GuestFsfreezeStatus>(r#"{"return":"thawed"}"#).unwrap(),
        FreezeStatus::Thawed
    );
    assert_eq!(
        decode_reply::<GuestFsfreezeFreeze>(r#"{"return":2}"#).unwrap(),
        2
    );
    let info = decode_reply::<GuestInfo>(
        r#"{"return":{"version":"7.2.22","supported_commands":[
            {"enabled":true,"name":"guest-ping","success-response":true},
            {"enabled":false,"name":"guest-exec","success-response":true}]}}"#,
    )
    .unwrap();
    assert_eq!(info.version, "7.2.22");
    assert!(info.supports("guest-ping"));
    assert!(!info.supports("guest-exec"));
    let st = decode_reply::<GuestExecStatus>(
        r#"{"return":{"exitcode":3,"out-data":"aGkK","err-data":"","out-truncated":false,"exited":true}}"#,
    )
    .unwrap();
    assert!(st.exited);
    assert_eq!(st.exit_code, Some(3));
    assert_eq!(st.stdout().unwrap(), b"hi\n");
    assert_eq!(st.stderr().unwrap(), b"");
    let st = decode_reply::<GuestExecStatus>(r#"{"return":{"exited":false}}"#).unwrap();
    assert!(!st.exited);
    assert_eq!(st.stdout().unwrap(), b"");
    let fs = decode_reply::<GuestGetFsinfo>(
        r#"{"return":[{"name":"vda","mountpoint":"/mnt/vdb","type":"ext4","used-bytes":1,
            "total-bytes":2,"disk":[{"bus-type":"virtio","serial":"vdb","dev":"/dev/vda",
            "bus":0,"unit":0,"target":0,"pci-controller":{"domain":0,"bus":0,"slot":4,"function":0}}]}]}"#,
    )
    .unwrap();
    assert_eq!(fs.len(), 1);
    assert_eq!(fs[0].disk[0].serial.as_deref(), Some("vdb"));
}

#[test]
fn decodes_agent_errors() {
    let e = decode_reply::<GuestFsfreezeFreeze>(
        r#"{"error":{"class":"GenericError","desc":"failed to freeze /: Device or resource busy"}}"#,
    )
    .unwrap_err();
    assert_eq!(
        e.kind(),
        &ErrorKind::AgentError {
            class: "GenericError".into(),
            desc: "failed to freeze /: Device or resource busy".into()
        }
    );
    assert!(e.to_string().contains("guest-fsfreeze-freeze"));
}

#[test]
fn malformed_replies_are_protocol_errors() {
    for reply in [
        "",
        "   ",
        "not json",
        "{",
        "[]",
        "42",
        "null",
        r#"{}"#,
        r#"{"retrun":1}"#,
        r#"{"return":"melted"}"#,
        r#"{"return":-1}"#,
        r#"{"return":1e400}"#,
        r#"{"error":"x"}"#,
        r#"{"error":{"desc":"no class"}}"#,
        r#"{"error":{"class":7}}"#,
        "\u{ff}\u{fe}",
    ] {
        let e = decode_reply::<GuestFsfreezeFreeze>(reply).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Protocol, "reply {reply:?}: {e}");
    }
    for reply in [
        r#"{"return":{}}"#,
        r#"{"return":{"exited":"yes"}}"#,
        r#"{"return":{"exited":true,"exitcode":"0"}}"#,
        r#"{"return":{"exited":true,"exitcode":99999999999}}"#,
    ] {
        let e = decode_reply::<GuestExecStatus>(reply).unwrap_err();
        assert_eq!(e.kind(), &ErrorKind::Protocol, "reply {reply:?}: {e}");
    }
    let st =
        decode_reply::<GuestExecStatus>(r#"{"return":{"exited":true,"out-data":"!!!"}}"#).unwrap();
    assert_eq!(st.stdout().unwrap_err().kind(), &ErrorKind::Protocol);
    // Long garbage is cut in the message.
    let long = "x".repeat(10_000);
    let e = decode_reply::<GuestPing>(&long).unwrap_err();
    assert!(e.to_string().len() < 1000);
}

/// A transport that checks each request and answers from a script.
struct Scripted {
    steps: Mutex<VecDeque<(&'static str, crate::Result<String>)>>,
}

impl Scripted {
    fn new(steps: Vec<(&'static str, crate::Result<String>)>) -> Self {
        Scripted {
            steps: Mutex::new(steps.into()),
        }
    }
}

impl Transport for Scripted {
    fn execute(&self, request_json: &str, _timeout: Duration) -> crate::Result<String> {
        let (expect, reply) = self
            .steps
            .lock()
            .unwrap()
            .pop_front()
            .expect("unexpected call");
        let req: serde_json::Value = serde_json::from_str(request_json).unwrap();
        assert_eq!(req["execute"], expect, "request {request_json}");
        reply
    }
}

#[test]
fn agent_freeze_thaw_and_exec() {
    let t = Scripted::new(vec![
        ("guest-ping", Ok(r#"{"return":{}}"#.into())),
        ("guest-fsfreeze-freeze", Ok(r#"{"return":1}"#.into())),
        ("guest-fsfreeze-status", Ok(r#"{"return":"frozen"}"#.into())),
        ("guest-fsfreeze-freeze-list", Ok(r#"{"return":2}"#.into())),
        ("guest-fsfreeze-thaw", Ok(r#"{"return":1}"#.into())),
        ("guest-exec", Ok(r#"{"return":{"pid":12}}"#.into())),
        (
            "guest-exec-status",
            Ok(r#"{"return":{"exited":false}}"#.into()),
        ),
        (
            "guest-exec-status",
            Ok(r#"{"return":{"exited":true,"exitcode":0,"out-data":"b2sK"}}"#.into()),
        ),
    ]);
    let a = Agent::new(&t);
    a.ping().unwrap();
    assert_eq!(a.freeze(None).unwrap(), 1);
    assert_eq!(a.freeze_status().unwrap(), FreezeStatus::Frozen);
    assert_eq!(a.freeze(Some(&["/".to_string()])).unwrap(), 2);
    assert_eq!(a.thaw().unwrap(), 1);
    let r = a
        .exec("/bin/true", &[] as &[&str], Duration::from_secs(5))
        .unwrap();
    assert!(r.success());
    assert_eq!(r.stdout, b"ok\n");
    assert!(t.steps.lock().unwrap().is_empty());
}

#[test]
fn agent_exec_times_out() {
    let mut steps = vec![("guest-exec", Ok(r#"{"return":{"pid":1}}"#.to_string()))];
    for _ in 0..100 {
        steps.push((
            "guest-exec-status",
            Ok(r#"{"return":{"exited":false}}"#.into()),
        ));
    }
    let a = Agent::new(Scripted::new(steps));
    let e = a
        .exec("/bin/sleep", &["100"], Duration::from_millis(200))
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
}

#[test]
fn agent_passes_transport_errors() {
    let a = Agent::new(Scripted::new(vec![(
        "guest-ping",
        Err(crate::Error::new(ErrorKind::NotResponding, "no agent")),
    )]));
    let e = a.ping().unwrap_err();
    assert_eq!(e.kind(), &ErrorKind::NotResponding);
    assert!(e.to_string().starts_with("guest-ping: no agent"), "{e}");
}

/// A fake qemu-ga on a unix socket: answers guest-sync-delimited (with the 0xFF delimiter and,
/// first, some stale output), guest-ping and guest-fsfreeze-status; never answers guest-exec.
fn fake_agent(listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { return };
        std::thread::spawn(move || {
            let mut w = conn.try_clone().unwrap();
            let mut r = BufReader::new(conn);
            // Stale reply from an earlier session, which the client must skip.
            w.write_all(b"{\"return\":\"thawed\"}\n").unwrap();
            let mut line = Vec::new();
            while r.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let text: Vec<u8> = line.iter().copied().filter(|&b| b != 0xFF).collect();
                let v: serde_json::Value = match serde_json::from_slice(&text) {
                    Ok(v) => v,
                    Err(_) => {
                        line.clear();
                        continue;
                    }
                };
                let reply = match v["execute"].as_str() {
                    Some("guest-sync-delimited") => {
                        w.write_all(&[0xFF]).unwrap();
                        format!("{{\"return\":{}}}", v["arguments"]["id"])
                    }
                    Some("guest-ping") => r#"{"return":{}}"#.into(),
                    Some("guest-fsfreeze-status") => r#"{"return":"thawed"}"#.into(),
                    Some("guest-exec") => {
                        line.clear();
                        continue;
                    }
                    _ => r#"{"error":{"class":"CommandNotFound","desc":"nope"}}"#.into(),
                };
                w.write_all(reply.as_bytes()).unwrap();
                w.write_all(b"\n").unwrap();
                line.clear();
            }
        });
    }
}

#[test]
fn unix_transport_resyncs_and_recovers_from_timeouts() {
    let dir = tempfile_dir();
    let path = dir.join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || fake_agent(listener));
    let a = Agent::new(UnixSocketTransport::new(&path));
    a.ping().unwrap();
    assert_eq!(a.freeze_status().unwrap(), FreezeStatus::Thawed);
    let e = a
        .call_timeout(
            &GuestExec::new("/bin/true", &[] as &[&str]),
            Duration::from_millis(200),
        )
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    // Reconnects and resyncs after the timeout.
    a.ping().unwrap();
    let e = a.info().unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::AgentError { class, .. } if class == "CommandNotFound"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn unix_transport_reports_missing_socket() {
    let a = Agent::new(UnixSocketTransport::new("/nonexistent/qga.sock"));
    assert_eq!(a.ping().unwrap_err().kind(), &ErrorKind::NotResponding);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "guest-quiesce-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}
