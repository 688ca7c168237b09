//! The freeze sandbox itself (`hvisd_e2e::freeze_sandbox`): its root is a tmpfs that refuses
//! FIFREEZE and hides the real root, its images are mounted inside only, a freeze inside really
//! blocks writers, the namespace outlives the processes run in it, and its guard leaves nothing
//! mounted, frozen or bound to a loop device, whether the test drops it, closes it or panics.
//!
//! Needs root (CI runs as root); otherwise every test prints why it skips.

use std::io::BufRead;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use hvisd_e2e::freeze_sandbox::{
    FreezeSandbox, ImageSpec, MountEntry, SandboxImage, loop_devices_of, parse_mountinfo,
    processes_in_mount_namespace, release_image,
};
use rustix::process::Signal;

/// How long a writer must stay blocked on a frozen image to count as blocked.
const BLOCKED_FOR: Duration = Duration::from_millis(300);

fn sandbox(images: &[ImageSpec]) -> Option<FreezeSandbox> {
    images
        .iter()
        .fold(FreezeSandbox::builder(), |builder, spec| {
            builder.image(spec.clone())
        })
        .build_or_skip()
}

fn host_mounts() -> Vec<MountEntry> {
    parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").expect("own mountinfo"))
}

/// What a sandbox leaves once it is gone: nothing. No loop device bound to its images (a
/// frozen or still-mounted file system would keep one), none of its file systems in the host's
/// mount table, no process in its mount namespace, no temporary directory.
fn assert_nothing_left(images: &[SandboxImage], namespace: &str) {
    let host = host_mounts();
    for image in images {
        assert_eq!(
            loop_devices_of(&image.image),
            Vec::<String>::new(),
            "{} is still bound to a loop device",
            image.image.display()
        );
        assert!(
            !host.iter().any(|m| m.dev == image.dev
                || Path::new(&m.source) == image.loop_device
                || Path::new(&m.mount_point).starts_with(work_dir(image))),
            "the host's mount table still shows {}:\n{host:#?}",
            image.mount_point.display()
        );
        assert!(
            !work_dir(image).exists(),
            "{} was not removed",
            work_dir(image).display()
        );
    }
    assert_eq!(
        processes_in_mount_namespace(namespace),
        Vec::<u32>::new(),
        "processes are left in {namespace}"
    );
}

/// The sandbox's temporary directory (the images live in its `images/`).
fn work_dir(image: &SandboxImage) -> PathBuf {
    image
        .image
        .ancestors()
        .nth(2)
        .expect("DIR/images/IMAGE")
        .to_owned()
}

/// Starts `echo x > MP/f && sync MP/f` inside, which blocks while `MP` is frozen.
fn start_writer(sandbox: &FreezeSandbox, mount_point: &str) -> hvisd_e2e::SandboxProcess {
    let script = format!("echo x > {mount_point}/f && sync {mount_point}/f");
    sandbox.spawn_program("/bin/sh", &["-c", &script], &[])
}

#[test]
fn the_root_is_a_tmpfs_that_refuses_fifreeze_and_the_real_root_is_out_of_reach() {
    let Some(sandbox) = sandbox(&[ImageSpec::ext4("/mnt/a", 16)]) else {
        return;
    };
    // A file of the real root: neither its path nor /proc/1/root may lead to it.
    let marker = tempfile::Builder::new()
        .prefix("freeze-sandbox-marker.")
        .tempfile()
        .expect("marker file on the host");
    let marker = marker.path().display().to_string();
    assert!(Path::new(&marker).exists());
    let seen = sandbox.run_ok(&format!(
        "test -e '{marker}' && echo seen; test -e '/proc/1/root{marker}' && echo seen-via-proc; \
         true"
    ));
    assert_eq!(seen, "", "{marker} is reachable inside");
    assert_eq!(
        sandbox.run_ok("ls -A /proc/1/root/"),
        sandbox.run_ok("ls -A /"),
        "PID 1's root is not the sandbox's tmpfs"
    );

    assert_eq!(sandbox.run_ok("stat -f -c %T /").trim(), "tmpfs");
    assert_eq!(sandbox.run_ok("pwd").trim(), "/");
    let mounts = parse_mountinfo(&sandbox.run_ok("cat /proc/self/mountinfo"));
    let root = mounts
        .iter()
        .find(|m| m.mount_point == "/")
        .expect("a / mount");
    assert_eq!(root.fs_type, "tmpfs");
    let mut points: Vec<&str> = mounts.iter().map(|m| m.mount_point.as_str()).collect();
    points.sort_unstable();
    assert_eq!(points, ["/", "/dev/shm", "/mnt/a", "/proc", "/run", "/tmp"]);

    // /dev holds no disk of the machine; /proc shows only the sandbox's processes.
    let loop_node = sandbox.images()[0].loop_device.display().to_string();
    let mut devices: Vec<String> = sandbox
        .run_ok("ls -A /dev")
        .split_whitespace()
        .map(|d| format!("/dev/{d}"))
        .collect();
    devices.sort();
    let mut expected: Vec<String> = [
        "fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero",
    ]
    .iter()
    .map(|d| format!("/dev/{d}"))
    .chain([loop_node])
    .collect();
    expected.sort();
    assert_eq!(devices, expected);
    let pids = sandbox.run_ok("ls /proc | grep -c '^[0-9]'");
    assert!(
        pids.trim().parse::<u32>().is_ok_and(|n| n <= 5),
        "the sandbox's /proc shows {pids} processes"
    );
    // PID 1 runs the sandbox's own `sleep`, with the sandbox's own /dev/null as stdio.
    assert_eq!(
        sandbox.run_ok("readlink /proc/1/exe /proc/1/fd/0 /proc/1/fd/1 /proc/1/fd/2"),
        "/bin/sleep\n/dev/null\n/dev/null\n/dev/null\n"
    );
    // Nothing the test process inherited without close-on-exec reaches the sandbox.
    let fds = "cd /proc/$PID/fd && for fd in *; do echo \"$fd $(readlink $fd)\"; done";
    assert_eq!(
        sandbox.run_ok(&fds.replace("$PID", "1")),
        "0 /dev/null\n1 /dev/null\n2 /dev/null\n"
    );
    let sleeper = sandbox.spawn_program("/bin/sleep", &["10"], &[]);
    let proc_dir = format!("/proc/{}", sleeper.pid());
    // Until it has executed `sleep` it is nsenter's fork, with nsenter's descriptors; and until
    // it sleeps, the dynamic loader may still hold a library open. Wait for the sleep itself
    // (`/proc/PID/syscall` names nanosleep, 35, or clock_nanosleep, 230, on x86-64).
    let start = Instant::now();
    let sleeping = || {
        std::fs::read_link(format!("{proc_dir}/exe")).is_ok_and(|exe| exe.ends_with("sleep"))
            && std::fs::read_to_string(format!("{proc_dir}/syscall"))
                .is_ok_and(|s| s.starts_with("230 ") || s.starts_with("35 "))
    };
    while !sleeping() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sleep never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fds: Vec<(String, PathBuf)> = std::fs::read_dir(format!("{proc_dir}/fd"))
        .expect("the fds of a process started inside")
        .map(|fd| {
            let fd = fd
                .expect("fd entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            let target = std::fs::read_link(format!("{proc_dir}/fd/{fd}")).unwrap_or_default();
            (fd, target)
        })
        .collect();
    fds.sort();
    let numbers: Vec<&str> = fds.iter().map(|(fd, _)| fd.as_str()).collect();
    assert_eq!(numbers, ["0", "1", "2"], "{fds:?}");
    drop(sleeper);

    // The guard on the first line is what makes this safe to run at all: it only freezes `/`
    // if `/` is a tmpfs, and thaws it right away if the kernel ever accepted.
    let out = sandbox.run(
        "[ \"$(stat -f -c %T /)\" = tmpfs ] || exit 99; \
         fsfreeze --freeze /; rc=$?; fsfreeze --unfreeze / 2>/dev/null; exit $rc",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "fsfreeze -f / inside: {stderr}");
    assert!(stderr.contains("Operation not supported"), "{stderr}");

    sandbox.close().expect("clean teardown");
}

#[test]
fn ext4_and_xfs_images_are_mounted_inside_and_invisible_to_the_host() {
    let Some(sandbox) = sandbox(&[ImageSpec::ext4("/mnt/a", 16), ImageSpec::xfs("/mnt/b", 300)])
    else {
        return;
    };
    let inside = parse_mountinfo(&sandbox.run_ok("cat /proc/self/mountinfo"));
    let host = host_mounts();
    for (image, fs) in sandbox.images().iter().zip(["ext4", "xfs"]) {
        let mp = image.mount_point.display().to_string();
        let entry = inside
            .iter()
            .find(|m| m.mount_point == mp)
            .unwrap_or_else(|| panic!("{mp} is not mounted inside: {inside:#?}"));
        assert_eq!(entry.fs_type, fs);
        assert_eq!(entry.dev, image.dev);
        assert_eq!(Path::new(&entry.source), image.loop_device);
        assert_eq!(
            loop_devices_of(&image.image),
            [image.loop_device.display().to_string()]
        );
        assert!(
            !host.iter().any(|m| m.dev == image.dev
                || Path::new(&m.source) == image.loop_device
                || Path::new(&m.mount_point).starts_with(work_dir(image))),
            "the host sees {mp}:\n{host:#?}"
        );
        // Usable, and sparse on the host.
        let text = sandbox.run_ok(&format!("echo hello-{fs} > {mp}/f && cat {mp}/f"));
        assert_eq!(text.trim(), format!("hello-{fs}"));
        let meta = std::fs::metadata(&image.image).expect("image file");
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < meta.len() / 2,
            "{} is not sparse",
            image.image.display()
        );
    }
    // The test can reach the sandbox's files from the host through the holder's root.
    let through_host = std::fs::read_to_string(sandbox.host_path("/mnt/b/f")).expect("via /proc");
    assert_eq!(through_host.trim(), "hello-xfs");
    sandbox.close().expect("clean teardown");
}

#[test]
fn a_writer_blocks_on_a_frozen_image_until_it_is_thawed() {
    let Some(sandbox) = sandbox(&[ImageSpec::ext4("/mnt/a", 16), ImageSpec::xfs("/mnt/b", 300)])
    else {
        return;
    };
    for mp in ["/mnt/a", "/mnt/b"] {
        sandbox.freeze(mp);
        let mut writer = start_writer(&sandbox, mp);
        assert!(
            writer.wait_exit(BLOCKED_FOR).is_none(),
            "a writer on frozen {mp} was not blocked: {}",
            writer.stderr()
        );
        assert!(sandbox.thaw(mp), "{mp} was not frozen");
        let status = writer.wait_exit(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "the writer on {mp} did not finish after the thaw: {status:?} {}",
            writer.stderr()
        );
        assert_eq!(sandbox.run_ok(&format!("cat {mp}/f")), "x\n");
        assert!(!sandbox.thaw(mp), "{mp} is still frozen");
    }
    sandbox.close().expect("clean teardown");
}

#[test]
fn dropping_the_sandbox_thaws_frozen_images_and_detaches_their_loop_devices() {
    let Some(sandbox) = sandbox(&[ImageSpec::ext4("/mnt/a", 16), ImageSpec::xfs("/mnt/b", 300)])
    else {
        return;
    };
    let images = sandbox.images().to_vec();
    let namespace = sandbox.namespace_id().to_string();
    sandbox.freeze("/mnt/a");
    sandbox.freeze("/mnt/b");
    // A writer blocked on the frozen image when the sandbox goes: it must not keep it mounted.
    let mut writer = start_writer(&sandbox, "/mnt/a");
    assert!(writer.wait_exit(BLOCKED_FOR).is_none());
    drop(sandbox);
    assert_nothing_left(&images, &namespace);
    assert!(
        writer.wait_exit(Duration::from_secs(5)).is_some(),
        "the writer outlived the sandbox"
    );
}

#[test]
fn a_daemon_killed_while_an_image_is_frozen_leaves_its_namespace_to_the_next_one() {
    let Some(sandbox) = sandbox(&[ImageSpec::ext4("/mnt/a", 16)]) else {
        return;
    };
    let args = ["run", "--transport", "shm:/run/hvisd-sim"];
    sandbox.run_ok("mkdir -p /run/hvisd-sim && echo kept > /run/marker");
    let mut first = sandbox.spawn(&args, &[]);
    first.wait_for_log("watching shm root", Duration::from_secs(30));
    let mounts_seen_by_first = first.mountinfo().expect("first daemon's mountinfo");
    let run_before = sandbox.run_ok("ls -A /run");

    sandbox.freeze("/mnt/a");
    first.signal(Signal::KILL);
    let status = first
        .wait_exit(Duration::from_secs(5))
        .expect("SIGKILL ends it");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    let second = sandbox.spawn(&args, &[]);
    second.wait_for_log("watching shm root", Duration::from_secs(30));
    assert_ne!(second.pid(), 0);
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/ns/mnt", second.pid()))
            .expect("second daemon's namespace")
            .display()
            .to_string(),
        sandbox.namespace_id()
    );
    assert_eq!(
        parse_mountinfo(&second.mountinfo().expect("second daemon's mountinfo")),
        parse_mountinfo(&mounts_seen_by_first)
    );
    assert_eq!(sandbox.run_ok("ls -A /run"), run_before);
    assert_eq!(sandbox.run_ok("cat /run/marker"), "kept\n");

    // Still frozen for the second daemon: a writer blocks until the test thaws.
    let mut writer = start_writer(&sandbox, "/mnt/a");
    assert!(writer.wait_exit(BLOCKED_FOR).is_none());
    assert!(sandbox.thaw("/mnt/a"));
    assert!(
        writer
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    drop(second);
    sandbox.close().expect("clean teardown");
}

#[test]
fn a_test_body_that_panics_while_an_image_is_frozen_leaves_nothing_behind() {
    let made: Mutex<Option<(Vec<SandboxImage>, String)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let Some(sandbox) = sandbox(&[ImageSpec::ext4("/mnt/a", 16)]) else {
            return;
        };
        *made.lock().expect("lock") = Some((
            sandbox.images().to_vec(),
            sandbox.namespace_id().to_string(),
        ));
        sandbox.freeze("/mnt/a");
        panic!("this test body panics on purpose while /mnt/a is frozen");
    }));
    let Some((images, namespace)) = made.into_inner().expect("lock") else {
        return; // skipped
    };
    assert!(result.is_err(), "the body was meant to panic");
    assert_nothing_left(&images, &namespace);
}

/// Set in the child process of the SIGKILL test: it builds a sandbox, freezes `/mnt/a`, says
/// where everything is, and waits to be killed.
const SIGKILL_CHILD: &str = "HVISD_FREEZE_SANDBOX_SIGKILL_CHILD";

/// Releases the images a killed child left, even if the test fails half-way.
struct ReleaseOnDrop(Vec<PathBuf>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        for image in &self.0 {
            if let Err(e) = release_image(image) {
                eprintln!("!!! {e}");
            }
        }
    }
}

#[test]
fn a_killed_test_process_leaves_only_its_frozen_image_bound_and_release_image_frees_it() {
    let name =
        "a_killed_test_process_leaves_only_its_frozen_image_bound_and_release_image_frees_it";
    if std::env::var_os(SIGKILL_CHILD).is_some() {
        let Some(sandbox) =
            sandbox(&[ImageSpec::ext4("/mnt/a", 16), ImageSpec::ext4("/mnt/b", 16)])
        else {
            println!("SKIP");
            return;
        };
        sandbox.freeze("/mnt/a");
        let images = sandbox.images();
        println!(
            "READY {} {} {}",
            sandbox.namespace_id(),
            images[0].image.display(),
            images[1].image.display()
        );
        std::thread::sleep(Duration::from_secs(60));
        return;
    }

    let mut child = Command::new(std::env::current_exe().expect("this test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(SIGKILL_CHILD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the child test process");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            // libtest may print "test NAME ... " on the same line first.
            if let Some(at) = line.find("READY ").or_else(|| line.find("SKIP")) {
                let _ = tx.send(line[at..].to_string());
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(120));
    // Killed by its own PID, before anything else can fail.
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("the child never got its sandbox ready");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [_, namespace, frozen, thawed] = fields[..] else {
        eprintln!("skipping: the child could not build a sandbox");
        return;
    };
    let (frozen, thawed) = (PathBuf::from(frozen), PathBuf::from(thawed));
    let work_dir = frozen
        .ancestors()
        .nth(2)
        .expect("DIR/images/IMAGE")
        .to_owned();
    let _release = ReleaseOnDrop(vec![frozen.clone(), thawed.clone()]);

    // Its holder died with it (parent-death signal), and the namespace with its last process.
    let start = Instant::now();
    while !processes_in_mount_namespace(namespace).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the namespace outlived the test process"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The image that was not frozen lost its loop device with its last mount...
    while !loop_devices_of(&thawed).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} stayed bound",
            thawed.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // ...the frozen one is still frozen and keeps its device: what the guard could not undo.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(loop_devices_of(&frozen).len(), 1);
    release_image(&frozen).expect("releasing the frozen image");
    assert!(loop_devices_of(&frozen).is_empty());
    std::fs::remove_dir_all(&work_dir).expect("removing the killed child's files");
}
