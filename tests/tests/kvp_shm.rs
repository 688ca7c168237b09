//! KVP end to end over the shm transport: `hvisd run` and `hvisd host` as two processes, every
//! operation on every pool, the pool files as other tools see them, and IP info of this machine.

use hvisd_e2e::{GuestProcess, hvisd_bin, run_host_script, transcript};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A guest whose pools, ifcfg output and scripts all live in `dir`.
fn guest_config(dir: &Path, sysfs_net: Option<&Path>) -> std::path::PathBuf {
    let script = dir.join("set_ifconfig.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" > '{}'\n",
            dir.join("set_ifconfig.args").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = dir.join("hvisd.toml");
    std::fs::write(
        &config,
        format!(
            "[kvp]\npool_dir = '{d}'\nifcfg_dir = '{d}'\nset_ifconfig = '{s}'\nsysfs_net_dir = '{n}'\n",
            d = dir.display(),
            s = script.display(),
            n = sysfs_net.unwrap_or(Path::new("/sys/class/net")).display()
        ),
    )
    .unwrap();
    config
}

fn run(root: &Path, actions: Vec<Value>) -> Vec<Value> {
    let mut script = vec![json!({"action": "offer", "service": "kvp"})];
    script.extend(actions);
    let out = run_host_script(root, &Value::Array(script).to_string(), TIMEOUT);
    let entries = transcript(&out);
    for e in &entries {
        assert_eq!(e["ok"], true, "action failed: {e}");
    }
    entries
}

#[test]
fn every_operation_on_every_pool_over_shm() {
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let _guest = GuestProcess::start_shm_with_config(root.path(), &guest_config(data.path(), None));
    let pools = [
        "external",
        "guest",
        "auto",
        "auto-external",
        "auto-internal",
    ];
    let mut actions = Vec::new();
    for pool in pools {
        actions.push(json!({"action": "kvp_set", "pool": pool, "key": "s", "value": format!("text in {pool}")}));
        actions.push(
            json!({"action": "kvp_set", "pool": pool, "key": "n32", "value": 7, "type": "u32"}),
        );
        actions.push(json!({"action": "kvp_set", "pool": pool, "key": "n64", "value": 1u64 << 40, "type": "u64"}));
        actions.push(json!({"action": "kvp_get", "pool": pool, "key": "s"}));
        actions.push(json!({"action": "kvp_get", "pool": pool, "key": "missing"}));
        actions.push(json!({"action": "kvp_delete", "pool": pool, "key": "n32"}));
        actions.push(json!({"action": "kvp_enumerate", "pool": pool}));
    }
    actions.push(json!({"action": "kvp_get", "pool": 5, "key": "s"}));
    let entries = run(root.path(), actions);

    for (i, pool) in pools.iter().enumerate() {
        let base = 1 + i * 7;
        for step in 0..3 {
            assert_eq!(
                entries[base + step]["status"],
                "HV_S_OK",
                "{pool}: {}",
                entries[base + step]
            );
        }
        assert_eq!(
            entries[base + 3]["received"]["value"],
            format!("text in {pool}")
        );
        assert_eq!(
            entries[base + 4]["status"],
            "HV_S_CONT",
            "a missing key is HV_S_CONT"
        );
        assert_eq!(entries[base + 5]["status"], "HV_S_OK");
        let listed = &entries[base + 6];
        let keys: Vec<&str> = listed["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["key"].as_str().unwrap())
            .collect();
        if *pool == "auto" {
            // As hv_kvp_daemon: the Auto pool enumerates the ten intrinsic keys, in its order, and
            // nothing else (what a host SETs there is stored but not enumerated).
            assert_eq!(keys.len(), 10, "{keys:?}");
            assert_eq!(keys[0], "FullyQualifiedDomainName");
            assert_eq!(keys[9], "ProcessorArchitecture");
        } else {
            assert_eq!(
                keys,
                ["s", "n64"],
                "{pool}: enumeration keeps insertion order"
            );
        }
        assert_eq!(listed["end_status"], "HV_S_CONT");
    }
    let last = entries.last().unwrap();
    assert_eq!(
        last["status"], "HV_INVALIDARG",
        "pool 5 gets a clear status: {last}"
    );

    // The operator's tool sees what the host wrote, in the files other tools share.
    let out = std::process::Command::new(hvisd_bin())
        .args(["kvp", "list", "--json", "--pool", "external", "--pool-dir"])
        .arg(data.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = listed.to_string();
    assert!(
        text.contains("text in external") && text.contains("1099511627776"),
        "{text}"
    );
    assert_eq!(
        std::fs::metadata(data.path().join(".kvp_pool_0"))
            .unwrap()
            .len()
            % 2560,
        0
    );
}

/// The first interface with a MAC that is not all zeros, and its IPv4 addresses.
fn this_machines_interface() -> Option<(String, Vec<String>)> {
    for entry in std::fs::read_dir("/sys/class/net").ok()? {
        let name = entry.ok()?.file_name().into_string().ok()?;
        let mac = std::fs::read_to_string(format!("/sys/class/net/{name}/address")).ok()?;
        let mac = mac.trim().to_uppercase();
        if mac.is_empty() || mac == "00:00:00:00:00:00" {
            continue;
        }
        let out = std::process::Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", &name])
            .output()
            .ok()?;
        let addrs: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
            .filter_map(|cidr| cidr.split('/').next().map(str::to_owned))
            .collect();
        if !addrs.is_empty() {
            return Some((mac, addrs));
        }
    }
    None
}

#[test]
fn get_ip_info_reports_this_machines_addresses() {
    let Some((mac, addrs)) = this_machines_interface() else {
        panic!("this machine has no interface with a MAC and an IPv4 address to test against");
    };
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let _guest = GuestProcess::start_shm_with_config(root.path(), &guest_config(data.path(), None));
    let entries = run(
        root.path(),
        vec![json!({"action": "kvp_get_ip_info", "mac": mac, "family": "both"})],
    );
    let info = &entries[1];
    assert_eq!(info["status"], "HV_S_OK", "{info}");
    let reported = info["received"]["addresses"].as_str().unwrap();
    for addr in &addrs {
        assert!(
            reported.contains(addr.as_str()),
            "{addr} missing from {reported}"
        );
    }
}

#[test]
fn set_ip_info_writes_ifcfg_for_the_adapter_and_runs_the_script() {
    // A netvsc-like interface in a sysfs tree of the test's own: SET_IP_INFO must never touch this
    // machine's network configuration.
    const ADAPTER: &str = "{3f1c6a2e-8e1b-4b8e-9d2c-1a2b3c4d5e6f}";
    let root = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let sysfs = data.path().join("sys-class-net");
    std::fs::create_dir_all(sysfs.join("eth7/device")).unwrap();
    std::fs::write(sysfs.join("eth7/device/device_id"), format!("{ADAPTER}\n")).unwrap();
    std::fs::write(sysfs.join("eth7/address"), "00:15:5d:01:02:03\n").unwrap();
    let _guest =
        GuestProcess::start_shm_with_config(root.path(), &guest_config(data.path(), Some(&sysfs)));
    let entries = run(
        root.path(),
        vec![
            json!({"action": "kvp_set_ip_info", "adapter_id": ADAPTER, "dhcp": false,
                   "addresses": "192.0.2.10", "masks": "255.255.255.0", "gateways": "192.0.2.1", "dns": "192.0.2.53"}),
            json!({"action": "kvp_set_ip_info", "adapter_id": "{00000000-0000-0000-0000-000000000000}"}),
        ],
    );
    assert_eq!(entries[1]["status"], "HV_S_OK", "{}", entries[1]);
    assert_eq!(entries[2]["status"], "HV_GUID_NOTFOUND", "{}", entries[2]);
    let ifcfg = std::fs::read_to_string(data.path().join("ifcfg-eth7")).unwrap();
    assert!(
        ifcfg.contains("IPADDR0=192.0.2.10") && ifcfg.contains("NETMASK0=255.255.255.0"),
        "{ifcfg}"
    );
    assert!(ifcfg.contains("GATEWAY=192.0.2.1"), "{ifcfg}");
    let args = std::fs::read_to_string(data.path().join("set_ifconfig.args")).unwrap();
    assert!(
        args.contains("ifcfg-eth7") && args.contains("eth7.nmconnection"),
        "script arguments: {args:?}"
    );
}
