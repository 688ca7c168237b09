//! The kernel transport: hv_kvp_daemon's protocol over a real SOCK_SEQPACKET socketpair, with
//! replies checked byte for byte against what the C daemon writes.

mod common;

use std::sync::Arc;

use common::{FakeKernel, core_in};
use hvisd_protocol::ic::status::{HV_INVALIDARG, HV_S_CONT};
use hvisd_protocol::kvp::{self, write_u32};
use hvisd_protocol::kvp_daemon::{self as dm, layout};

fn kernel(dir: &std::path::Path) -> FakeKernel {
    FakeKernel::start(Arc::new(core_in(dir)))
}

/// What the C daemon writes back for a request it answers with only a status: the request with
/// its first 4 bytes replaced by the error.
fn status_only(request: &dm::DaemonMessage, status: u32) -> Box<dm::DaemonMessage> {
    let mut m = Box::new(*request);
    dm::set_error(&mut m[..], status);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_on_every_file_pool_matches_the_c_daemon() {
    let d = tempfile::tempdir().unwrap();
    let k = kernel(d.path());
    for pool in [0u8, 1, 3, 4] {
        for (key, value) in [("k1", "v1"), ("k2", "value two")] {
            let req = dm::build_set(pool, key.as_bytes(), value.as_bytes());
            assert_eq!(
                k.call(&req),
                status_only(&req, 0),
                "SET {key} in pool {pool}"
            );
        }
        // GET as the kernel sends it (value_size 0): success, and no value bytes are copied.
        let req = dm::build_get(pool, b"k1");
        assert_eq!(k.call(&req), status_only(&req, 0));
        // GET with room for the value copies value_size bytes of the record.
        let mut req = dm::build_get(pool, b"k2");
        write_u32(&mut req[..], layout::SET_VALUE_SIZE, 2048);
        let reply = k.call(&req);
        assert_eq!(dm::error(&reply[..]), 0);
        assert_eq!(dm::get_value(&reply[..]), b"value two");
        // A missing key is HV_S_CONT.
        let req = dm::build_get(pool, b"nope");
        assert_eq!(k.call(&req), status_only(&req, HV_S_CONT));
        // ENUMERATE in file order, then HV_S_CONT at the end.
        for (i, (key, value)) in [("k1", "v1"), ("k2", "value two")].into_iter().enumerate() {
            let reply = k.call(&dm::build_enumerate(pool, i as u32));
            assert_eq!(dm::error(&reply[..]), 0);
            assert_eq!(
                (
                    dm::enumerate_key(&reply[..]),
                    dm::enumerate_value(&reply[..])
                ),
                (key.as_bytes(), value.as_bytes())
            );
        }
        let req = dm::build_enumerate(pool, 2);
        assert_eq!(k.call(&req), status_only(&req, HV_S_CONT));
        // DELETE, then the key is gone.
        let req = dm::build_delete(pool, b"k1");
        assert_eq!(k.call(&req), status_only(&req, 0));
        let req = dm::build_delete(pool, b"k1");
        assert_eq!(k.call(&req), status_only(&req, HV_S_CONT));
        let reply = k.call(&dm::build_enumerate(pool, 0));
        assert_eq!(dm::enumerate_key(&reply[..]), b"k2");
    }
    // Pool files are 2560-byte records, one left per pool.
    for n in [0, 1, 3, 4] {
        let len = std::fs::metadata(d.path().join(format!("pools/.kvp_pool_{n}")))
            .unwrap()
            .len();
        assert_eq!(len, 2560, "pool {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_over_a_longer_value_keeps_the_c_memcpy_residue() {
    let d = tempfile::tempdir().unwrap();
    let k = kernel(d.path());
    k.call(&dm::build_set(1, b"k", b"abcdef"));
    k.call(&dm::build_set(1, b"k", b"xy"));
    let reply = k.call(&dm::build_enumerate(1, 0));
    assert_eq!(
        &reply[layout::ENUM_VALUE..layout::ENUM_VALUE + 8],
        b"xy\0def\0\0"
    );
    assert_eq!(dm::enumerate_value(&reply[..]), b"xy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_shifts_records_with_strcpy_like_the_c_daemon() {
    let d = tempfile::tempdir().unwrap();
    let k = kernel(d.path());
    k.call(&dm::build_set(0, b"first", b"a-long-value"));
    k.call(&dm::build_set(0, b"second", b"v"));
    k.call(&dm::build_delete(0, b"first"));
    let reply = k.call(&dm::build_enumerate(0, 0));
    assert_eq!(dm::enumerate_key(&reply[..]), b"second");
    // strcpy moved "v\0" over "a-long-value": the rest of the old value stays in the slot.
    assert_eq!(
        &reply[layout::ENUM_VALUE..layout::ENUM_VALUE + 13],
        b"v\0long-value\0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_pool_enumerates_the_ten_intrinsic_keys_in_order() {
    let d = tempfile::tempdir().unwrap();
    let k = kernel(d.path());
    let mut got = Vec::new();
    for i in 0..10 {
        let reply = k.call(&dm::build_enumerate(2, i));
        assert_eq!(dm::error(&reply[..]), 0);
        got.push((
            String::from_utf8(dm::enumerate_key(&reply[..]).to_vec()).unwrap(),
            String::from_utf8(dm::enumerate_value(&reply[..]).to_vec()).unwrap(),
        ));
    }
    let req = dm::build_enumerate(2, 10);
    assert_eq!(k.call(&req), status_only(&req, HV_S_CONT));
    let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, hvisd_kvp::intrinsic::INTRINSIC_KEYS);
    let value = |name: &str| got.iter().find(|(k, _)| k == name).unwrap().1.clone();
    let uname = rustix::system::uname();
    let release = uname.release().to_str().unwrap().to_string();
    assert_eq!(value("IntegrationServicesVersion"), "3.1");
    assert_eq!(value("OSName"), "Test OS");
    assert_eq!(value("OSMajorVersion"), "42.1");
    assert_eq!(value("OSMinorVersion"), "");
    assert_eq!(value("OSBuildNumber"), release);
    assert_eq!(value("OSVersion"), release.split('-').next().unwrap());
    assert_eq!(value("ProcessorArchitecture"), std::env::consts::ARCH);
    let host = uname.nodename().to_str().unwrap().to_string();
    assert_eq!(
        value("FullyQualifiedDomainName"),
        hvisd_sys::net::canonical_name(&host)
    );
    // Addresses: the non-loopback ones `ip` lists, `;`-separated.
    for (key, family) in [("NetworkAddressIPv4", "-4"), ("NetworkAddressIPv6", "-6")] {
        let out = std::process::Command::new("ip")
            .args(["-o", family, "addr", "show"])
            .output()
            .unwrap();
        let mut expected: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.contains(" lo "))
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(3)?
                    .split('/')
                    .next()
                    .map(str::to_string)
            })
            .collect();
        let mut ours: Vec<String> = value(key)
            .split(';')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        expected.sort();
        ours.sort();
        assert_eq!(ours, expected, "{key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_clear_status_instead_of_the_c_daemons_crash() {
    let d = tempfile::tempdir().unwrap();
    let k = kernel(d.path());
    k.call(&dm::build_set(1, b"k", b"v"));
    // Pool 5 and above.
    for req in [
        dm::build_set(5, b"k", b"v"),
        dm::build_get(7, b"k"),
        dm::build_delete(9, b"k"),
        dm::build_enumerate(5, 0),
    ] {
        assert_eq!(k.call(&req), status_only(&req, HV_INVALIDARG));
    }
    // An index that is negative as the C daemon's int.
    let req = dm::build_enumerate(1, 0x8000_0000);
    assert_eq!(k.call(&req), status_only(&req, HV_S_CONT));
    // key_size 0 would match record 0 in the C daemon.
    for mut req in [
        dm::build_get(1, b"zz"),
        dm::build_set(1, b"zz", b"v"),
        dm::build_delete(1, b"zz"),
    ] {
        let off = if req[0] == 2 {
            layout::DELETE_KEY_SIZE
        } else {
            layout::SET_KEY_SIZE
        };
        write_u32(&mut req[..], off, 0);
        assert_eq!(k.call(&req), status_only(&req, HV_INVALIDARG));
    }
    // Sizes past the fields.
    let mut req = dm::build_set(1, b"k", b"v");
    write_u32(&mut req[..], layout::SET_VALUE_SIZE, 3000);
    assert_eq!(k.call(&req), status_only(&req, HV_S_CONT));
    let mut req = dm::build_get(1, b"k");
    write_u32(&mut req[..], layout::SET_KEY_SIZE, 600);
    assert_eq!(k.call(&req), status_only(&req, HV_S_CONT));
    // An operation the daemon does not know is answered with error 0 and otherwise unchanged.
    let mut req = dm::build_enumerate(1, 0);
    req[0] = 42;
    assert_eq!(k.call(&req), status_only(&req, 0));
    // The record is intact after all that.
    let reply = k.call(&dm::build_enumerate(1, 0));
    assert_eq!(
        (
            dm::enumerate_key(&reply[..]),
            dm::enumerate_value(&reply[..])
        ),
        (&b"k"[..], &b"v"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_path_is_connected_to_instead_of_opened() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("hv_kvp");
    let listener = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::bind(&listener, &SocketAddrUnix::new(&path).unwrap()).unwrap();
    rustix::net::listen(&listener, 1).unwrap();
    let core = Arc::new(core_in(d.path()));
    let transport = tokio::spawn({
        let path = path.clone();
        async move {
            let (_stop_tx, stop) = tokio::sync::watch::channel(false);
            hvisd_kvp::kernel::run_kernel_transport(core, &path, stop).await
        }
    });
    let conn = tokio::task::spawn_blocking(move || rustix::net::accept(&listener).unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; dm::DAEMON_MSG_SIZE];
    assert_eq!(
        rustix::io::read(&conn, &mut buf).unwrap(),
        dm::DAEMON_MSG_SIZE
    );
    assert_eq!(buf[0], kvp::KvpOperation::REGISTER1.0);
    rustix::io::write(&conn, &dm::build_register_reply("9.9")[..]).unwrap();
    rustix::io::write(&conn, &dm::build_enumerate(2, 1)[..]).unwrap();
    assert_eq!(
        rustix::io::read(&conn, &mut buf).unwrap(),
        dm::DAEMON_MSG_SIZE
    );
    assert_eq!(dm::enumerate_value(&buf), b"9.9");
    drop(conn);
    transport.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sized_message_makes_the_daemon_reopen_like_the_c_daemon() {
    let d = tempfile::tempdir().unwrap();
    let k = kernel(d.path());
    rustix::io::write(&k.fd, &[1u8; 100]).unwrap();
    let end = k.server.await.unwrap().unwrap();
    assert_eq!(end, hvisd_kvp::kernel::SessionEnd::Reopen);
}
