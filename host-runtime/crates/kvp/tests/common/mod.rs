//! Shared test helpers: a KVP core over temp directories and a fake kernel on a socketpair.
#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use hvisd_kvp::intrinsic::OsInfoSources;
use hvisd_kvp::ipinfo::NetConfig;
use hvisd_kvp::{KvpConfig, KvpCore, StoreOptions};
use hvisd_protocol::kvp_daemon::{self as dm, DAEMON_MSG_SIZE, DaemonMessage};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// A core whose pools, os-release and SET_IP_INFO output live under `dir`; the network facts
/// are this machine's.
pub fn core_in(dir: &Path) -> KvpCore {
    let os_release = dir.join("os-release");
    std::fs::write(&os_release, "NAME=\"Test OS\"\nVERSION_ID=\"42.1\"\n").unwrap();
    let config = KvpConfig {
        pool_dir: dir.join("pools"),
        store: StoreOptions::default(),
        os: OsInfoSources {
            os_release,
            fallback_release_files: vec![],
        },
        net: NetConfig {
            config_dir: dir.to_path_buf(),
            ..NetConfig::default()
        },
    };
    KvpCore::new(config).unwrap()
}

/// The kernel's end of a socketpair whose other end a KVP core serves.
pub struct FakeKernel {
    pub fd: OwnedFd,
    pub server: tokio::task::JoinHandle<
        Result<hvisd_kvp::kernel::SessionEnd, hvisd_kvp::kernel::KernelTransportError>,
    >,
}

impl FakeKernel {
    /// Starts serving `core`, reads its REGISTER1 and answers with version `"3.1"`.
    pub fn start(core: Arc<KvpCore>) -> FakeKernel {
        let (ours, kernel) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        rustix::io::ioctl_fionbio(&ours, true).unwrap();
        let server = tokio::spawn(hvisd_kvp::kernel::serve_fd(core, ours));
        let fk = FakeKernel { fd: kernel, server };
        let reg = fk.read();
        assert_eq!(
            reg[0], 100,
            "the daemon registers with KVP_OP_REGISTER1 first"
        );
        fk.write(&dm::build_register_reply("3.1"));
        fk
    }

    pub fn read(&self) -> Box<DaemonMessage> {
        let mut m = dm::zeroed();
        let n = rustix::io::read(&self.fd, &mut m[..]).unwrap();
        assert_eq!(n, DAEMON_MSG_SIZE);
        m
    }

    pub fn write(&self, m: &DaemonMessage) {
        assert_eq!(
            rustix::io::write(&self.fd, &m[..]).unwrap(),
            DAEMON_MSG_SIZE
        );
    }

    /// Sends one request and returns the daemon's reply.
    pub fn call(&self, m: &DaemonMessage) -> Box<DaemonMessage> {
        self.write(m);
        self.read()
    }
}

/// A record as the C daemon and cloud-init write it.
pub fn record(key: &str, value: &str) -> Vec<u8> {
    hvisd_kvp::Record::new(key.as_bytes(), value.as_bytes())
        .as_bytes()
        .to_vec()
}
