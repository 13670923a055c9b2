//! `fleetctl devices` (and `fleetctl events`): the fleet's devices.
//! Listing, one device's details, its tags, key and revocation, and the
//! records it streamed. Enrollment is in [`super::enroll`], flashing a
//! board in [`super::flash`].

use fleet_server::api::types::{DeviceDetail, EventRecord, StreamedRecord, Tags};
use fleet_server::store::DeviceRecord;

use crate::cli::DevicesCommand;
use crate::client::{DeviceQuery, StreamQuery};
use crate::commands::parse_tags;
use crate::failure::{refused, Failure};
use crate::output::{ago, or_dash, print_json, print_table};
use crate::Context;

/// The device table's columns.
const HEADERS: [&str; 8] = [
    "DEVICE",
    "STATE",
    "HARDWARE",
    "TAGS",
    "MODELS",
    "DESIRED",
    "AGENT",
    "LAST SEEN",
];

/// The agent release a device reports: its version, `factory` for the
/// packaged executable, `-` when its agent does not say.
fn agent_release(d: &DeviceRecord) -> String {
    match &d.agent {
        Some(a) => a.release.clone().unwrap_or_else(|| "factory".into()),
        None => "-".into(),
    }
}

/// Runs a `devices` command; none given lists every device.
pub async fn run(ctx: &Context, command: Option<&DevicesCommand>) -> Result<(), Failure> {
    let Some(command) = command else {
        return list(
            ctx,
            &DeviceQuery {
                limit: 1000,
                ..Default::default()
            },
        )
        .await;
    };
    match command {
        DevicesCommand::List {
            tags,
            hardware,
            online,
            offline,
            after,
            limit,
        } => {
            let query = DeviceQuery {
                tags: tags.clone(),
                hardware: hardware.clone(),
                online: (*online || *offline).then_some(*online),
                after: after.clone(),
                limit: *limit,
            };
            list(ctx, &query).await
        }
        DevicesCommand::Enroll {
            id,
            hardware,
            tags,
            out,
            profile,
            public_key,
        } => {
            super::enroll::run(
                ctx,
                super::enroll::Enrollment {
                    id,
                    hardware,
                    tags,
                    out,
                    profile: profile.as_deref(),
                    public_key: public_key.as_deref(),
                },
            )
            .await
        }
        DevicesCommand::Flash(args) => super::flash::run(ctx, args).await,
        DevicesCommand::Revoke { id } => {
            let answer = ctx.client.revoke_device(id).await?;
            ctx.report(&answer.raw, || format!("revoked {id}"));
            Ok(())
        }
        DevicesCommand::SetKey { id, public_key } => {
            let answer = ctx.client.set_device_key(id, public_key).await?;
            ctx.report(&answer.raw, || {
                format!("{id} now signs with key {public_key}")
            });
            Ok(())
        }
        DevicesCommand::Tag { id, tags } => {
            let answer = ctx
                .client
                .set_device_tags(id, &Tags(parse_tags(tags)?))
                .await?;
            let tags = serde_json::to_string(&answer.body.tags).map_err(refused)?;
            ctx.report(&answer.raw, || format!("{id}: tags {tags}"));
            Ok(())
        }
        DevicesCommand::Show { id } => {
            let answer = ctx.client.get_device(id).await?;
            if ctx.json {
                print_json(&answer.raw);
            } else {
                for (label, value) in details(&answer.body) {
                    println!("{label:<10} {value}");
                }
            }
            Ok(())
        }
        DevicesCommand::Telemetry {
            id,
            after_seq,
            limit,
        } => {
            let query = StreamQuery {
                after_seq: *after_seq,
                limit: *limit,
                model: None,
            };
            let answer = ctx.client.device_telemetry(id, &query).await?;
            print_records(ctx, &answer.raw, &answer.body.telemetry)
        }
        DevicesCommand::Results {
            id,
            model,
            after_seq,
            limit,
        } => {
            let query = StreamQuery {
                after_seq: *after_seq,
                limit: *limit,
                model: model.clone(),
            };
            let answer = ctx.client.device_results(id, &query).await?;
            print_records(ctx, &answer.raw, &answer.body.results)
        }
    }
}

/// `fleetctl events DEVICE`: a device's recent update events.
pub async fn events(ctx: &Context, device: &str, limit: u32) -> Result<(), Failure> {
    let answer = ctx.client.device_events(device, limit).await?;
    if ctx.json {
        print_json(&answer.raw);
    } else {
        print_table(
            &["WHEN", "EVENT", "DESIRED", "MODEL", "REASON"],
            &event_rows(&answer.body),
        );
    }
    Ok(())
}

async fn list(ctx: &Context, query: &DeviceQuery) -> Result<(), Failure> {
    let answer = ctx.client.list_devices(query).await?;
    if ctx.json {
        print_json(&answer.raw);
    } else {
        print_table(&HEADERS, &rows(&answer.body));
    }
    Ok(())
}

/// A device's state in one word.
fn state(device: &DeviceRecord) -> &'static str {
    match (device.revoked_at, device.online) {
        (Some(_), _) => "revoked",
        (None, true) => "online",
        (None, false) => "offline",
    }
}

/// The device table's rows.
pub fn rows(devices: &[DeviceRecord]) -> Vec<Vec<String>> {
    devices
        .iter()
        .map(|d| {
            let models = d
                .models
                .iter()
                .map(|m| format!("{} v{}", m.name, m.version))
                .collect::<Vec<_>>()
                .join(", ");
            let tags = d
                .tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let desired = format!(
                "{}/{}",
                d.reported_desired_version
                    .map_or("-".into(), |v| v.to_string()),
                d.desired_version
            );
            vec![
                d.id.clone(),
                state(d).into(),
                d.hardware.clone().unwrap_or_else(|| "-".into()),
                or_dash(tags),
                or_dash(models),
                desired,
                agent_release(d),
                ago(d.last_seen),
            ]
        })
        .collect()
}

/// `devices show`: one labelled line per fact.
pub fn details(detail: &DeviceDetail) -> Vec<(&'static str, String)> {
    let d = &detail.device;
    let models: Vec<String> = d
        .models
        .iter()
        .map(|m| format!("{} v{} ({})", m.name, m.version, m.runtime))
        .collect();
    let tags = serde_json::to_string(&d.tags).unwrap_or_else(|_| "-".into());
    vec![
        ("device", d.id.clone()),
        ("state", state(d).into()),
        ("hardware", d.hardware.clone().unwrap_or_else(|| "-".into())),
        ("tags", tags),
        ("key", d.public_key.clone().unwrap_or_else(|| "-".into())),
        (
            "refused",
            detail.rejected_messages.as_ref().map_or("-".into(), |r| {
                format!("{} message(s); last: {}", r.count, r.last_reason)
            }),
        ),
        ("agent", d.agent_version.clone()),
        (
            "agent release",
            match &d.agent {
                Some(a) => format!("{} ({})", agent_release(d), a.target),
                None => "-".into(),
            },
        ),
        ("models", or_dash(models.join(", "))),
        (
            "desired",
            format!(
                "{} (reported {})",
                d.desired_version,
                d.reported_desired_version
                    .map_or("-".into(), |v| v.to_string())
            ),
        ),
        ("last seen", ago(d.last_seen)),
    ]
}

/// The event table's rows.
pub fn event_rows(events: &[EventRecord]) -> Vec<Vec<String>> {
    events
        .iter()
        .map(|e| {
            vec![
                ago(e.at),
                e.kind.clone(),
                e.desired_version.map_or("-".into(), |v| v.to_string()),
                match (&e.model, e.model_version, &e.agent_version) {
                    (Some(m), Some(v), _) => format!("{m} v{v}"),
                    (_, _, Some(release)) => format!("agent {release}"),
                    _ => "-".into(),
                },
                e.reason.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

/// A page of streamed records: the whole answer with `--json`, else one
/// record per line (JSON lines, oldest first).
fn print_records(
    ctx: &Context,
    raw: &serde_json::Value,
    records: &[StreamedRecord],
) -> Result<(), Failure> {
    if ctx.json {
        print_json(raw);
        return Ok(());
    }
    for line in record_lines(records).map_err(refused)? {
        println!("{line}");
    }
    Ok(())
}

/// Streamed records as JSON lines, keys sorted as the server's JSON has
/// them.
pub fn record_lines(records: &[StreamedRecord]) -> serde_json::Result<Vec<String>> {
    records
        .iter()
        .map(|r| serde_json::to_value(r).map(|v| v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(json: serde_json::Value) -> DeviceRecord {
        serde_json::from_value(json).expect("a device record")
    }

    #[test]
    fn device_rows_say_state_models_and_desired_versions() {
        let now = edgefleet_shared::unix_now();
        let online = device(serde_json::json!({
            "id": "jetson-1", "first_seen": now, "last_seen": now, "online": true,
            "agent_version": "0.1.0", "reported_desired_version": 3, "desired_version": 4,
            "models": [{"name": "digits", "version": 2, "sha256": "ab", "runtime": "tract-onnx"},
                       {"name": "kws", "version": 1, "sha256": "cd", "runtime": "tract-onnx"}],
            "hardware": "jetson-orin", "tags": {"site": "lyon", "floor": "2"},
            "agent": {"target": "aarch64-unknown-linux-gnu", "release": "1.2.0"},
        }));
        let revoked = device(serde_json::json!({
            "id": "pi-2", "first_seen": 0, "last_seen": now, "online": true,
            "agent_version": "", "reported_desired_version": null, "desired_version": 0,
            "models": [], "revoked_at": now,
        }));
        let rows = rows(&[online, revoked]);
        assert_eq!(
            rows[0][..6],
            [
                "jetson-1",
                "online",
                "jetson-orin",
                "floor=2,site=lyon",
                "digits v2, kws v1",
                "3/4"
            ]
        );
        assert_eq!(rows[0][6], "1.2.0");
        assert_eq!(rows[1][..7], ["pi-2", "revoked", "-", "-", "-", "-/0", "-"]);
    }

    #[test]
    fn records_print_as_the_device_sent_them_plus_when_received() {
        let records: Vec<StreamedRecord> = serde_json::from_value(serde_json::json!([
            {"seq": 2, "at": 10, "received_at": 11, "schema": 1, "cpu_pct": 12.5},
            {"seq": 3, "at": 20, "received_at": 21, "schema": 1, "cpu_pct": 0.1},
        ]))
        .expect("streamed records");
        assert_eq!(
            record_lines(&records).expect("records serialize"),
            [
                r#"{"at":10,"cpu_pct":12.5,"received_at":11,"schema":1,"seq":2}"#,
                r#"{"at":20,"cpu_pct":0.1,"received_at":21,"schema":1,"seq":3}"#,
            ]
        );
    }

    #[test]
    fn details_show_refused_messages_when_there_are_some() {
        let detail: DeviceDetail = serde_json::from_value(serde_json::json!({
            "id": "pi-1", "first_seen": 0, "last_seen": 0, "online": false,
            "agent_version": "0.1.0", "reported_desired_version": null, "desired_version": 2,
            "models": [], "tags": {},
            "agent": {"target": "armv7-unknown-linux-musleabihf"},
            "rejected_messages": {"count": 3, "last_reason": "bad signature", "last_at": 5},
        }))
        .expect("a device detail");
        let details = details(&detail);
        let get = |label: &str| {
            details
                .iter()
                .find(|(l, _)| *l == label)
                .map(|(_, v)| v.clone())
                .expect("every label is present")
        };
        assert_eq!(get("state"), "offline");
        assert_eq!(get("tags"), "{}");
        assert_eq!(get("refused"), "3 message(s); last: bad signature");
        assert_eq!(get("models"), "-");
        assert_eq!(get("desired"), "2 (reported -)");
        assert_eq!(
            get("agent release"),
            "factory (armv7-unknown-linux-musleabihf)"
        );
    }
}
