//! Guest file copy end to end over the shm transport: `hvisd run` with an `[fcopy]` policy and
//! `hvisd host` playing `Copy-VMFile`, as two processes; the files as the guest sees them.

use hvisd_e2e::{GuestProcess, HostProcess, run_host_script, transcript};
use hvisd_ic::Negotiated;
use hvisd_protocol::fcopy::{CopyFlags, FcopyRequest, StartFcopy};
use hvisd_protocol::ic::{IcVersion, MessageType};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A guest allowed to write into `dir/drop` (the drop directory) and `dir/other`; `dir/outside`
/// exists and is not allowed.
struct Guest {
    _dir: tempfile::TempDir,
    root: tempfile::TempDir,
    drop: PathBuf,
    other: PathBuf,
    outside: PathBuf,
    guest: GuestProcess,
}

fn guest() -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let drop = dir.path().join("drop");
    let other = dir.path().join("other");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let config = dir.path().join("hvisd.toml");
    std::fs::write(
        &config,
        format!(
            "[kvp]\npool_dir = '{d}'\n\
             [fcopy]\ndrop_dir = '{drop}'\nallowed_dirs = ['{drop}', '{other}']\nfile_mode = 0o640\n",
            d = dir.path().display(),
            drop = drop.display(),
            other = other.display(),
        ),
    )
    .unwrap();
    let guest = GuestProcess::start_shm_with_config(root.path(), &config);
    Guest {
        _dir: dir,
        root,
        drop,
        other,
        outside,
        guest,
    }
}

/// Runs the actions after an fcopy offer; returns their entries (the offer's first).
fn run(g: &Guest, actions: Vec<Value>) -> Vec<Value> {
    let mut script = vec![json!({"action": "offer", "service": "fcopy"})];
    script.extend(actions);
    let out = run_host_script(g.root.path(), &Value::Array(script).to_string(), TIMEOUT);
    let entries = transcript(&out);
    assert_eq!(entries[0]["ok"], true, "offer: {}", entries[0]);
    assert_eq!(
        entries[0]["negotiated"],
        json!({"framework": "3.0", "message": "1.1"})
    );
    entries
}

fn assert_all_ok(entries: &[Value]) {
    for e in entries {
        assert_eq!(e["ok"], true, "action failed: {e}");
    }
}

/// The names in `dir`, sorted (temporary files included).
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

#[test]
fn a_multi_fragment_copy_lands_whole_and_create_path_makes_directories() {
    use std::os::unix::fs::PermissionsExt;
    let g = guest();
    let drop = g.drop.display().to_string();
    let entries = run(
        &g,
        vec![
            // 100000 bytes: 16 whole 6 KiB fragments and a short one. The drop dir does not
            // exist yet; hvisd creates it.
            json!({"action": "fcopy", "path": drop, "file_name": "big.bin", "size": 100_000}),
            json!({"action": "fcopy", "path": format!("{drop}/new/sub/"), "file_name": "a.txt",
                   "text": "made the path", "create_path": true}),
            json!({"action": "fcopy", "path": format!("{drop}/missing"), "file_name": "b.txt",
                   "text": "no path", "expect": "HV_E_FAIL"}),
            json!({"action": "fcopy", "path": g.other.display().to_string(), "file_name": "empty",
                   "text": ""}),
        ],
    );
    assert_all_ok(&entries);
    let big = &entries[1];
    assert_eq!(big["writes"], 17, "{big}");
    assert_eq!(big["bytes_sent"], 100_000);
    assert_eq!(big["start"], "HV_S_OK");
    assert_eq!(big["complete"], "HV_S_OK");
    assert_eq!(
        std::fs::read(g.drop.join("big.bin")).unwrap(),
        pattern(100_000)
    );
    let mode = std::fs::metadata(g.drop.join("big.bin"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(
        std::fs::read_to_string(g.drop.join("new/sub/a.txt")).unwrap(),
        "made the path"
    );
    assert_eq!(entries[3]["start"], "HV_E_FAIL");
    assert!(!g.drop.join("missing").exists());
    assert_eq!(std::fs::read(g.other.join("empty")).unwrap(), b"");
    assert_eq!(listing(&g.drop), ["big.bin", "new"]);
}

#[test]
fn an_existing_file_is_refused_without_overwrite_and_replaced_with_it() {
    let g = guest();
    let drop = g.drop.display().to_string();
    let copy = |text: &str, overwrite: bool, expect: &str| {
        json!({"action": "fcopy", "path": drop, "file_name": "f.txt", "text": text,
               "overwrite": overwrite, "expect": expect})
    };
    let entries = run(
        &g,
        vec![
            copy("one", false, "ok"),
            copy("two", false, "HV_ERROR_ALREADY_EXISTS"),
        ],
    );
    assert_all_ok(&entries);
    assert_eq!(entries[2]["start"], "HV_ERROR_ALREADY_EXISTS");
    assert_eq!(
        std::fs::read_to_string(g.drop.join("f.txt")).unwrap(),
        "one"
    );
    let entries = run(&g, vec![copy("three", true, "ok")]);
    assert_all_ok(&entries);
    assert_eq!(
        std::fs::read_to_string(g.drop.join("f.txt")).unwrap(),
        "three"
    );
    assert_eq!(listing(&g.drop), ["f.txt"]);
}

#[test]
fn destinations_outside_the_policy_are_refused_and_nothing_is_written() {
    let g = guest();
    std::fs::create_dir_all(&g.drop).unwrap();
    std::os::unix::fs::symlink(&g.outside, g.drop.join("link")).unwrap();
    let drop = g.drop.display().to_string();
    let outside = g.outside.display().to_string();
    let refused = |path: String, expect: &str| {
        json!({"action": "fcopy", "path": path, "file_name": "hvisd-fcopy-e2e", "text": "payload",
               "create_path": true, "overwrite": true, "expect": expect})
    };
    let entries = run(
        &g,
        vec![
            refused(outside.clone(), "HV_E_ACCESSDENIED"),
            refused(format!("{drop}/link"), "HV_E_ACCESSDENIED"),
            refused(format!("{drop}/link/deeper"), "HV_E_ACCESSDENIED"),
            refused(format!("{drop}/../outside"), "HV_INVALIDARG"),
            refused("/etc".into(), "HV_E_ACCESSDENIED"),
            refused("relative/dir".into(), "HV_INVALIDARG"),
            json!({"action": "fcopy", "path": drop, "file_name": "../outside/x", "text": "p",
                   "expect": "HV_INVALIDARG"}),
            json!({"action": "fcopy", "path": drop, "file_name": "evil\nname", "text": "p",
                   "expect": "HV_INVALIDARG"}),
        ],
    );
    assert_all_ok(&entries);
    for e in &entries[1..] {
        assert_eq!(e["writes"], 0, "refused at START: {e}");
    }
    assert_eq!(listing(&g.outside), Vec::<String>::new());
    assert_eq!(listing(&g.drop), ["link"]);
    assert!(!Path::new("/etc/hvisd-fcopy-e2e").exists());
    // Each refusal is logged with the host's path escaped: no raw newline from the host.
    let log = g.guest.process.stderr();
    assert!(log.contains("fcopy refused"), "{log}");
    assert!(log.contains("outside the allowed directories"), "{log}");
    assert!(log.contains("evil\\nname"), "{log}");
    assert!(!log.contains("evil\nname"), "{log}");
}

#[test]
fn a_cancelled_or_broken_copy_leaves_nothing_behind() {
    let g = guest();
    let drop = g.drop.display().to_string();
    let entries = run(
        &g,
        vec![
            json!({"action": "fcopy", "path": drop, "file_name": "c.bin", "size": 50_000,
                   "cancel_after": 12_288}),
            // The host announces 1000 bytes and sends 50000: the first fragment past the
            // announced size is refused.
            json!({"action": "fcopy", "path": drop, "file_name": "d.bin", "size": 50_000,
                   "file_size": 1000, "expect": "HV_INVALIDARG"}),
            // The host announces more than it sends: COMPLETE fails.
            json!({"action": "fcopy", "path": drop, "file_name": "e.bin", "text": "short",
                   "file_size": 10, "expect": "HV_E_FAIL"}),
        ],
    );
    assert_all_ok(&entries);
    let cancelled = &entries[1];
    assert_eq!(cancelled["cancelled"], true, "{cancelled}");
    assert_eq!(cancelled["cancel"], "HV_S_OK");
    assert_eq!(cancelled["bytes_sent"], 12_288);
    assert_eq!(entries[2]["failed_write"]["offset"], 0, "{}", entries[2]);
    assert_eq!(entries[3]["complete"], "HV_E_FAIL");
    assert_eq!(listing(&g.drop), Vec::<String>::new());
}

/// An IC packet of an fcopy request with the versions hvisd negotiates, as hex.
fn fcopy_packet_hex(request: &FcopyRequest<'_>, transaction_id: u8) -> String {
    let versions = Negotiated {
        framework: IcVersion::new(3, 0),
        message: IcVersion::new(1, 1),
    };
    let body = request.build().unwrap();
    let packet =
        hvisd_ic::host::message(MessageType::FCOPY, versions, &body, transaction_id).unwrap();
    packet.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_host_that_goes_away_mid_copy_leaves_no_partial_file() {
    let g = guest();
    let start = FcopyRequest::Start(StartFcopy {
        file_name: "half.bin".into(),
        path_name: g.drop.display().to_string(),
        flags: CopyFlags::new(false, false),
        file_size: 10_000,
    });
    let write = FcopyRequest::Write {
        offset: 0,
        data: &[7; 5000],
    };
    let script = json!([
        {"action": "offer", "service": "fcopy"},
        {"action": "raw", "name": "fcopy", "hex": fcopy_packet_hex(&start, 1), "expect_reply": true},
        {"action": "raw", "name": "fcopy", "hex": fcopy_packet_hex(&write, 2), "expect_reply": true},
        {"action": "sleep", "ms": 1500},
        {"action": "rescind", "name": "fcopy"},
    ]);
    let host = HostProcess::start(g.root.path(), &script.to_string());
    // Half the file is in the temporary file, and only there.
    let deadline = Instant::now() + TIMEOUT;
    let temp = loop {
        let names = listing(&g.drop);
        if let Some(name) = names.iter().find(|n| n.starts_with(".hvisd-fcopy-")) {
            break g.drop.join(name);
        }
        assert!(
            Instant::now() < deadline,
            "no temporary file appeared: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let entries = transcript(&host.finish(TIMEOUT));
    assert_all_ok(&entries);
    // Both answered HV_S_OK (icmsg_hdr.status is at bytes 20..24 of the payload).
    for e in &entries[1..3] {
        let hex = e["received_hex"].as_str().unwrap();
        assert_eq!(&hex[40..48], "00000000", "{e}");
    }
    assert!(!g.drop.join("half.bin").exists());
    // The guest closes the rescinded channel and drops the copy: its temporary file goes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while temp.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(listing(&g.drop), Vec::<String>::new());
}
