//! Hardening of the runtime's core, end to end against a real `hvisd run` process: a host that
//! floods the shm root with broken offers or truncates a ring under the guest, a local process that
//! sits on the pool locks, a `hv_set_ifconfig` that never returns or that a host tries to inject
//! into, a burst of host SETs with a `kill -9` in the middle, and SIGTERM on the kernel transport.
//!
//! Every path the daemon could touch (pools, ifcfg output, helper scripts, sysfs) is configured into
//! a temporary directory; every child process is killed by its own PID.

use hvisd_e2e::{ChildGuard, GuestProcess, HostProcess, transcript};
use hvisd_kvp::pool::RECORD_SIZE;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const HEARTBEAT_CLASS: &str = "57164f39-9115-4e78-ab55-382f3bd5422d";
/// A class no service of hvisd answers.
const UNKNOWN_CLASS: &str = "0d1e2f30-4152-6374-8596-a7b8c9dae0f1";
/// One direction of every ring the tests create: the control page and three data pages.
const RING_SIZE: u64 = 4 * 4096;
const KEY_FIELD: usize = 512;
const GUEST_POOL: &str = ".kvp_pool_1";

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// A GUID no other test object uses: random bits from the kernel, version 4.
fn fresh_guid() -> String {
    let mut bytes = [0u8; 16];
    let filled = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    assert_eq!(filled, Ok(16), "getrandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// The data directory of one guest: pools, ifcfg output, helper scripts and a fake sysfs, all in
/// one temporary directory, never the machine's own.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    /// `set_ifconfig_body` is the shell text of `hv_set_ifconfig` after its `#!/bin/sh` line;
    /// `kvp_extra` are more `[kvp]` lines.
    fn new(set_ifconfig_body: &str, kvp_extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = Self { dir };
        for sub in ["pools", "ifcfg", "sys-class-net"] {
            std::fs::create_dir_all(sandbox.path().join(sub)).unwrap();
        }
        sandbox.script("hv_set_ifconfig", set_ifconfig_body);
        sandbox.script("hv_get_dns_info", "echo 192.0.2.53\n");
        sandbox.script("hv_get_dhcp_info", "echo Disabled\n");
        let config = format!(
            "[kvp]\npool_dir = '{d}/pools'\nifcfg_dir = '{d}/ifcfg'\nsysfs_net_dir = '{d}/sys-class-net'\n\
             set_ifconfig = '{d}/hv_set_ifconfig'\nget_dns_info = '{d}/hv_get_dns_info'\n\
             get_dhcp_info = '{d}/hv_get_dhcp_info'\n{kvp_extra}\n",
            d = sandbox.path().display()
        );
        std::fs::write(sandbox.config(), config).unwrap();
        sandbox
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self) -> PathBuf {
        self.path().join("hvisd.toml")
    }

    fn pools(&self) -> PathBuf {
        self.path().join("pools")
    }

    fn ifcfg(&self) -> PathBuf {
        self.path().join("ifcfg")
    }

    fn script(&self, name: &str, body: &str) {
        let path = self.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }

    /// A netvsc-like adapter `eth7` whose `device/device_id` is `adapter_id`, in the fake sysfs.
    fn add_adapter(&self, adapter_id: &str) {
        let eth = self.path().join("sys-class-net/eth7");
        std::fs::create_dir_all(eth.join("device")).unwrap();
        std::fs::write(eth.join("device/device_id"), format!("{adapter_id}\n")).unwrap();
        std::fs::write(eth.join("address"), "00:15:5d:01:02:03\n").unwrap();
    }
}

/// Runs a host script to completion (killed after `timeout`) and returns what it printed. The
/// transcript goes to a file, so a script of thousands of actions cannot stall on a full pipe.
fn run_host(root: &Path, script_json: &str, timeout: Duration) -> std::process::Output {
    HostProcess::start(root, script_json).finish(timeout)
}

/// Fails the test if the guest has exited or panicked.
fn assert_guest_healthy(guest: &mut GuestProcess) {
    let log = guest.process.stderr();
    assert!(
        !log.contains("panicked"),
        "the guest panicked:\n{}",
        tail(&log, 60)
    );
    assert!(
        guest.process.is_running(),
        "the guest is no longer running:\n{}",
        tail(&log, 60)
    );
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The log lines that mention `needle`.
fn lines_naming<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// Polls `condition` every 20 ms for up to `timeout`.
fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_entries_ok(entries: &[Value], what: &str) {
    for e in entries {
        assert_eq!(e["ok"], true, "{what}: action failed: {e}");
    }
}

fn elapsed(entry: &Value) -> Duration {
    Duration::from_micros(entry["elapsed_us"].as_u64().unwrap_or(u64::MAX))
}

/// A non-blocking Unix `SOCK_SEQPACKET` socket listening at `path`, as a host's doorbell.
fn seqpacket_listener(path: &Path) -> OwnedFd {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::bind(&fd, &SocketAddrUnix::new(path).unwrap()).unwrap();
    rustix::net::listen(&fd, 16).unwrap();
    fd
}

/// Whether a peer has connected to the non-blocking listener `fd` (a connection that was closed
/// since still counts: it waits in the backlog).
fn was_connected(fd: &OwnedFd) -> bool {
    rustix::net::accept(fd).is_ok()
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

/// State of process `pid` from `/proc/PID/stat`: `(state, parent pid)`, `None` if there is none.
fn proc_state(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may contain spaces and parentheses; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The records of a pool file: `(key, value)` as NUL-terminated UTF-8, in file order.
fn read_pool(path: &Path) -> (usize, Vec<(String, String)>) {
    let bytes = std::fs::read(path).unwrap_or_default();
    let text = |field: &[u8]| {
        let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
        String::from_utf8_lossy(&field[..end]).into_owned()
    };
    let records = bytes
        .chunks_exact(RECORD_SIZE)
        .map(|r| (text(&r[..KEY_FIELD]), text(&r[KEY_FIELD..])))
        .collect();
    (bytes.len(), records)
}

// ---------------------------------------------------------------------------------------------
// 1. Two hundred offer directories, a third of them malformed
// ---------------------------------------------------------------------------------------------

/// One way an offer directory can be broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    GarbageBytes,
    NotKeyValue,
    NoClassId,
    NoInstanceId,
    NoRingSize,
    RingSizeNotPageMultiple,
    RingSizeTooSmall,
    RingSizeNotANumber,
    RingSizeOverflows,
    DuplicateKey,
    ClassIdNotAGuid,
    InstanceIdOfAnotherDirectory,
    DirectoryNameNotAGuid,
    DirectorySymlink,
    RingTooShort,
    RingEmpty,
    RingMissing,
    RingSymlink,
    RingDirectory,
    RingFifo,
    DoorbellRegularFile,
    DoorbellMissing,
    DoorbellStreamSocket,
    OfferFifo,
    OfferDirectory,
    OfferHuge,
    OfferEmpty,
    UnknownClass,
}

/// Every kind but [`Broken::DirectorySymlink`], which has a test of its own.
const ALL_BROKEN: [Broken; 27] = [
    Broken::GarbageBytes,
    Broken::NotKeyValue,
    Broken::NoClassId,
    Broken::NoInstanceId,
    Broken::NoRingSize,
    Broken::RingSizeNotPageMultiple,
    Broken::RingSizeTooSmall,
    Broken::RingSizeNotANumber,
    Broken::RingSizeOverflows,
    Broken::DuplicateKey,
    Broken::ClassIdNotAGuid,
    Broken::InstanceIdOfAnotherDirectory,
    Broken::DirectoryNameNotAGuid,
    Broken::RingTooShort,
    Broken::RingEmpty,
    Broken::RingMissing,
    Broken::RingSymlink,
    Broken::RingDirectory,
    Broken::RingFifo,
    Broken::DoorbellRegularFile,
    Broken::DoorbellMissing,
    Broken::DoorbellStreamSocket,
    Broken::OfferFifo,
    Broken::OfferDirectory,
    Broken::OfferHuge,
    Broken::OfferEmpty,
    Broken::UnknownClass,
];

/// An offer directory the test made: its name and, when it has one, the listening doorbell (to
/// prove later that the guest never connected to it).
struct MadeOffer {
    name: String,
    broken: Option<Broken>,
    doorbell: Option<OwnedFd>,
}

/// Creates `root/<name>/` in the spec's order (ring, doorbell, then `offer` by rename), broken in
/// the way `broken` says, or a complete heartbeat offer when `broken` is `None`. `outside` holds
/// symlink targets, outside the root.
fn make_offer_dir(root: &Path, outside: &Path, broken: Option<Broken>) -> MadeOffer {
    use Broken::*;
    let instance = fresh_guid();
    let name = if broken == Some(DirectoryNameNotAGuid) {
        format!("not-a-guid-{}", &fresh_guid()[..8])
    } else {
        instance.clone()
    };
    // A symlinked offer directory is complete, but lives outside the root.
    let dir = match broken {
        Some(DirectorySymlink) => outside.join(&name),
        _ => root.join(&name),
    };
    std::fs::create_dir(&dir).unwrap();
    let ring = dir.join("ring");
    let sized = |path: &Path, len: u64| {
        std::fs::File::create(path).unwrap().set_len(len).unwrap();
    };
    match broken {
        Some(RingTooShort) => sized(&ring, RING_SIZE),
        Some(RingEmpty) => sized(&ring, 0),
        Some(RingMissing) => {}
        Some(RingSymlink) => {
            let target = outside.join(format!("{name}.ring"));
            sized(&target, 2 * RING_SIZE);
            std::os::unix::fs::symlink(&target, &ring).unwrap();
        }
        Some(RingDirectory) => std::fs::create_dir(&ring).unwrap(),
        Some(RingFifo) => mkfifo(&ring),
        _ => sized(&ring, 2 * RING_SIZE),
    }
    let doorbell_path = dir.join("doorbell");
    let doorbell = match broken {
        Some(DoorbellRegularFile) => {
            std::fs::write(&doorbell_path, b"not a socket").unwrap();
            None
        }
        Some(DoorbellMissing) => None,
        Some(DoorbellStreamSocket) => {
            let listener = std::os::unix::net::UnixListener::bind(&doorbell_path).unwrap();
            listener.set_nonblocking(true).unwrap();
            Some(OwnedFd::from(listener))
        }
        _ => Some(seqpacket_listener(&doorbell_path)),
    };
    let class = if broken == Some(UnknownClass) {
        UNKNOWN_CLASS
    } else {
        HEARTBEAT_CLASS
    };
    let good = |class: &str, instance: &str, ring: &str| {
        format!("class_id={class}\ninstance_id={instance}\nring_size={ring}\n")
    };
    let text: Vec<u8> = match broken {
        Some(GarbageBytes) => b"\xff\xfe\x00\x01class_id\x80\x81=\xc3\x28\n\x00\x00garbage\xf0\x9f"
            .iter()
            .copied()
            .cycle()
            .take(700)
            .collect(),
        Some(NotKeyValue) => b"this is not an offer\njust words\n".to_vec(),
        Some(NoClassId) => format!("instance_id={instance}\nring_size={RING_SIZE}\n").into_bytes(),
        Some(NoInstanceId) => format!("class_id={class}\nring_size={RING_SIZE}\n").into_bytes(),
        Some(NoRingSize) => format!("class_id={class}\ninstance_id={instance}\n").into_bytes(),
        Some(RingSizeNotPageMultiple) => good(class, &instance, "10000").into_bytes(),
        Some(RingSizeTooSmall) => good(class, &instance, "4096").into_bytes(),
        Some(RingSizeNotANumber) => good(class, &instance, "lots").into_bytes(),
        Some(RingSizeOverflows) => good(class, &instance, "99999999999999999999").into_bytes(),
        Some(DuplicateKey) => format!(
            "{}ring_size=8192\n",
            good(class, &instance, &RING_SIZE.to_string())
        )
        .into_bytes(),
        Some(ClassIdNotAGuid) => good("heartbeat", &instance, &RING_SIZE.to_string()).into_bytes(),
        Some(InstanceIdOfAnotherDirectory) => {
            good(class, &fresh_guid(), &RING_SIZE.to_string()).into_bytes()
        }
        Some(OfferHuge) => vec![b'x'; 1 << 20],
        Some(OfferEmpty) => Vec::new(),
        _ => good(class, &instance, &RING_SIZE.to_string()).into_bytes(),
    };
    let offer = dir.join("offer");
    match broken {
        Some(OfferFifo) => mkfifo(&offer),
        Some(OfferDirectory) => std::fs::create_dir(&offer).unwrap(),
        _ => {
            let tmp = dir.join(".offer.tmp");
            std::fs::write(&tmp, &text).unwrap();
            std::fs::rename(&tmp, &offer).unwrap();
        }
    }
    if broken == Some(DirectorySymlink) {
        std::os::unix::fs::symlink(&dir, root.join(&name)).unwrap();
    }
    MadeOffer {
        name,
        broken,
        doorbell,
    }
}

#[test]
fn among_two_hundred_offers_each_malformed_one_is_logged_once_and_every_valid_one_answers() {
    const VALID: usize = 130;
    const MALFORMED: usize = 66;
    const TRANSIENT: usize = 24;
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let root_path = root.path().to_owned();

    // Half of the broken offers are there before the guest starts, the rest appear while it runs.
    let mut malformed: Vec<MadeOffer> = (0..MALFORMED / 2)
        .map(|i| {
            make_offer_dir(
                &root_path,
                outside.path(),
                Some(ALL_BROKEN[i % ALL_BROKEN.len()]),
            )
        })
        .collect();
    let mut guest = GuestProcess::start_shm(root.path());

    let late = std::thread::scope(|scope| {
        // More broken offers, created while the host offers its channels.
        let late = scope.spawn(|| {
            (MALFORMED / 2..MALFORMED)
                .map(|i| {
                    std::thread::sleep(Duration::from_millis(15));
                    make_offer_dir(
                        &root_path,
                        outside.path(),
                        Some(ALL_BROKEN[i % ALL_BROKEN.len()]),
                    )
                })
                .collect::<Vec<_>>()
        });
        // Offers that appear and vanish while heartbeats flow: half broken, half complete.
        let churn = scope.spawn(|| {
            let mut gone = Vec::new();
            for i in 0..TRANSIENT {
                let broken = i
                    .is_multiple_of(2)
                    .then(|| ALL_BROKEN[(i / 2 * 5 + 3) % ALL_BROKEN.len()]);
                let made = make_offer_dir(&root_path, outside.path(), broken);
                std::thread::sleep(Duration::from_millis(40 + (i as u64 % 3) * 30));
                std::fs::remove_dir_all(root_path.join(&made.name)).unwrap();
                gone.push(made);
                std::thread::sleep(Duration::from_millis(40));
            }
            gone
        });
        let mut actions = Vec::new();
        for i in 0..VALID {
            actions
                .push(json!({"action": "offer", "service": "heartbeat", "name": format!("hb{i}")}));
        }
        for round in 0..3u64 {
            for i in 0..VALID {
                actions.push(
                    json!({"action": "heartbeat", "name": format!("hb{i}"), "count": 2,
                                    "sequence": round * 1000 + i as u64 * 2}),
                );
            }
            actions.push(json!({"action": "sleep", "ms": 300}));
        }
        let script = json!({"timeout_ms": 20000, "actions": actions}).to_string();
        let out = run_host(&root_path, &script, Duration::from_secs(300));
        let entries = transcript(&out);
        assert_entries_ok(&entries, "host with 130 heartbeat channels");
        assert_eq!(entries.len(), VALID + 3 * VALID + 3);
        let _transient = churn.join().unwrap();
        late.join().unwrap()
    });
    malformed.extend(late);
    assert_guest_healthy(&mut guest);
    assert!(
        guest.process.log_count("channel opened") >= VALID,
        "fewer than {VALID} channels opened:\n{}",
        tail(&guest.process.stderr(), 40)
    );

    let logged_once = |log: &str| -> Vec<String> {
        malformed
            .iter()
            .filter_map(|m| {
                let lines = lines_naming(log, &m.name);
                (lines.len() != 1).then(|| {
                    format!(
                        "{:?} ({}): {} lines {:?}",
                        m.broken,
                        m.name,
                        lines.len(),
                        lines
                    )
                })
            })
            .collect()
    };
    // Every broken offer that stays is reported, once, naming its directory (the last ones may
    // have appeared only just now).
    wait_until(Duration::from_secs(15), || {
        let log = guest.process.stderr();
        malformed.iter().all(|m| log.contains(&m.name))
    });
    let log = guest.process.stderr();
    let wrong = logged_once(&log);
    assert!(
        wrong.is_empty(),
        "{} broken offers not logged exactly once:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Many seconds and many rescans later (offers come and go), still once each. Meanwhile one
    // more directory keeps swapping its `offer` between a FIFO and garbage: a scan that opened
    // the FIFO blocking would stall every later offer.
    let swap = make_offer_dir(root.path(), outside.path(), Some(Broken::NotKeyValue));
    let swap_dir = root.path().join(&swap.name);
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 2000 {
                let next = swap_dir.join(format!(".swap{n}"));
                if n.is_multiple_of(2) {
                    mkfifo(&next);
                } else {
                    std::fs::write(&next, b"garbage\n").unwrap();
                }
                std::fs::rename(&next, swap_dir.join("offer")).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        for n in 0..3 {
            let out = run_host(
                root.path(),
                &json!([
                    {"action": "offer", "service": "heartbeat", "name": "poke"},
                    {"action": "heartbeat", "name": "poke", "sequence": n},
                    {"action": "rescind", "name": "poke"},
                    {"action": "sleep", "ms": 1500}
                ])
                .to_string(),
                Duration::from_secs(60),
            );
            assert_entries_ok(&transcript(&out), "offers beside the swapping FIFO");
        }
        stop.store(true, Ordering::Relaxed);
    });
    let log = guest.process.stderr();
    let wrong = logged_once(&log);
    assert!(
        wrong.is_empty(),
        "after many seconds, {} broken offers not logged exactly once:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // The guest never opened a broken offer: nobody connected to their doorbells.
    let connected: Vec<String> = malformed
        .iter()
        .filter(|m| m.doorbell.as_ref().is_some_and(was_connected))
        .map(|m| format!("{:?} ({})", m.broken, m.name))
        .collect();
    assert!(
        connected.is_empty(),
        "the guest connected to the doorbell of broken offers: {connected:?}"
    );
    assert_guest_healthy(&mut guest);
}

#[test]
fn a_symlinked_offer_directory_is_never_opened_and_is_reported_once() {
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    // Complete heartbeat offers, but their directories are symlinks to a place outside the root:
    // one there before the guest starts, one appearing while it runs.
    let early = make_offer_dir(root.path(), outside.path(), Some(Broken::DirectorySymlink));
    let mut guest = GuestProcess::start_shm(root.path());
    let late = make_offer_dir(root.path(), outside.path(), Some(Broken::DirectorySymlink));
    // Real offers before and after prove the scans ran past the symlinks.
    for n in 0..3 {
        let out = run_host(
            root.path(),
            &json!([
                {"action": "offer", "service": "heartbeat", "name": "real"},
                {"action": "heartbeat", "name": "real", "sequence": n},
                {"action": "rescind", "name": "real"},
                {"action": "sleep", "ms": 500}
            ])
            .to_string(),
            Duration::from_secs(60),
        );
        assert_entries_ok(&transcript(&out), "offers beside the symlinked directories");
    }
    for made in [&early, &late] {
        assert!(
            !made.doorbell.as_ref().is_some_and(was_connected),
            "the guest opened the offer behind the symlink {}",
            made.name
        );
    }
    let log = guest.process.stderr();
    for made in [&early, &late] {
        let lines = lines_naming(&log, &made.name);
        assert_eq!(
            lines.len(),
            1,
            "the symlinked offer directory {} is not reported exactly once: {lines:?}",
            made.name
        );
    }
    assert_guest_healthy(&mut guest);
}

// ---------------------------------------------------------------------------------------------
// 2. A ring file truncated under the guest
// ---------------------------------------------------------------------------------------------

/// A host written against the library: offers a heartbeat channel with this instance id and
/// returns its end once the guest has connected. Only its doorbell is used after a truncation.
async fn offer_heartbeat(root: &Path, instance: &str) -> hvisd::channel::Channel {
    let offer = hvisd::offer::Offer {
        class_id: HEARTBEAT_CLASS.parse().unwrap(),
        instance_id: instance.parse().unwrap(),
        ring_size: RING_SIZE as u32,
        pipe: hvisd::offer::PipeMode::Message,
        conn_from_host: None,
    };
    let published = hvisd::transport::shm_host::publish_offer(root, &offer).unwrap();
    published
        .accept(Duration::from_secs(30), "test host")
        .await
        .unwrap()
}

/// An in-band packet of 32 zero bytes as it sits in a data area at offset 0: descriptor (offset8
/// 2, len8 6), payload, then the trailer.
fn packet_at_zero() -> Vec<u8> {
    let mut packet = vec![0u8; 56];
    packet[0..2].copy_from_slice(&6u16.to_le_bytes());
    packet[2..4].copy_from_slice(&2u16.to_le_bytes());
    packet[4..6].copy_from_slice(&6u16.to_le_bytes());
    packet[8..16].copy_from_slice(&1u64.to_le_bytes());
    packet
}

#[test]
fn a_ring_file_truncated_by_the_host_closes_and_reports_only_that_channel() {
    use std::os::unix::fs::FileExt;
    let root = tempfile::tempdir().unwrap();
    let mut guest = GuestProcess::start_shm(root.path());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Two channels that keep answering heartbeats through everything below.
    let mut steady_actions = vec![
        json!({"action": "offer", "service": "heartbeat", "name": "steady1"}),
        json!({"action": "offer", "service": "heartbeat", "name": "steady2"}),
    ];
    for i in 0..50u64 {
        steady_actions.push(json!({"action": "heartbeat", "name": "steady1", "sequence": i * 10}));
        steady_actions.push(json!({"action": "heartbeat", "name": "steady2", "sequence": i * 10}));
        steady_actions.push(json!({"action": "sleep", "ms": 150}));
    }
    let steady = HostProcess::start(root.path(), &Value::Array(steady_actions).to_string());
    assert!(
        wait_until(Duration::from_secs(30), || guest
            .process
            .log_count("channel opened")
            >= 2),
        "the steady channels did not open:\n{}",
        guest.process.stderr()
    );

    // The simulator's truncate_ring, after traffic; then a new channel still opens and answers.
    let scripted = fresh_guid();
    let out = run_host(
        root.path(),
        &json!([
            {"action": "offer", "service": "heartbeat", "name": "t0", "instance_id": scripted},
            {"action": "heartbeat", "name": "t0", "count": 3},
            {"action": "truncate_ring", "name": "t0", "len": 0},
            {"action": "offer", "service": "heartbeat", "name": "after"},
            {"action": "heartbeat", "name": "after", "count": 3, "sequence": 500}
        ])
        .to_string(),
        Duration::from_secs(120),
    );
    assert_entries_ok(&transcript(&out), "host truncating its ring");

    // Hosts that keep their doorbell connection open, so that only the truncation can make the
    // guest close: the whole file gone, then only the data area under a packet the guest has not
    // read yet (its control page, with the new write_index, still in the file).
    let (whole, data_area) = (fresh_guid(), fresh_guid());
    let mut held = Vec::new();
    for (id, len) in [(&whole, 0), (&data_area, RING_SIZE + 2048)] {
        let mut channel = runtime.block_on(offer_heartbeat(root.path(), id));
        let ring = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(root.path().join(id).join("ring"))
            .unwrap();
        if len > 0 {
            ring.write_all_at(&packet_at_zero(), RING_SIZE + 4096)
                .unwrap();
        }
        ring.set_len(len).unwrap();
        if len > 0 {
            // Published only now: the guest can find the packet only where the file has no pages.
            ring.write_all_at(&56u32.to_le_bytes(), RING_SIZE).unwrap();
        }
        channel.notify_peer().unwrap();
        held.push(channel);
    }

    // A host in a heartbeat loop whose ring file is truncated while packets flow (that host may
    // well die of its own broken mapping; the guest must not).
    let busy_id = fresh_guid();
    let busy = HostProcess::start(
        root.path(),
        &json!([
            {"action": "offer", "service": "heartbeat", "name": "busy", "instance_id": busy_id},
            {"action": "heartbeat", "name": "busy", "count": 1_000_000}
        ])
        .to_string(),
    );
    assert!(
        wait_until(Duration::from_secs(30), || lines_naming(
            &guest.process.stderr(),
            &busy_id
        )
        .iter()
        .any(|l| l.contains("channel opened"))),
        "the busy channel did not open"
    );
    std::thread::sleep(Duration::from_millis(300));
    std::fs::OpenOptions::new()
        .write(true)
        .open(root.path().join(&busy_id).join("ring"))
        .unwrap()
        .set_len(0)
        .unwrap();

    // Each channel is closed (its ring no longer mapped) and reported; the held ones for what
    // happened to their ring, since their host never closed.
    let maps = format!("/proc/{}/maps", guest.process.pid());
    for (what, id, host_open) in [
        ("simulator truncate_ring", &scripted, false),
        ("whole file, host still connected", &whole, true),
        (
            "data area under a pending packet, host still connected",
            &data_area,
            true,
        ),
        ("mid-traffic", &busy_id, false),
    ] {
        let closed_line = |log: &str| {
            lines_naming(log, id)
                .into_iter()
                .find(|l| l.contains("closed"))
                .map(str::to_owned)
        };
        let reported = wait_until(Duration::from_secs(15), || {
            closed_line(&guest.process.stderr()).is_some()
        });
        let log = guest.process.stderr();
        assert!(
            reported,
            "{what}: no report that channel {id} was closed:\n{}",
            lines_naming(&log, id).join("\n")
        );
        if host_open {
            let line = closed_line(&log).unwrap_or_default();
            assert!(
                !line.contains("host closed"),
                "{what}: the guest blames the host, which is still connected: {line}"
            );
        }
        let ring = format!("{id}/ring");
        let unmapped = wait_until(Duration::from_secs(15), || {
            !std::fs::read_to_string(&maps)
                .unwrap_or_default()
                .contains(&ring)
        });
        assert!(
            unmapped,
            "{what}: the guest still maps the truncated ring {ring}"
        );
    }
    drop(held);
    drop(busy);

    let entries = transcript(&steady.finish(Duration::from_secs(120)));
    assert_entries_ok(&entries, "steady heartbeats during the truncations");
    for e in entries.iter().filter(|e| e["action"] == "heartbeat") {
        for round in e["rounds"].as_array().unwrap() {
            let rtt = round["rtt_us"].as_u64().unwrap();
            assert!(rtt < 1_000_000, "a steady heartbeat took {rtt} us: {e}");
        }
    }
    assert_guest_healthy(&mut guest);
}

// ---------------------------------------------------------------------------------------------
// 3. A local process sitting on the Guest pool's locks
// ---------------------------------------------------------------------------------------------

/// Holds `flock(LOCK_EX)` and an fcntl write lock on the pool file, appends one record while it
/// holds them (as a well-behaved writer does), says `locked PID`, and releases when told (a line or
/// EOF on stdin); it gives up by itself after two minutes.
const LOCKER: &str = r#"
import fcntl, os, signal, sys
signal.alarm(120)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_APPEND)
fcntl.flock(fd, fcntl.LOCK_EX)
fcntl.lockf(fd, fcntl.LOCK_EX)
os.write(fd, b"locker-key".ljust(512, b"\0") + b"locker-value".ljust(2048, b"\0"))
os.fsync(fd)
print("locked", os.getpid(), flush=True)
sys.stdin.readline()
fcntl.lockf(fd, fcntl.LOCK_UN)
fcntl.flock(fd, fcntl.LOCK_UN)
os.close(fd)
print("released", flush=True)
"#;

/// A child process killed by its PID when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_local_process_holding_the_pool_locks_delays_no_heartbeat_fails_sets_fast_and_loses_nothing() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new("exit 0\n", "lock_timeout_ms = 1000");
    let mut guest = GuestProcess::start_shm_with_config(root.path(), &sandbox.config());

    // Records written before anyone holds the lock.
    let mut before = vec![json!({"action": "offer", "service": "kvp"})];
    for i in 0..10 {
        before.push(
            json!({"action": "kvp_set", "pool": "guest", "key": format!("before-{i}"),
                           "value": format!("value-before-{i}")}),
        );
    }
    let entries = transcript(&run_host(
        root.path(),
        &Value::Array(before).to_string(),
        Duration::from_secs(60),
    ));
    assert_entries_ok(&entries, "SETs before the lock");
    for e in &entries[1..] {
        assert_eq!(e["status"], "HV_S_OK", "{e}");
    }
    let pool = sandbox.pools().join(GUEST_POOL);
    assert!(pool.exists(), "no Guest pool file at {}", pool.display());

    // A second host heartbeats about every 500 ms throughout.
    let mut hb = vec![json!({"action": "offer", "service": "heartbeat", "name": "hb"})];
    for i in 0..75u64 {
        hb.push(json!({"action": "heartbeat", "name": "hb", "sequence": i * 10}));
        hb.push(json!({"action": "sleep", "ms": 450}));
    }
    let opened = guest.process.log_count("channel opened");
    let mut heartbeats = HostProcess::start(root.path(), &Value::Array(hb).to_string());
    assert!(
        wait_until(Duration::from_secs(30), || guest
            .process
            .log_count("channel opened")
            > opened),
        "the heartbeat channel did not open"
    );

    let (locker, locker_out, locker_pid) = hold_pool_locks(&pool);
    let locked_at = Instant::now();

    // SETs while the lock is held: each answered with a failure, about the lock timeout later.
    let mut during = vec![json!({"action": "offer", "service": "kvp"})];
    for i in 0..6 {
        during.push(
            json!({"action": "kvp_set", "pool": "guest", "key": format!("during-{i}"),
                           "value": format!("value-during-{i}")}),
        );
        during.push(json!({"action": "sleep", "ms": 1500}));
    }
    during.push(
        json!({"action": "kvp_set", "pool": "guest", "key": "before-0",
                       "value": "changed-during-lock"}),
    );
    during.push(json!({"action": "kvp_get", "pool": "guest", "key": "before-1"}));
    let script = json!({"timeout_ms": 30000, "actions": during}).to_string();
    let entries = transcript(&run_host(root.path(), &script, Duration::from_secs(120)));
    assert!(
        locked_at.elapsed() < Duration::from_secs(29),
        "the SETs during the lock took too long to be sure the lock was held throughout"
    );
    assert_entries_ok(&entries, "requests during the lock");
    for e in entries.iter().filter(|e| e["action"] != "sleep").skip(1) {
        assert!(
            elapsed(e) < Duration::from_millis(3000),
            "a request during the lock took {:?} (lock timeout 1 s): {e}",
            elapsed(e)
        );
        if e["action"] == "kvp_set" {
            assert_ne!(
                e["status"], "HV_S_OK",
                "a SET succeeded while another process held the pool locks: {e}"
            );
        }
    }
    let log = guest.process.stderr();
    let pid_text = locker_pid.to_string();
    assert!(
        log.lines().any(|l| l.to_lowercase().contains("lock")
            && l.split(|c: char| !c.is_ascii_digit())
                .any(|w| w == pid_text)),
        "the log does not name the lock holder's pid {locker_pid}:\n{}",
        tail(&log, 30)
    );

    // Hold the lock for 30 s in all, then release it.
    while locked_at.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let heartbeats_spanned_the_lock = heartbeats.is_running();
    release_pool_locks(locker, locker_out);

    // Once released: new SETs succeed and nothing from before (nor the locker's record) is lost;
    // the SETs that failed left no trace.
    let mut after = vec![
        json!({"action": "offer", "service": "kvp"}),
        json!({"action": "kvp_set", "pool": "guest", "key": "after-0", "value": "value-after"}),
    ];
    for i in 0..10 {
        after.push(json!({"action": "kvp_get", "pool": "guest", "key": format!("before-{i}")}));
    }
    after.push(json!({"action": "kvp_get", "pool": "guest", "key": "locker-key"}));
    after.push(json!({"action": "kvp_get", "pool": "guest", "key": "during-0"}));
    after.push(json!({"action": "kvp_get", "pool": "guest", "key": "after-0"}));
    let entries = transcript(&run_host(
        root.path(),
        &Value::Array(after).to_string(),
        Duration::from_secs(60),
    ));
    assert_entries_ok(&entries, "requests after the lock");
    assert_eq!(
        entries[1]["status"], "HV_S_OK",
        "SET after the release: {}",
        entries[1]
    );
    for i in 0..10 {
        let e = &entries[2 + i];
        assert_eq!(e["status"], "HV_S_OK", "{e}");
        assert_eq!(e["received"]["value"], format!("value-before-{i}"), "{e}");
    }
    assert_eq!(
        entries[12]["received"]["value"], "locker-value",
        "the locker's record: {}",
        entries[12]
    );
    assert_eq!(
        entries[13]["status"], "HV_S_CONT",
        "a SET answered with a failure was applied later: {}",
        entries[13]
    );
    assert_eq!(entries[14]["received"]["value"], "value-after");
    let (_, records) = read_pool(&pool);
    let on_disk: HashMap<_, _> = records.into_iter().collect();
    for i in 0..10 {
        assert_eq!(
            on_disk.get(&format!("before-{i}")).map(String::as_str),
            Some(format!("value-before-{i}").as_str())
        );
    }
    assert_eq!(
        on_disk.get("locker-key").map(String::as_str),
        Some("locker-value")
    );
    assert_eq!(
        on_disk.get("after-0").map(String::as_str),
        Some("value-after")
    );

    // Every heartbeat, before, during and after the lock, came back well within the lock timeout.
    assert!(
        heartbeats_spanned_the_lock,
        "the heartbeat host ended before the lock was released"
    );
    let entries = transcript(&heartbeats.finish(Duration::from_secs(120)));
    assert_entries_ok(&entries, "heartbeats around the lock");
    let mut rounds = 0;
    for e in entries.iter().filter(|e| e["action"] == "heartbeat") {
        for round in e["rounds"].as_array().unwrap() {
            rounds += 1;
            let rtt = round["rtt_us"].as_u64().unwrap();
            assert!(
                rtt < 500_000,
                "a heartbeat took {rtt} us while the pool was locked: {e}"
            );
        }
    }
    assert_eq!(rounds, 75);
    assert_guest_healthy(&mut guest);
}

/// Starts the lock holder on `pool` and returns it with its pid once it holds both locks.
fn hold_pool_locks(pool: &Path) -> (KillOnDrop, BufReader<std::process::ChildStdout>, u32) {
    let mut locker = KillOnDrop(
        Command::new("python3")
            .arg("-c")
            .arg(LOCKER)
            .arg(pool)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 for the lock holder"),
    );
    let mut out = BufReader::new(locker.0.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid = line
        .strip_prefix("locked ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the lock holder said {line:?}"));
    (locker, out, pid)
}

/// Tells the lock holder to release and waits until it has.
fn release_pool_locks(mut locker: KillOnDrop, mut out: BufReader<std::process::ChildStdout>) {
    let mut stdin = locker.0.stdin.take().unwrap();
    stdin.write_all(b"release\n").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "released");
    assert!(locker.0.wait().unwrap().success());
}

#[test]
fn a_pool_locked_before_the_daemon_starts_blocks_neither_startup_nor_heartbeats() {
    let root = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new("exit 0\n", "lock_timeout_ms = 1000");
    let pool = sandbox.pools().join(GUEST_POOL);
    let mut record = vec![0u8; RECORD_SIZE];
    record[..11].copy_from_slice(b"preexisting");
    record[KEY_FIELD..KEY_FIELD + 3].copy_from_slice(b"yes");
    std::fs::write(&pool, &record).unwrap();
    let (locker, locker_out, _) = hold_pool_locks(&pool);

    let started = Instant::now();
    let mut guest = GuestProcess::start_shm_with_config(root.path(), &sandbox.config());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the guest took {:?} to start beside a locked pool",
        started.elapsed()
    );
    let script = json!({"timeout_ms": 20000, "actions": [
        {"action": "offer", "service": "heartbeat"},
        {"action": "heartbeat", "count": 5},
        {"action": "offer", "service": "kvp"},
        {"action": "kvp_set", "pool": "guest", "key": "while-locked", "value": "no"},
        {"action": "heartbeat", "count": 5, "sequence": 100}
    ]})
    .to_string();
    let entries = transcript(&run_host(root.path(), &script, Duration::from_secs(120)));
    assert_entries_ok(
        &entries,
        "heartbeat and KVP beside a pool locked since startup",
    );
    for e in entries.iter().filter(|e| e["action"] == "heartbeat") {
        for round in e["rounds"].as_array().unwrap() {
            let rtt = round["rtt_us"].as_u64().unwrap();
            assert!(rtt < 500_000, "a heartbeat took {rtt} us: {e}");
        }
    }
    let set = &entries[3];
    assert_ne!(set["status"], "HV_S_OK", "SET through a held lock: {set}");
    assert!(
        elapsed(set) < Duration::from_secs(3),
        "SET answered after {:?}",
        elapsed(set)
    );

    release_pool_locks(locker, locker_out);
    let entries = transcript(&run_host(
        root.path(),
        &json!([
            {"action": "offer", "service": "kvp"},
            {"action": "kvp_set", "pool": "guest", "key": "unlocked", "value": "yes"},
            {"action": "kvp_get", "pool": "guest", "key": "preexisting"},
            {"action": "kvp_get", "pool": "guest", "key": "locker-key"},
            {"action": "kvp_get", "pool": "guest", "key": "while-locked"}
        ])
        .to_string(),
        Duration::from_secs(60),
    ));
    assert_entries_ok(&entries, "KVP after the release");
    assert_eq!(entries[1]["status"], "HV_S_OK", "{}", entries[1]);
    assert_eq!(entries[2]["received"]["value"], "yes", "{}", entries[2]);
    assert_eq!(
        entries[3]["received"]["value"], "locker-value",
        "{}",
        entries[3]
    );
    assert_eq!(entries[4]["status"], "HV_S_CONT", "{}", entries[4]);
    assert_guest_healthy(&mut guest);
}

// ---------------------------------------------------------------------------------------------
// 4. hv_set_ifconfig: hung, and injected into
// ---------------------------------------------------------------------------------------------

const ADAPTER: &str = "{3f1c6a2e-8e1b-4b8e-9d2c-1a2b3c4d5e6f}";

fn pids_in(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills, when dropped, whatever the hung script and its child left running (by the pids they
/// recorded, and only if the pid still runs one of them), so a failing test leaves nothing behind.
struct ReapRecordedPids(Vec<PathBuf>);

impl Drop for ReapRecordedPids {
    fn drop(&mut self) {
        for pid in self.0.iter().flat_map(|file| pids_in(file)) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let ours = String::from_utf8_lossy(&cmdline);
            if ours.contains("sleep") || ours.contains("hv_set_ifconfig") {
                let pid = i32::try_from(pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw);
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

#[test]
fn a_hung_set_ifconfig_is_killed_at_its_timeout_while_kvp_and_heartbeat_keep_answering() {
    let root = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (script_pids, sleep_pids) = (
        dir.path().join("script.pids"),
        dir.path().join("sleep.pids"),
    );
    let sandbox = Sandbox::new(
        &format!(
            "echo $$ >> '{}'\nsleep 600 &\necho $! >> '{}'\nwait\n",
            script_pids.display(),
            sleep_pids.display()
        ),
        "set_ifconfig_timeout_ms = 1000",
    );
    sandbox.add_adapter(ADAPTER);
    let _reap = ReapRecordedPids(vec![script_pids.clone(), sleep_pids.clone()]);
    let mut guest = GuestProcess::start_shm_with_config(root.path(), &sandbox.config());

    // Another host keeps a KVP channel and a heartbeat channel busy all along.
    let mut side = vec![
        json!({"action": "offer", "service": "kvp", "name": "side"}),
        json!({"action": "offer", "service": "heartbeat"}),
    ];
    for i in 0..60u64 {
        side.push(json!({"action": "kvp_set", "name": "side", "pool": "guest",
                         "key": format!("side-{i}"), "value": format!("v{i}")}));
        side.push(json!({"action": "kvp_get", "name": "side", "pool": "guest",
                         "key": format!("side-{i}")}));
        side.push(json!({"action": "heartbeat", "sequence": i * 10}));
        side.push(json!({"action": "sleep", "ms": 100}));
    }
    let mut side = HostProcess::start(root.path(), &Value::Array(side).to_string());
    assert!(
        wait_until(Duration::from_secs(30), || guest
            .process
            .log_count("channel opened")
            >= 2),
        "the side channels did not open"
    );

    let set_ip = json!({"action": "kvp_set_ip_info", "adapter_id": ADAPTER, "dhcp": false,
                        "addresses": "192.0.2.10", "masks": "255.255.255.0",
                        "gateways": "192.0.2.1", "dns": "192.0.2.53"});
    let script = json!({"timeout_ms": 30000, "actions": [
        {"action": "offer", "service": "kvp"},
        set_ip, set_ip, set_ip,
        {"action": "kvp_set", "pool": "guest", "key": "after-hang", "value": "fine"},
        {"action": "kvp_get", "pool": "guest", "key": "after-hang"}
    ]})
    .to_string();
    let entries = transcript(&run_host(root.path(), &script, Duration::from_secs(120)));
    let side_outlived_the_hangs = side.is_running();
    assert_entries_ok(&entries, "SET_IP_INFO with a hung script");
    for e in &entries[1..4] {
        assert_ne!(
            e["status"], "HV_S_OK",
            "SET_IP_INFO succeeded with a script that never returned: {e}"
        );
        assert!(
            elapsed(e) < Duration::from_secs(5),
            "SET_IP_INFO answered after {:?} with a 1 s script timeout: {e}",
            elapsed(e)
        );
    }
    assert_eq!(entries[4]["status"], "HV_S_OK", "{}", entries[4]);
    assert_eq!(entries[5]["received"]["value"], "fine", "{}", entries[5]);

    // The script did run (three times) and neither it nor its child is left behind.
    let scripts = pids_in(&script_pids);
    let sleeps = pids_in(&sleep_pids);
    assert_eq!(
        scripts.len(),
        3,
        "hv_set_ifconfig ran {} times",
        scripts.len()
    );
    let daemon = guest.process.pid();
    let gone = wait_until(Duration::from_secs(5), || {
        scripts
            .iter()
            .all(|&pid| proc_state(pid).is_none_or(|(_, ppid)| ppid != daemon))
    });
    assert!(
        gone,
        "the hung script is still the daemon's child (not killed or not reaped): {:?}",
        scripts
            .iter()
            .map(|&p| (p, proc_state(p)))
            .collect::<Vec<_>>()
    );
    let dead = |pid: u32| proc_state(pid).is_none_or(|(state, _)| state == 'Z');
    let gone = wait_until(Duration::from_secs(5), || sleeps.iter().all(|&p| dead(p)));
    assert!(
        gone,
        "the hung script's own child outlived it: {:?}",
        sleeps
            .iter()
            .map(|&p| (p, proc_state(p)))
            .collect::<Vec<_>>()
    );

    // Meanwhile the other KVP channel and the heartbeat answered without waiting for the script.
    assert!(
        side_outlived_the_hangs,
        "the side host ended before the hangs did: the test proves nothing"
    );
    let entries = transcript(&side.finish(Duration::from_secs(120)));
    assert_entries_ok(&entries, "KVP and heartbeat beside the hung script");
    for e in entries.iter().skip(2) {
        match e["action"].as_str() {
            Some("kvp_set") | Some("kvp_get") => {
                assert_eq!(e["status"], "HV_S_OK", "{e}");
                assert!(
                    elapsed(e) < Duration::from_millis(500),
                    "a KVP request waited {:?} beside the hung script: {e}",
                    elapsed(e)
                );
            }
            Some("heartbeat") => {
                let rtt = e["rounds"][0]["rtt_us"].as_u64().unwrap();
                assert!(
                    rtt < 500_000,
                    "a heartbeat took {rtt} us beside the hung script"
                );
            }
            _ => {}
        }
    }
    assert_guest_healthy(&mut guest);
}

#[test]
fn set_ip_info_with_shell_injection_in_any_field_is_refused_and_nothing_is_written_or_run() {
    let root = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("script-ran");
    let injected = dir.path().join("injected");
    let sandbox = Sandbox::new(&format!("touch '{}'\n", ran.display()), "");
    sandbox.add_adapter(ADAPTER);
    let mut guest = GuestProcess::start_shm_with_config(root.path(), &sandbox.config());

    let m = injected.display();
    let payloads = [
        "\nIPADDR1=198.51.100.66\n".to_owned(),
        format!("$(touch {m})"),
        format!("`touch {m}`"),
        format!(";touch {m}"),
        format!("' ; touch '{m}"),
        format!("\" && touch \"{m}"),
    ];
    let base = [
        ("adapter_id", ADAPTER),
        ("addresses", "192.0.2.10"),
        ("masks", "255.255.255.0"),
        ("gateways", "192.0.2.1"),
        ("dns", "192.0.2.53"),
    ];
    let request = |field: Option<(&str, &str)>| {
        let mut action = json!({"action": "kvp_set_ip_info", "dhcp": false});
        for (name, value) in base {
            action[name] = json!(value);
        }
        if let Some((name, payload)) = field {
            action[name] = json!(format!("{}{payload}", action[name].as_str().unwrap()));
        }
        action
    };
    let mut actions = vec![json!({"action": "offer", "service": "kvp"})];
    for (field, _) in base {
        for payload in &payloads {
            actions.push(request(Some((field, payload))));
        }
    }
    let entries = transcript(&run_host(
        root.path(),
        &Value::Array(actions).to_string(),
        Duration::from_secs(120),
    ));
    assert_entries_ok(&entries, "SET_IP_INFO injections");
    let accepted: Vec<&Value> = entries[1..]
        .iter()
        .filter(|e| e["status"] == "HV_S_OK")
        .collect();
    assert!(
        accepted.is_empty(),
        "injected SET_IP_INFO accepted: {accepted:?}"
    );
    let written: Vec<_> = std::fs::read_dir(sandbox.ifcfg())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        written.is_empty(),
        "files written for refused requests: {written:?}"
    );
    assert!(!ran.exists(), "hv_set_ifconfig ran for a refused request");
    assert!(!injected.exists(), "an injected command ran");

    // The same request without the payloads goes through, so the refusals were about the payloads.
    let entries = transcript(&run_host(
        root.path(),
        &json!([{"action": "offer", "service": "kvp"}, request(None)]).to_string(),
        Duration::from_secs(60),
    ));
    assert_entries_ok(&entries, "clean SET_IP_INFO");
    assert_eq!(entries[1]["status"], "HV_S_OK", "{}", entries[1]);
    assert!(sandbox.ifcfg().join("ifcfg-eth7").exists());
    assert!(
        wait_until(Duration::from_secs(5), || ran.exists()),
        "hv_set_ifconfig did not run for the clean request"
    );
    assert!(!injected.exists(), "an injected command ran");
    assert_guest_healthy(&mut guest);
}

// ---------------------------------------------------------------------------------------------
// 5. A burst of SETs, the record cap, and kill -9 mid-burst
// ---------------------------------------------------------------------------------------------

const MAX_RECORDS: usize = 1024;
const DISTINCT_KEYS: usize = 2000;
const BURST: usize = 10_000;

fn burst_script(prefix: &str, timeout_ms: u64) -> String {
    let mut actions = vec![json!({"action": "offer", "service": "kvp"})];
    for i in 0..BURST {
        actions.push(json!({"action": "kvp_set", "pool": "guest",
                            "key": format!("k{:04}", i % DISTINCT_KEYS),
                            "value": format!("{prefix}-{i}")}));
    }
    json!({"timeout_ms": timeout_ms, "actions": actions}).to_string()
}

#[test]
fn ten_thousand_sets_keep_descriptors_and_pool_bounded_and_kill_9_loses_no_acknowledged_set() {
    let first_root = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new("exit 0\n", &format!("max_records = {MAX_RECORDS}"));
    let guest = GuestProcess::start_shm_with_config(first_root.path(), &sandbox.config());
    let pool = sandbox.pools().join(GUEST_POOL);
    let cap_bytes = (MAX_RECORDS * RECORD_SIZE) as u64;
    std::thread::sleep(Duration::from_millis(300));
    let fds_before = guest.process.open_fds();
    assert!(fds_before > 0, "cannot read the guest's descriptors");

    // Burst 1, with the guest's descriptors and the pool size sampled all along.
    let mut host = HostProcess::start(first_root.path(), &burst_script("b1", 10_000));
    let (mut max_fds, mut max_pool) = (0, 0);
    let started = Instant::now();
    while host.is_running() && started.elapsed() < Duration::from_secs(900) {
        max_fds = max_fds.max(guest.process.open_fds());
        max_pool = max_pool.max(std::fs::metadata(&pool).map(|m| m.len()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = host.finish(Duration::from_secs(10));
    let entries = transcript(&out);
    assert_eq!(entries.len(), BURST + 1);
    assert_entries_ok(&entries, "burst of SETs");
    // Exactly the first MAX_RECORDS distinct keys were stored; every later new key was refused
    // with HV_ERROR_DISK_FULL, and overwrites of stored keys kept working.
    let mut acked = HashSet::new();
    for (i, e) in entries[1..].iter().enumerate() {
        let key = i % DISTINCT_KEYS;
        let expected = if key < MAX_RECORDS {
            "HV_S_OK"
        } else {
            "HV_ERROR_DISK_FULL"
        };
        assert_eq!(e["status"], expected, "SET #{i} of k{key:04}: {e}");
        if e["status"] == "HV_S_OK" {
            acked.insert(key);
        }
    }
    assert_eq!(acked.len(), MAX_RECORDS);
    max_pool = max_pool.max(std::fs::metadata(&pool).unwrap().len());
    assert!(
        max_pool <= cap_bytes,
        "the Guest pool reached {max_pool} bytes, cap {cap_bytes}"
    );
    assert!(
        max_fds <= fds_before + 64,
        "the guest had {max_fds} descriptors open during the burst ({fds_before} before)"
    );
    let settled = wait_until(Duration::from_secs(10), || {
        guest.process.open_fds() <= fds_before + 8
    });
    assert!(
        settled,
        "descriptors leaked: {} open after the burst, {fds_before} before",
        guest.process.open_fds()
    );

    // Then bursts killed with -9 at different moments, each on a guest restarted over the same
    // pools: what the host was told was stored must be in the pool file, after each kill and
    // after each restart.
    let mut expected: HashMap<String, String> = HashMap::new();
    for i in 0..BURST {
        let key = i % DISTINCT_KEYS;
        if key < MAX_RECORDS {
            expected.insert(format!("k{key:04}"), format!("b1-{i}"));
        }
    }
    let mut guest = Some(guest);
    for (round, delay_ms) in [250u64, 30, 120, 400, 700].into_iter().enumerate() {
        let root = tempfile::tempdir().unwrap();
        let mut victim = match guest.take() {
            Some(first) => first,
            None => {
                let restarted = GuestProcess::start_shm_with_config(root.path(), &sandbox.config());
                check_pool_after_kill(&pool, &mut expected, None, &format!("restart {round}"));
                restarted
            }
        };
        let root_path = match round {
            0 => first_root.path().to_owned(),
            _ => root.path().to_owned(),
        };
        let prefix = format!("r{round}");
        let mut host = HostProcess::start(&root_path, &burst_script(&prefix, 3_000));
        let marker = format!("{prefix}-").into_bytes();
        let reached = wait_until(Duration::from_secs(300), || {
            std::fs::read(&pool)
                .unwrap_or_default()
                .windows(marker.len())
                .any(|w| w == marker)
        });
        assert!(reached, "round {round}: the burst never reached the pool");
        std::thread::sleep(Duration::from_millis(delay_ms));
        assert!(
            host.is_running(),
            "round {round}: the burst ended before the kill: no kill mid-burst"
        );
        victim.process.signal(rustix::process::Signal::KILL);
        assert!(
            victim.process.wait_exit(Duration::from_secs(10)).is_some(),
            "kill -9 did not end the guest"
        );
        let entries = transcript(&host.finish(Duration::from_secs(600)));
        let sets = &entries[1..];
        let first_failed = sets.iter().position(|e| e["ok"] != true);
        let Some(in_flight) = first_failed else {
            panic!("round {round}: the kill did not land mid-burst: every SET was answered");
        };
        assert!(
            sets[in_flight..].iter().all(|e| e["ok"] != true),
            "round {round}: the host got answers after the guest was killed"
        );
        for (i, e) in sets.iter().enumerate().take(in_flight) {
            if e["status"] == "HV_S_OK" {
                expected.insert(
                    format!("k{:04}", i % DISTINCT_KEYS),
                    format!("{prefix}-{i}"),
                );
            }
        }
        let flight = (
            format!("k{:04}", in_flight % DISTINCT_KEYS),
            format!("{prefix}-{in_flight}"),
        );
        check_pool_after_kill(
            &pool,
            &mut expected,
            Some((&flight.0, &flight.1)),
            &format!("kill {round} after {in_flight} SETs"),
        );
    }
}

/// Checks the pool file against what the host was told was stored: every acknowledged key with
/// its last acknowledged value, nothing else, each key once, whole records, within the cap.
/// `in_flight` is the one SET that was unanswered when the guest died: it may or may not have
/// landed, and `expected` follows what the disk says about it.
fn check_pool_after_kill(
    pool: &Path,
    expected: &mut HashMap<String, String>,
    in_flight: Option<(&str, &str)>,
    when: &str,
) {
    let (len, records) = read_pool(pool);
    assert_eq!(
        len % RECORD_SIZE,
        0,
        "{when}: the pool is {len} bytes: a torn record"
    );
    assert!(
        len <= MAX_RECORDS * RECORD_SIZE,
        "{when}: the pool grew to {len} bytes"
    );
    let mut seen = HashSet::new();
    for (key, value) in &records {
        assert!(
            seen.insert(key.clone()),
            "{when}: key {key:?} is twice in the pool"
        );
        let want = expected.get(key);
        let landed_in_flight = in_flight == Some((key.as_str(), value.as_str()));
        assert!(
            want == Some(value) || landed_in_flight,
            "{when}: {key} is {value:?} on disk, last acknowledged {want:?} (in flight: {in_flight:?})"
        );
        if landed_in_flight {
            expected.insert(key.clone(), value.clone());
        }
    }
    let mut missing: Vec<&String> = expected.keys().filter(|k| !seen.contains(*k)).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{when}: acknowledged keys missing from the pool: {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. SIGTERM on the kernel transport
// ---------------------------------------------------------------------------------------------

/// When the fake kernel sends SIGTERM to hvisd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TermAt {
    /// hvisd has sent REGISTER1 and waits for the kernel's answer.
    Handshake,
    /// The handshake is done and one SET has been answered.
    AfterRequest,
}

/// Runs `hvisd run --transport kernel:SOCKET` against a fake kernel on a Unix `SOCK_SEQPACKET`
/// socket, sends SIGTERM at `at`, and returns how long hvisd took to exit.
fn sigterm_on_kernel_transport(at: TermAt) -> Duration {
    use hvisd_protocol::kvp_daemon::{DAEMON_MSG_SIZE, build_register_reply, build_set, error};
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketType};

    let sandbox = Sandbox::new("exit 0\n", "");
    let socket_path = sandbox.path().join("hv_kvp.sock");
    let listener = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
    rustix::net::bind(&listener, &SocketAddrUnix::new(&socket_path).unwrap()).unwrap();
    rustix::net::listen(&listener, 1).unwrap();

    let transport = format!("kernel:{}", socket_path.display());
    let config = sandbox.config().display().to_string();
    let mut daemon =
        ChildGuard::spawn_hvisd(&["run", "--transport", &transport, "--config", &config]);

    // Play the kernel: accept, REGISTER1 in, version "3.1" out.
    let mut poll = [rustix::event::PollFd::new(
        &listener,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 30,
        tv_nsec: 0,
    };
    let ready = rustix::event::poll(&mut poll, Some(&timeout)).unwrap();
    assert_eq!(
        ready,
        1,
        "hvisd did not connect to the kernel socket:\n{}",
        daemon.stderr()
    );
    let conn = rustix::net::accept(&listener).unwrap();
    rustix::net::sockopt::set_socket_timeout(
        &conn,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(30)),
    )
    .unwrap();
    let mut buf = vec![0u8; DAEMON_MSG_SIZE + 64];
    let recv = |buf: &mut [u8]| {
        let (n, _) = rustix::net::recv(&conn, buf, RecvFlags::empty()).unwrap();
        n
    };
    let n = recv(&mut buf);
    assert_eq!(n, DAEMON_MSG_SIZE, "register message size");
    assert_eq!(buf[0], 100, "the first message is not REGISTER1");
    if at == TermAt::AfterRequest {
        rustix::net::send(&conn, &build_register_reply("3.1")[..], SendFlags::empty()).unwrap();
        rustix::net::send(
            &conn,
            &build_set(1, b"sigterm-key", b"sigterm-value")[..],
            SendFlags::empty(),
        )
        .unwrap();
        let n = recv(&mut buf);
        assert_eq!(n, DAEMON_MSG_SIZE, "reply size");
        assert_eq!(error(&buf[..n]), 0, "SET over the kernel transport failed");
        let (_, records) = read_pool(&sandbox.pools().join(GUEST_POOL));
        assert_eq!(
            records,
            [("sigterm-key".to_owned(), "sigterm-value".to_owned())],
            "the SET is not in the configured pool"
        );
    }

    let started = Instant::now();
    daemon.signal(rustix::process::Signal::TERM);
    let status = daemon.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    assert!(
        status.is_some(),
        "{at:?}: hvisd still runs 10 s after SIGTERM:\n{}",
        daemon.stderr()
    );
    drop(conn);
    took
}

#[test]
fn sigterm_stops_hvisd_on_the_kernel_transport_within_one_second() {
    for at in [TermAt::AfterRequest, TermAt::Handshake] {
        let took = sigterm_on_kernel_transport(at);
        assert!(
            took < Duration::from_secs(1),
            "{at:?}: SIGTERM took {took:?} to stop hvisd"
        );
    }
}
