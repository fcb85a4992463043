//! The libvirt domain in `contrib/libvirt/` (and the snippet README shows from it) is valid
//! for libvirt's own domain schema, as `virt-xml-validate` (package libvirt-clients) checks it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::run_to_exit;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn validate(file: &Path) -> common::Finished {
    let found = Command::new("sh")
        .args(["-c", "command -v virt-xml-validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "virt-xml-validate is missing: install libvirt-clients (scripts/test.sh does)"
    );
    run_to_exit(Command::new("virt-xml-validate").arg(file).arg("domain"))
}

#[test]
fn the_example_domain_is_valid_for_libvirt() {
    let domain = repo("contrib/libvirt/ringfence-domain.xml");
    let out = validate(&domain);
    assert!(
        out.status.success(),
        "virt-xml-validate: {}\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );

    // The validator does look at the disk: a vhostuser disk on a TCP source is refused.
    let text = std::fs::read_to_string(&domain).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.xml");
    std::fs::write(
        &broken,
        text.replace("<source type='unix'", "<source type='tcp'"),
    )
    .unwrap();
    assert!(
        !validate(&broken).status.success(),
        "a TCP vhostuser source passed"
    );
}

#[test]
fn the_readme_snippet_is_the_example_domain() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let domain = std::fs::read_to_string(repo("contrib/libvirt/ringfence-domain.xml")).unwrap();
    let start = readme
        .find("<memoryBacking>")
        .expect("README shows the libvirt snippet");
    let end = readme[start..].find("```").expect("end of the snippet") + start;
    let lines: Vec<&str> = readme[start..end]
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "...")
        .collect();
    assert!(lines.len() > 8, "{lines:?}");
    let dom: Vec<&str> = domain.lines().map(str::trim).collect();
    for l in lines {
        assert!(
            dom.contains(&l),
            "README line not in the validated domain: {l}"
        );
    }
}
