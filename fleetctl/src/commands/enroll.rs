//! `fleetctl devices enroll`: enrolls a device and writes its bundle, the
//! files the flashing step copies to `/etc/edgefleet/` on the board:
//! `agent.toml` (the board profile's settings plus the device's id and
//! MQTT credentials, mode 0600) and `root.json` (the root document the
//! device pins).

use std::path::Path;

use anyhow::Context as _;
use fleet_server::api::types::{EnrollRequest, EnrolledDevice};

use crate::commands::parse_tags;
use crate::failure::{refused, usage, Failure};
use crate::output::print_json;
use crate::Context;

/// What `devices enroll` was asked for.
#[derive(Debug)]
pub struct Enrollment<'a> {
    pub id: &'a str,
    pub hardware: &'a str,
    pub tags: &'a [String],
    /// The bundle directory.
    pub out: &'a Path,
    /// A board profile (`devices/<board>/agent.toml`) to merge.
    pub profile: Option<&'a Path>,
    pub public_key: Option<&'a str>,
}

/// Runs `devices enroll`.
pub async fn run(ctx: &Context, e: Enrollment<'_>) -> Result<(), Failure> {
    let tags = parse_tags(e.tags)?;
    // Read before enrolling: a bad profile enrolls nothing.
    let profile = e
        .profile
        .map(|path| read_profile(path).map_err(usage))
        .transpose()?;
    if e.out.join("agent.toml").exists() {
        return Err(usage(anyhow::anyhow!(
            "{} already holds a bundle; choose another --out",
            e.out.display()
        )));
    }
    let request = EnrollRequest {
        id: e.id.to_string(),
        hardware: e.hardware.to_string(),
        tags,
        public_key: e.public_key.map(str::to_string),
    };
    let answer = ctx.client.enroll_device(&request).await?;
    write_bundle(e.out, &answer.body, profile).map_err(usage)?;
    if ctx.json {
        // The password stays in the bundle, out of logs and terminals.
        let mut summary = answer.body;
        summary.mqtt.password = "(in the bundle)".into();
        let mut summary = serde_json::to_value(summary).map_err(refused)?;
        if let Some(fields) = summary.as_object_mut() {
            fields.insert("bundle".into(), e.out.display().to_string().into());
        }
        print_json(&summary);
    } else {
        println!(
            "enrolled {} ({}); bundle in {}: copy agent.toml and root.json to /etc/edgefleet/ on the device",
            e.id,
            e.hardware,
            e.out.display()
        );
    }
    Ok(())
}

/// A board profile: agent settings without the device's own (its id,
/// credentials and root document come from enrollment).
pub fn read_profile(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read profile {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("profile {} is not valid TOML", path.display()))?;
    for key in ["device_id", "root_document", "mqtt"] {
        if table.contains_key(key) {
            anyhow::bail!(
                "profile {} sets {key:?}, which enrollment writes; remove it",
                path.display()
            );
        }
    }
    Ok(table)
}

/// The bundle's `agent.toml`: the profile, then the device's own
/// settings, with the paths the package installs to as defaults.
pub fn agent_config(
    enrolled: &EnrolledDevice,
    profile: Option<toml::Table>,
) -> anyhow::Result<String> {
    let mqtt = &enrolled.mqtt;
    let id = &enrolled.device.id;
    let mut config = profile.unwrap_or_default();
    config.insert("device_id".into(), id.clone().into());
    config
        .entry("data_dir")
        .or_insert_with(|| "/var/lib/edgefleet".into());
    config.insert("root_document".into(), "/etc/edgefleet/root.json".into());
    let api = config
        .entry("api")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let Some(api) = api.as_table_mut() {
        api.entry("socket")
            .or_insert_with(|| "/run/edgefleet/agent.sock".into());
    }
    let mut broker = toml::Table::new();
    broker.insert("url".into(), mqtt.url.clone().into());
    broker.insert("topic_prefix".into(), mqtt.topic_prefix.clone().into());
    broker.insert("username".into(), mqtt.username.clone().into());
    broker.insert("password".into(), mqtt.password.clone().into());
    // Where the agent registers the key it makes at first start.
    broker.insert("server_url".into(), enrolled.server_url.clone().into());
    // The fleet's private CA, for an mqtts:// broker.
    if let Some(ca) = &mqtt.ca_pem {
        broker.insert("ca_pem".into(), ca.clone().into());
    }
    config.insert("mqtt".into(), toml::Value::Table(broker));
    Ok(format!(
        "# edgefleet agent, device {id} ({hardware}); written by `fleetctl devices enroll`.\n\
         # Holds this device's MQTT password: keep it readable by the agent only.\n{}",
        toml::to_string(&config)?,
        hardware = enrolled.device.hardware.as_deref().unwrap_or_default(),
    ))
}

/// Writes a device bundle to `dir`: `agent.toml` readable by its owner
/// only (mode 0600 whatever was there, never through a symlink) and
/// `root.json`.
pub fn write_bundle(
    dir: &Path,
    enrolled: &EnrolledDevice,
    profile: Option<toml::Table>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = agent_config(enrolled, profile)?;
    let path = dir.join("agent.toml");
    edgefleet_shared::secret_file::write(&path, config.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    // Through a JSON value, whose keys are sorted: the file reads as the
    // server's root document does.
    let root = serde_json::to_vec_pretty(&serde_json::to_value(&enrolled.root)?)?;
    let path = dir.join("root.json");
    std::fs::write(&path, root).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrolled() -> EnrolledDevice {
        serde_json::from_value(serde_json::json!({
            "device": {
                "id": "pi-1", "first_seen": 0, "last_seen": 0, "online": false,
                "agent_version": "", "reported_desired_version": null, "desired_version": 0,
                "models": [], "hardware": "rpi4", "tags": {},
            },
            "mqtt": {
                "url": "mqtt://fleet:1883", "topic_prefix": "edgefleet/v1",
                "username": "pi-1", "password": "s3cret", "ca_pem": null,
            },
            "server_url": "http://fleet:8080",
            "root": {"signed": {"type": "root", "version": 1}, "signatures": []},
        }))
        .expect("an enrollment answer")
    }

    #[test]
    fn the_config_holds_the_devices_settings_over_the_profiles() {
        let profile: toml::Table =
            toml::from_str("data_dir = \"/data\"\n[api]\nmax_body = 10\n").expect("valid TOML");
        let text = agent_config(&enrolled(), Some(profile)).expect("renders");
        assert!(
            text.starts_with("# edgefleet agent, device pi-1 (rpi4);"),
            "{text}"
        );
        let config: toml::Table = toml::from_str(&text).expect("the config is TOML");
        assert_eq!(config["device_id"].as_str(), Some("pi-1"));
        assert_eq!(config["data_dir"].as_str(), Some("/data"));
        assert_eq!(config["api"]["max_body"].as_integer(), Some(10));
        assert_eq!(
            config["api"]["socket"].as_str(),
            Some("/run/edgefleet/agent.sock")
        );
        assert_eq!(config["mqtt"]["password"].as_str(), Some("s3cret"));
        assert_eq!(
            config["mqtt"]["server_url"].as_str(),
            Some("http://fleet:8080")
        );
        assert!(config["mqtt"].get("ca_pem").is_none());
    }

    #[test]
    fn profiles_may_not_set_what_enrollment_writes() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "device_id = \"x\"\n").expect("write the profile");
        let err = read_profile(&path).expect_err("device_id is refused");
        assert!(err.to_string().contains("\"device_id\""), "{err}");
    }

    #[test]
    fn bundles_hold_a_private_config_and_the_root_document() {
        let dir = tempfile::tempdir().expect("a temp dir");
        write_bundle(dir.path(), &enrolled(), None).expect("the bundle is written");
        let root: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("root.json")).expect("root.json exists"),
        )
        .expect("root.json is JSON");
        assert_eq!(root["signed"]["version"], 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("agent.toml"))
                .expect("agent.toml exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
