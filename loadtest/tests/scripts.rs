//! The host tuning script runs in dry-run mode and proposes every setting with its reason, changing nothing.

use std::path::Path;
use std::process::Command;

#[test]
fn tune_host_dry_run_lists_settings_and_changes_nothing() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tune-host.sh");
    let before = std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .arg("--dry-run")
        .output()
        .expect("run tune-host.sh");
    assert!(
        out.status.success(),
        "tune-host.sh --dry-run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "fs.file-max",
        "fs.nr_open",
        "net.core.somaxconn",
        "net.ipv4.tcp_mem",
        "net.ipv4.ip_local_port_range",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} missing:\n{text}"));
        // current, proposed, action, and a reason after them.
        assert!(
            line.split_whitespace().count() >= 5,
            "{key} has no reason: {line}"
        );
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/core/somaxconn").unwrap(),
        before,
        "dry run changed a sysctl"
    );
}
