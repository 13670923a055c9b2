//! The dashboard pages' unit tests: what pure helpers and pages render.

use super::*;

fn row(id: &str, hardware: &str, release: Option<Option<&str>>) -> DeviceRow {
    let mut device = DeviceRecord::new(id);
    device.hardware = Some(hardware.into());
    device.agent = release.map(|release| edgefleet_shared::AgentStatus {
        target: "aarch64-unknown-linux-musl".into(),
        release: release.map(str::to_string),
    });
    DeviceRow {
        device,
        insight: None,
        compliance: Compliance::OnTarget,
        attention: Vec::new(),
    }
}

fn viewer() -> Viewer {
    Viewer {
        name: "ops".into(),
        scope: Scope::Read,
        csrf: "c".into(),
    }
}

#[test]
fn the_overview_counts_agent_releases_per_hardware_class() {
    let rows = [
        row("pi-1", "rpi4", Some(Some("1.2.0"))),
        row("pi-2", "rpi4", Some(Some("1.2.0"))),
        row("pi-3", "rpi4", Some(None)),
        row("orin-1", "jetson", None),
    ];
    let html = overview(
        &viewer(),
        &Overview {
            now: 100,
            rows: &rows,
            rollouts: &[],
            series: &[],
            window: Window::Hour,
        },
    )
    .into_string();
    let table = html
        .split("id=\"agent-releases\"")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .expect("the agent releases table");
    let cells = |hw: &str, release: &str, n: usize| {
        format!("<a href=\"/ui/devices?hardware={hw}\">{hw}</a></th><td>{release}</td><td class=\"num\">{n}</td>")
    };
    for (hw, release, n) in [
        ("jetson", "–", 1),
        ("rpi4", "1.2.0", 2),
        ("rpi4", "factory", 1),
    ] {
        assert!(
            table.contains(&cells(hw, release, n)),
            "{hw} {release}: {table}"
        );
    }
}

#[test]
fn the_device_page_shows_its_agent_release_and_target() {
    let device = row("pi-1", "rpi4", Some(Some("1.2.0")));
    let html = device_page_html(&device);
    assert!(
        html.contains("<dt>Agent release</dt><dd>1.2.0 (aarch64-unknown-linux-musl)</dd>"),
        "{html}"
    );
}

fn device_page_html(row: &DeviceRow) -> String {
    device(
        &viewer(),
        &DevicePage {
            now: 100,
            row,
            telemetry: &[],
            events: &[],
            window: Window::Hour,
        },
    )
    .into_string()
}

#[test]
fn dates_are_civil_utc() {
    assert_eq!(datetime(0), "1970-01-01 00:00 UTC");
    assert_eq!(datetime(951_782_400), "2000-02-29 00:00 UTC");
    assert_eq!(
        datetime(1_795_737_600 + 17 * 3600 + 42 * 60),
        "2026-11-27 17:42 UTC"
    );
}

#[test]
fn device_queries_round_trip_their_filters() {
    let q = DeviceQuery {
        q: "pi 1&".into(),
        state: "failed".into(),
        page: 2,
        ..Default::default()
    };
    assert_eq!(q.with_page(3), "q=pi+1%26&state=failed&page=3");
    assert_eq!(q.with_page(0), "q=pi+1%26&state=failed");
}
