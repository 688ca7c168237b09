//! The uio transport against a fake sysfs tree: discovery as the kernel lays devices out, then the
//! same ring and channel code as shm, with a regular file standing in for map 0 of `/dev/uioN` and a
//! socket pair standing in for its 4-byte interrupt reads and writes.

use hvisd::channel::{Channel, RingPair, Role};
use hvisd::config::Config;
use hvisd::doorbell::{Doorbell, DoorbellKind};
use hvisd::services::{ServiceKind, Services};
use hvisd::sim::{HostSimulator, Script};
use hvisd::transport::uio;
use hvisd_ring::SharedMapping;
use rustix::net::{AddressFamily, SocketFlags, SocketType};
use std::path::Path;

const RING_SIZE: u32 = 16384;
const INSTANCE: &str = "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0";

fn fake_sysfs(root: &Path, class: &str) {
    let dev = root.join("devices").join(INSTANCE);
    std::fs::create_dir_all(dev.join("channels/14")).unwrap();
    std::fs::write(dev.join("channels/14/ring"), b"").unwrap();
    std::fs::create_dir_all(dev.join("uio/uio0/maps/map0")).unwrap();
    std::fs::write(
        dev.join("uio/uio0/maps/map0/size"),
        format!("{:#x}\n", 2 * RING_SIZE),
    )
    .unwrap();
    std::fs::write(dev.join("class_id"), format!("{{{class}}}\n")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let map0 = std::fs::File::create(root.join("dev/uio0")).unwrap();
    map0.set_len(u64::from(2 * RING_SIZE)).unwrap();
}

#[tokio::test]
async fn a_uio_device_found_in_sysfs_answers_negotiation_and_heartbeats() {
    let tmp = tempfile::tempdir().unwrap();
    fake_sysfs(tmp.path(), "57164f39-9115-4e78-ab55-382f3bd5422d");
    let devices = uio::discover(&tmp.path().join("devices"), &tmp.path().join("dev")).unwrap();
    assert_eq!(devices.offers.len(), 1);
    let device = devices
        .offers
        .into_iter()
        .next()
        .unwrap()
        .map_err(|(_, e)| e)
        .unwrap();
    assert_eq!(device.ring_size, RING_SIZE as usize);

    // KVP is off: this test must not open the machine's /var/lib/hyperv.
    let config = Config::parse("[services]\nkvp = false\n", "uio test").unwrap();
    let services = Services::new(config).unwrap();
    let kind = services
        .kind_for(&device.class_id)
        .expect("heartbeat is served");
    assert_eq!(kind, ServiceKind::Heartbeat);

    let (guest_fd, host_fd) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    let map0 = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&device.dev_path)
        .unwrap();
    let guest = device
        .open_with(
            &map0,
            Doorbell::new(guest_fd, DoorbellKind::Uio).unwrap(),
            "uio heartbeat",
        )
        .unwrap();
    let guest_task = tokio::spawn(async move { services.serve(kind, guest).await });

    // The host maps the same memory, reads the guest-to-host ring and writes the other.
    let map = SharedMapping::map_file(&map0, 2 * RING_SIZE as usize).unwrap();
    let rings = RingPair::new(map, RING_SIZE as usize, Role::Host).unwrap();
    let host_channel = Channel::new(
        rings,
        Doorbell::new(host_fd, DoorbellKind::Uio).unwrap(),
        "host uio",
    );
    let mut host = HostSimulator::new(tmp.path());
    host.attach(
        "heartbeat",
        ServiceKind::Heartbeat,
        host_channel,
        &device.dev_path,
        RING_SIZE,
    );
    let script = Script::parse(
        r#"[{"action": "negotiate", "name": "heartbeat"},
            {"action": "heartbeat", "count": 50, "sequence": 9}]"#,
        "uio test",
    )
    .unwrap();
    let transcript = host.run(&script).await;
    for entry in transcript.entries() {
        assert_eq!(entry["ok"], true, "{entry}");
    }
    assert_eq!(transcript.entries()[0]["negotiated"]["message"], "3.0");
    assert_eq!(
        transcript.entries()[1]["rounds"].as_array().unwrap().len(),
        50
    );

    // The guest set the pending-send-size feature bit in both control pages, as the spec asks.
    let bytes = std::fs::read(&device.dev_path).unwrap();
    for ring in [0usize, RING_SIZE as usize] {
        assert_eq!(&bytes[ring + 64..ring + 68], &1u32.to_le_bytes());
    }

    // A hostile host scribbles an unaligned write_index: the guest reports it and closes the channel.
    let corrupt = Script::parse(
        r#"[{"action": "corrupt_ring", "name": "heartbeat", "field": "write_index", "value": 3}]"#,
        "uio test",
    )
    .unwrap();
    assert_eq!(host.run(&corrupt).await.entries()[0]["ok"], true);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), guest_task)
        .await
        .expect("the guest closed the channel")
        .unwrap();
    let err = ended.unwrap_err();
    assert!(
        matches!(err, hvisd::channel::ChannelError::Ring { .. })
            && err.to_string().contains("write_index"),
        "{err}"
    );
}
