//! `fleetctl keys`: the fleet's signing keys, on local files only. `init`
//! makes the offline root key(s), the online key and the signed root
//! document; `rotate` and `revoke` write the next root document (the
//! server's library does the cryptography).

use serde_json::json;

use crate::cli::{KeysCommand, NextRoot};
use crate::failure::{usage, Failure};
use crate::output::print_json;

/// Runs a `keys` command.
pub fn run(command: &KeysCommand, json: bool) -> Result<(), Failure> {
    match command {
        KeysCommand::Init {
            dir,
            root_keys,
            threshold,
            expires_days,
        } => {
            let keys = fleet_server::keys::init_keys(dir, *root_keys, *threshold, *expires_days)
                .map_err(usage)?;
            if json {
                print_json(&json!({
                    "root_keys": keys.root_key_paths,
                    "online_key": keys.online_key_path,
                    "root": keys.root_path,
                }));
                return Ok(());
            }
            for p in &keys.root_key_paths {
                println!(
                    "root key     {}   <- move offline; needed only to rotate keys",
                    p.display()
                );
            }
            println!(
                "online key   {}   <- stays with the server (mode 0600)",
                keys.online_key_path.display()
            );
            println!(
                "root doc     {}   <- flash onto every device",
                keys.root_path.display()
            );
            Ok(())
        }
        KeysCommand::Rotate { root } => next_root(root, None, json),
        KeysCommand::Revoke { keyid, root } => {
            let keyid = keyid
                .parse::<edgefleet_shared::KeyId>()
                .map_err(|e| usage(anyhow::anyhow!("{keyid:?} is not a key id: {e}")))?;
            next_root(root, Some(keyid), json)
        }
    }
}

/// Writes the next root document (a new online key, optionally new root
/// keys, without `revoke`).
fn next_root(
    root: &NextRoot,
    revoke: Option<edgefleet_shared::KeyId>,
    json: bool,
) -> Result<(), Failure> {
    let rotation = fleet_server::keys::Rotation {
        revoke,
        new_root_keys: root.new_root_keys.map(|n| (n, root.threshold)),
        expires_days: root.expires_days,
    };
    let dir = &root.dir;
    let r = fleet_server::keys::rotate(dir, &rotation).map_err(usage)?;
    if json {
        print_json(&json!({
            "root_version": r.root.version,
            "online_key": r.online_key.as_str(),
            "new_root_keys": r.new_root_key_paths,
            "retired_online_key": r.retired_online_key,
        }));
        return Ok(());
    }
    println!(
        "root doc     version {} written to {}",
        r.root.version,
        dir.join("root.json").display()
    );
    println!("online key   {}", r.online_key);
    if let Some(p) = &r.retired_online_key {
        println!(
            "retired      {}   <- no longer trusted by devices that follow the chain",
            p.display()
        );
    }
    for p in &r.new_root_key_paths {
        println!("root key     {}   <- move offline", p.display());
    }
    println!("restart the fleet server: it publishes the chain and re-signs desired state");
    Ok(())
}
