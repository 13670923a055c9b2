//! `fleet-server demo --devices 3 --exit-when-done` runs the main job end
//! to end and exits 0.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

use std::process::Command;
use std::time::{Duration, Instant};

use edgefleet_tests::binary;

#[test]
fn demo_with_three_devices_exits_zero() {
    let agent = binary("edgefleet-agent");
    let started = Instant::now();
    let out = Command::new(binary("fleet-server"))
        .args([
            "demo",
            "--devices",
            "3",
            "--exit-when-done",
            "--http",
            "127.0.0.1:0",
            "--timeout",
            "100",
        ])
        .env("EDGEFLEET_AGENT_BIN", agent)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3 of 3 devices serving digits v1"),
        "{stdout}"
    );
    assert_eq!(stdout.matches(" ok").count(), 3, "{stdout}");
    assert!(started.elapsed() < Duration::from_secs(120));
}
