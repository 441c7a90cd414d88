//! Checks the architecture's edges: which workspace crates each crate may depend on
//! (dependencies point down, see docs/ARCHITECTURE.md), and where `unsafe` may appear.

use std::collections::BTreeMap;
use std::path::Path;

const WORKSPACE_CRATES: [&str; 12] = [
    "model",
    "pki",
    "policy",
    "store",
    "cluster",
    "volume",
    "vhost-blk",
    "hypervisor",
    "api",
    "cli",
    "converge",
    "sim",
];

fn allowed() -> BTreeMap<&'static str, Vec<&'static str>> {
    BTreeMap::from([
        ("model", vec![]),
        ("pki", vec![]),
        ("policy", vec!["model"]),
        ("store", vec!["model"]),
        ("cluster", vec!["model", "policy", "pki"]),
        ("volume", vec!["model", "store", "pki"]),
        ("vhost-blk", vec!["model", "store", "volume"]),
        ("hypervisor", vec!["model"]),
        ("api", vec!["model", "pki", "store", "cluster", "volume", "vhost-blk", "hypervisor"]),
        ("cli", vec!["model", "store", "api"]),
        ("converge", vec!["model", "pki", "store", "cluster", "volume", "vhost-blk", "hypervisor", "api", "cli"]),
        // dev layer: drives the pure decisions, never the binary
        ("sim", vec!["model", "volume"]),
    ])
}

fn crates_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The workspace crates named in a manifest's `[dependencies]` section.
fn internal_dependencies(manifest: &str) -> Vec<String> {
    let mut in_dependencies = false;
    let mut found = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_dependencies = line == "[dependencies]";
            continue;
        }
        let name = line.split(['.', '=', ' ']).next().unwrap_or_default();
        if in_dependencies && WORKSPACE_CRATES.contains(&name) {
            found.push(name.to_string());
        }
    }
    found
}

#[test]
fn crates_depend_only_on_crates_below_them() {
    for (krate, allowed) in allowed() {
        let manifest = std::fs::read_to_string(crates_dir().join(krate).join("Cargo.toml")).expect("manifest");
        for dependency in internal_dependencies(&manifest) {
            assert!(allowed.contains(&dependency.as_str()), "{krate} must not depend on {dependency}");
        }
    }
}

#[test]
fn every_crate_directory_is_known_to_the_tidy_check() {
    for entry in std::fs::read_dir(crates_dir()).expect("crates/") {
        let name = entry.expect("entry").file_name().into_string().expect("utf-8 name");
        assert!(allowed().contains_key(name.as_str()), "crate {name} is missing from tidy's dependency rules");
    }
}

#[test]
fn unsafe_code_lives_only_in_the_named_modules() {
    let permitted = [
        "store/src/ring.rs",
        "store/src/buf.rs",
        "hypervisor/src/process.rs",
        // One ioctl: TUNSETIFF, opening a VM NIC's tap.
        "hypervisor/src/net.rs",
        "vhost-blk/src/guest_io.rs",
    ];
    let mut offenders = Vec::new();
    for krate in WORKSPACE_CRATES {
        visit(&crates_dir().join(krate).join("src"), &mut |path, text| {
            let relative = path.strip_prefix(crates_dir()).expect("inside crates/").to_string_lossy().into_owned();
            if text.contains("allow(unsafe_code)") && !permitted.contains(&relative.as_str()) {
                offenders.push(relative);
            }
        });
    }
    assert!(offenders.is_empty(), "unsafe allowed outside the named modules: {offenders:?}");
}

fn visit(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            visit(&path, f);
        } else if path.extension().is_some_and(|e| e == "rs") {
            f(&path, &std::fs::read_to_string(&path).expect("readable file"));
        }
    }
}
