//! `hvisd plugin check` on real components.

mod common;

use common::*;
use hvisd_plugin_host::World;

#[test]
fn check_names_the_worlds_and_imports_and_accepts_a_matching_manifest() {
    let report = hvisd_plugin_host::check(
        &wasm("app-version"),
        Some(&manifest(
            "app-version",
            "app-version",
            &[World::KvpProvider],
            &["app.*"],
        )),
    )
    .expect("check");
    assert_eq!(report.worlds, vec![World::KvpProvider]);
    assert!(
        report
            .imports
            .iter()
            .any(|i| i == "hyperv:integration/types@0.1.0")
    );
    assert!(report.unsatisfied_imports.is_none());
    let verdict = report.manifest.as_ref().expect("verdict");
    assert!(verdict.accepted, "{report}");
    assert!(report.ok());
    let human = report.to_string();
    assert!(human.contains("implements: kvp-provider"), "{human}");
    assert!(
        human.contains("manifest `app-version`: accepted"),
        "{human}"
    );
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["worlds"][0], "kvp-provider");
}

#[test]
fn check_reports_every_world_of_the_combined_plugin() {
    let report = hvisd_plugin_host::check(&wasm("misbehave"), None).expect("check");
    assert_eq!(report.worlds, World::ALL.to_vec());
}

#[test]
fn check_refuses_a_manifest_claiming_a_world_the_component_lacks() {
    let report = hvisd_plugin_host::check(
        &wasm("status-echo"),
        Some(&manifest("s", "status-echo", &[World::KvpProvider], &["*"])),
    )
    .expect("check");
    assert_eq!(report.worlds, vec![World::HvsockService]);
    let v = report.manifest.as_ref().expect("verdict");
    assert!(!v.accepted);
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("claims `kvp-provider`")),
        "{report}"
    );
    assert!(
        v.warnings.iter().any(|w| w.contains("hvsock-service")),
        "{report}"
    );
    assert!(!report.ok());
}

#[test]
fn check_flags_a_component_that_imports_sockets() {
    let report = hvisd_plugin_host::check(&wasm("uses-sockets"), None).expect("check");
    assert!(
        report
            .imports
            .iter()
            .any(|i| i.starts_with("wasi:sockets/")),
        "{report}"
    );
    assert!(report.unsatisfied_imports.is_some());
    assert_eq!(report.worlds, vec![World::KvpProvider]);
    assert!(!report.ok());
}
