//! `hvisd sim`, the main job, end to end: the built-in tour with the example plugins, as a
//! separate process, in its human form and as JSON. As root the tour's backup really freezes a
//! loop-mounted image the tour makes in a private mount namespace (the only mount its policy
//! allows); otherwise it uses the dry-run freezer and says so.

use hvisd_e2e::{example_plugins_dir, hvisd_bin};
use std::process::{Command, Stdio};

fn sim(args: &[&str]) -> std::process::Output {
    let dir = example_plugins_dir();
    let home = tempfile::tempdir().unwrap();
    Command::new(hvisd_bin())
        .arg("sim")
        .arg("--plugins")
        .arg(&dir)
        .args(args)
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .output()
        .expect("running hvisd sim")
}

#[test]
fn the_tour_passes_and_says_so_one_line_per_step() {
    let out = sim(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hvisd sim failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.trim_start()
                .split_once(". ")
                .is_some_and(|(n, _)| n.parse::<u32>().is_ok())
        })
        .collect();
    assert_eq!(steps.len(), 11, "{text}");
    assert!(steps.iter().all(|l| l.contains(" ok ")), "{text}");
    for needle in [
        "app.version",
        "app-version heard the SET",
        "\"held\" while frozen, \"released\" after THAW",
        "reply 12:00 UTC",
        "11 of 11 steps passed",
        "written whole",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    let root = rustix::process::geteuid().is_root();
    assert_eq!(
        text.contains("real FIFREEZE/FITHAW"),
        root,
        "root freezes the tour's own loop mount, others use the dry run:\n{text}"
    );
    // Nothing of the tour's loop mount is left in this (the test's) namespace.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("hvisd-sim-freeze"), "{mounts}");
}

#[test]
fn the_tour_as_json_carries_verdicts_timings_and_the_transcript() {
    let out = sim(&["--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["failed"], 0);
    assert_eq!(report["passed"], 11);
    let steps = report["steps"].as_array().unwrap();
    assert!(steps.iter().all(|s| s["ok"] == true && s["ms"].is_number()));
    assert!(report["transcript"].as_array().unwrap().len() > 20);
}

#[test]
fn a_closed_stdout_ends_the_output_quietly() {
    let dir = example_plugins_dir();
    let mut child = Command::new(hvisd_bin())
        .args(["sim", "--plugins"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close our end of its stdout before it writes the report.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 141, as a tool that SIGPIPE ended (see cli_output): no panic, no error message.
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("error"),
        "{stderr}"
    );
}
