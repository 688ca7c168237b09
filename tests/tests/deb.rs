//! What an operator installs: the systemd unit passes `systemd-analyze verify`, the example config
//! is one `hvisd run` accepts, and the .deb that `packaging/build-deb.sh` builds holds the stripped
//! binary, the unit, the config as a conffile, completions, the man page, the licences and the
//! example plugins.
//!
//! The .deb test needs cargo-deb (`.ci/run` installs it and sets `HVISD_E2E_REQUIRE_CARGO_DEB=1`,
//! so it cannot skip in CI). It packages the `dev` profile's binary, which the other end-to-end
//! tests build anyway, instead of a release build that would add minutes to CI for the same
//! package layout; `HVISD_DEB_PROFILE=release` packages the release build.

use hvisd_e2e::workspace_root;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn have(tool: &str, version_arg: &str) -> bool {
    Command::new(tool)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

const UNIT: &str = "packaging/systemd/hvisd.service";

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze", "--version") {
        println!("SKIP: systemd-analyze is not installed");
        return;
    }
    let unit = std::fs::read_to_string(workspace_root().join(UNIT)).unwrap();
    // verify checks that ExecStart's program exists: point it at the binary the tests build, in
    // a copy of the unit with the same name.
    let dir = tempfile::tempdir().unwrap();
    let bin = hvisd_e2e::hvisd_bin();
    assert!(unit.contains("ExecStart=/usr/sbin/hvisd "), "{unit}");
    let copy = dir.path().join("hvisd.service");
    std::fs::write(
        &copy,
        unit.replace("=/usr/sbin/hvisd ", &format!("={} ", bin.display())),
    )
    .unwrap();
    // The man page is installed by the package, not on this machine (`--man=no`); the .deb test
    // checks it is in the package.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("running systemd-analyze");
    let messages = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{messages}"
    );
    // verify only warns about unknown directives and bad values; any message is a defect.
    let ours: Vec<&str> = messages
        .lines()
        .filter(|l| l.contains("hvisd.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify:\n{messages}");
}

#[test]
fn example_config_is_one_hvisd_run_accepts() {
    let path = workspace_root().join("host-runtime/examples/hvisd.toml");
    let config = hvisd::config::Config::load(&path).expect("the example config loads");
    assert_eq!(config.kvp.pool_dir, Path::new("/var/lib/hyperv"));
    assert_eq!(
        config.plugins.cache_dir,
        Path::new("/var/cache/hvisd/plugins")
    );
    // The unit runs hvisd with exactly this file.
    let unit = std::fs::read_to_string(workspace_root().join(UNIT)).unwrap();
    assert!(unit.contains("--config /etc/hvisd/hvisd.toml"), "{unit}");
}

/// The files of a .deb, from `dpkg-deb -c` (paths without the leading `.`).
fn contents(deb: &Path) -> Vec<String> {
    let out = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').to_owned())
        .collect()
}

#[test]
fn deb_holds_the_stripped_binary_unit_conffile_completions_man_page_licences_and_plugins() {
    let have_cargo_deb = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_cargo_deb || !have("dpkg-deb", "--version") {
        assert!(
            std::env::var_os("HVISD_E2E_REQUIRE_CARGO_DEB").is_none(),
            "HVISD_E2E_REQUIRE_CARGO_DEB is set but cargo-deb or dpkg-deb is missing"
        );
        println!(
            "SKIP: needs cargo-deb (cargo install cargo-deb --locked) and dpkg-deb to build the .deb"
        );
        return;
    }
    let profile = std::env::var("HVISD_DEB_PROFILE").unwrap_or_else(|_| "dev".into());
    let out = run(
        Command::new(workspace_root().join("packaging/build-deb.sh"))
            .args(["--profile", &profile])
            .current_dir(workspace_root()),
    );
    let deb = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    assert!(deb.is_file(), "build-deb.sh printed {deb:?}");

    let files = contents(&deb);
    for expected in [
        "/usr/sbin/hvisd",
        "/usr/lib/systemd/system/hvisd.service",
        "/usr/lib/sysusers.d/hvisd.conf",
        "/etc/hvisd/hvisd.toml",
        "/usr/share/man/man8/hvisd.8.gz",
        "/usr/share/bash-completion/completions/hvisd",
        "/usr/share/zsh/vendor-completions/_hvisd",
        "/usr/share/fish/vendor_completions.d/hvisd.fish",
        "/usr/share/doc/hvisd/LICENSE-MIT",
        "/usr/share/doc/hvisd/LICENSE-APACHE",
        "/usr/share/doc/hvisd/copyright",
        "/usr/lib/hvisd/plugins/app_version.wasm",
        "/usr/lib/hvisd/plugins/flush_hold.wasm",
        "/usr/lib/hvisd/plugins/status_echo.wasm",
    ] {
        assert!(
            files.iter().any(|f| f == expected),
            "{expected} is not in {}:\n{}",
            deb.display(),
            files.join("\n")
        );
    }

    let unpacked = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-R")
        .arg(&deb)
        .arg(unpacked.path()));
    let root = unpacked.path();

    // Stripped: no symbol table, no debug information (`.debug_gdb_scripts`, rustc's pointer to
    // its pretty-printers, is not debug information and stays).
    let sections = run(Command::new("readelf")
        .args(["-S", "-W"])
        .arg(root.join("usr/sbin/hvisd")));
    let sections = String::from_utf8_lossy(&sections.stdout);
    for section in [".symtab", ".debug_info", ".debug_line", ".debug_str"] {
        assert!(
            !sections.contains(&format!("{section} ")),
            "/usr/sbin/hvisd is not stripped, it has {section}:\n{sections}"
        );
    }

    let control = std::fs::read_to_string(root.join("DEBIAN/control")).unwrap();
    assert!(
        control.contains("\nConflicts: hyperv-daemons\n"),
        "{control}"
    );
    let conffiles = std::fs::read_to_string(root.join("DEBIAN/conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/hvisd/hvisd.toml"),
        "{conffiles}"
    );
    // The maintainer scripts enable and start the unit and create the plugin user.
    let postinst = std::fs::read_to_string(root.join("DEBIAN/postinst")).unwrap();
    assert!(
        postinst.contains("hvisd.service") && postinst.contains("systemd-sysusers"),
        "{postinst}"
    );

    // The packaged files are the repository's, and the generated ones come from this CLI.
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/hvisd.service")).unwrap();
    assert_eq!(
        unit,
        std::fs::read_to_string(workspace_root().join(UNIT)).unwrap()
    );
    let bash =
        std::fs::read_to_string(root.join("usr/share/bash-completion/completions/hvisd")).unwrap();
    for sub in ["run", "kvp", "plugin", "completions", "man"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
    let plugin = root.join("usr/lib/hvisd/plugins/app_version.wasm");
    let check = run(Command::new(hvisd_e2e::hvisd_bin())
        .args(["plugin", "check"])
        .arg(&plugin));
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("kvp-provider"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}
