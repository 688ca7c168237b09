//! VSS on the kernel transport: `hvisd run --transport kernel` as a drop-in `hv_vss_daemon`,
//! against this test playing the kernel's `/dev/vmbus/hv_vss` on a Unix `SOCK_SEQPACKET` socket
//! (one message per read and write, as the char device frames them). The freezer is in dry-run
//! mode: this test checks the daemon protocol and the service behind it, not FIFREEZE (the
//! freeze-sandbox tests do that).

use std::os::fd::OwnedFd;
use std::time::Duration;

use hvisd_e2e::ChildGuard;
use hvisd_protocol::ic::status::{HV_E_FAIL, HV_S_OK};
use hvisd_protocol::vss::daemon::{self, DaemonWrite};
use hvisd_protocol::vss::{VSS_MSG_SIZE, VssOperation};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketType};

struct Kernel {
    listener: OwnedFd,
}

impl Kernel {
    /// Accepts the daemon's connection and completes its registration.
    fn accept(&self, daemon: &ChildGuard) -> OwnedFd {
        let mut poll = [rustix::event::PollFd::new(
            &self.listener,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: 30,
            tv_nsec: 0,
        };
        let ready = rustix::event::poll(&mut poll, Some(&timeout)).unwrap();
        assert_eq!(ready, 1, "hvisd did not connect:\n{}", daemon.stderr());
        let conn = rustix::net::accept(&self.listener).unwrap();
        rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(30)),
        )
        .unwrap();
        let msg = recv(&conn);
        assert_eq!(
            daemon::parse_daemon_write(&msg),
            Ok(DaemonWrite::Register(VssOperation::REGISTER1)),
            "the first message is not REGISTER1"
        );
        rustix::net::send(&conn, &daemon::build_version_reply(), SendFlags::empty()).unwrap();
        conn
    }
}

fn recv(conn: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let (n, _) = rustix::net::recv(conn, &mut buf, RecvFlags::empty()).unwrap();
    buf.truncate(n);
    buf
}

/// Sends one request as the kernel does and returns the daemon's `error`.
fn request(conn: &OwnedFd, op: VssOperation) -> u32 {
    rustix::net::send(conn, &daemon::build_request(op), SendFlags::empty()).unwrap();
    let reply = recv(conn);
    assert_eq!(reply.len(), VSS_MSG_SIZE, "reply size");
    match daemon::parse_daemon_write(&reply) {
        Ok(DaemonWrite::Reply { error, .. }) => error,
        other => panic!("not a reply: {other:?}"),
    }
}

#[test]
fn hvisd_answers_the_hv_vss_daemon_protocol_and_reopens_after_a_bad_message() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("hv_vss.sock");
    let listener = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
    rustix::net::bind(&listener, &SocketAddrUnix::new(&socket).unwrap()).unwrap();
    rustix::net::listen(&listener, 1).unwrap();
    let kernel = Kernel { listener };
    let config = dir.path().join("hvisd.toml");
    std::fs::write(
        &config,
        format!(
            "[services]\nkvp = false\n[vss]\ndevice = '{}'\njournal = '{}'\ndry_run = true\n",
            socket.display(),
            dir.path().join("vss-journal.json").display()
        ),
    )
    .unwrap();
    let daemon = ChildGuard::spawn_hvisd(&[
        "run",
        "--transport",
        "kernel",
        "--config",
        &config.display().to_string(),
    ]);
    let conn = kernel.accept(&daemon);
    assert_eq!(request(&conn, VssOperation::HOT_BACKUP), HV_S_OK);
    assert_eq!(request(&conn, VssOperation::FREEZE), HV_S_OK);
    // A second FREEZE while frozen fails; the first backup is still frozen.
    assert_eq!(request(&conn, VssOperation::FREEZE), HV_E_FAIL);
    assert_eq!(request(&conn, VssOperation::THAW), HV_S_OK);
    // A THAW with nothing frozen succeeds, as Linux answers it.
    assert_eq!(request(&conn, VssOperation::THAW), HV_S_OK);
    assert_eq!(request(&conn, VssOperation(200)), HV_S_OK);

    // A message of the wrong size: the daemon reopens the device and registers again.
    rustix::net::send(&conn, &[5u8, 0, 0], SendFlags::empty()).unwrap();
    let conn2 = kernel.accept(&daemon);
    assert_eq!(request(&conn2, VssOperation::FREEZE), HV_S_OK);
    assert_eq!(request(&conn2, VssOperation::THAW), HV_S_OK);
    drop(conn);

    let start = std::time::Instant::now();
    while daemon.log_count("vss backup report") < 2 && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = daemon.stderr();
    let reports: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| l.split("vss backup report ").nth(1))
        .map(|j| serde_json::from_str(j).unwrap())
        .collect();
    assert_eq!(reports.len(), 2, "{log}");
    for r in &reports {
        assert_eq!(r["outcome"], "thawed", "{r}");
        assert_eq!(r["backend"], "dry-run", "{r}");
    }
    assert!(log.contains("reopening"), "{log}");
}
