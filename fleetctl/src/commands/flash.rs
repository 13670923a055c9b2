//! `fleetctl devices flash`: puts the agent package and a device's
//! bundle on a board. Over SSH (`--host`): copy, install, start, then
//! wait until the device reports in. Or onto a mounted root file system
//! (`--to`), for the board's first boot to install. The steps themselves
//! (finding the package, the install script, the first-boot unit) are in
//! `crate::flash`; this module runs them and reports.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::flash::SshTarget;
use serde_json::json;

use crate::cli::FlashArgs;
use crate::failure::{refused, usage, Exit, Failure};
use crate::output::print_json;
use crate::Context;

/// Runs `devices flash`.
pub async fn run(ctx: &Context, args: &FlashArgs) -> Result<(), Failure> {
    let FlashArgs {
        id,
        host,
        to,
        bundle,
        package,
        flavour,
        arch,
        dist,
        port,
        ssh_options,
        wait_secs,
    } = args;
    let dir = bundle
        .clone()
        .unwrap_or_else(|| PathBuf::from("bundles").join(id));
    let bundle = crate::flash::bundle(&dir, id).map_err(usage)?;
    if let Some(root) = to {
        let package = match (package, arch) {
            (Some(p), _) => {
                crate::flash::choose_package(Some(p), *flavour, dist, "").map_err(usage)?
            }
            (None, Some(arch)) => {
                crate::flash::choose_package(None, *flavour, dist, arch).map_err(usage)?
            }
            (None, None) => {
                return Err(usage(anyhow::anyhow!(
                    "--to needs --package or --arch (arm64, armhf, amd64)"
                )))
            }
        };
        let written = crate::flash::write_first_boot(root, &package, &bundle).map_err(refused)?;
        if ctx.json {
            print_json(&json!({"device": id, "staged": written}));
        } else {
            println!(
                "{id}: {} and its bundle staged under {}; the board installs them on its next boot ({})",
                package.display(),
                root.display(),
                crate::flash::FIRST_BOOT_UNIT
            );
        }
        return Ok(());
    }
    // clap requires --host when --to is absent.
    let Some(host) = host.as_deref() else {
        return Err(usage(anyhow::anyhow!("give --host or --to")));
    };
    let ssh = Ssh {
        target: SshTarget::new(host, *port, ssh_options).map_err(usage)?,
    };
    let began = edgefleet_shared::unix_now();
    let remote_arch = ssh.run("dpkg --print-architecture")?;
    let package = crate::flash::choose_package(package.as_deref(), *flavour, dist, &remote_arch)
        .map_err(usage)?;
    if let Some(a) = crate::flash::package_arch(&package) {
        if a != remote_arch {
            return Err(usage(anyhow::anyhow!(
                "{} is for {a}, but {host} is {remote_arch}",
                package.display()
            )));
        }
    }
    let staged = ssh.run("mktemp -d /tmp/edgefleet-flash.XXXXXX")?;
    ssh.run(&format!("mkdir {}/bundle", crate::flash::sh_quote(&staged)))?;
    eprintln!(
        "{id}: copying {} and the bundle to {host}:{staged}",
        package.display()
    );
    ssh.copy(
        &[package.as_path()],
        &format!("{staged}/edgefleet-agent.deb"),
    )?;
    ssh.copy(
        &[bundle.agent_toml.as_path(), bundle.root_json.as_path()],
        &format!("{staged}/bundle/"),
    )?;
    let script = crate::flash::sh_quote(&crate::flash::install_script(&staged));
    eprintln!("{id}: installing and starting the agent");
    ssh.run(&format!(
        "if [ \"$(id -u)\" = 0 ]; then sh -c {script}; else sudo -n sh -c {script}; fi"
    ))?;
    if *wait_secs == 0 {
        println!("{id}: installed on {host}");
        return Ok(());
    }
    // The install restarted the agent: what the server hears from now on
    // comes from the new one.
    let started = edgefleet_shared::unix_now();
    let deadline = Instant::now() + Duration::from_secs(*wait_secs);
    loop {
        let answer = ctx.client.get_device(id).await?;
        let device = &answer.body.device;
        if device.online && device.last_seen >= started {
            if ctx.json {
                print_json(&answer.raw);
            } else {
                println!(
                    "{id}: installed on {host} and reporting in (agent {}, {}s)",
                    device.agent_version,
                    edgefleet_shared::unix_now() - began
                );
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(refused(anyhow::anyhow!(
                "{id} was installed on {host} but did not report in within {wait_secs} s; on the board: journalctl -u edgefleet-agent"
            )));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A board reached with the system's `ssh` and `scp` (its keys, agent and
/// config apply), never prompting.
struct Ssh {
    target: SshTarget,
}

impl Ssh {
    fn output(&self, program: &str, args: Vec<String>, what: &str) -> Result<String, Failure> {
        let out = std::process::Command::new(program)
            .args(&args)
            .output()
            .map_err(|e| {
                Failure::new(
                    Exit::Unreachable,
                    anyhow::anyhow!("cannot run {program}: {e}"),
                )
            })?;
        if !out.status.success() {
            // ssh exits 255 when it could not connect or log in.
            let exit = if out.status.code() == Some(255) {
                Exit::Unreachable
            } else {
                Exit::Refused
            };
            return Err(Failure::new(
                exit,
                anyhow::anyhow!(
                    "{what} on {} failed ({}): {}",
                    self.target.host(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Runs a shell command on the board; its standard output, trimmed.
    fn run(&self, command: &str) -> Result<String, Failure> {
        let args = self.target.ssh_args(command);
        let what = command
            .split_whitespace()
            .next()
            .unwrap_or(command)
            .to_string();
        self.output("ssh", args, &what)
    }

    /// Copies local files to a path on the board.
    fn copy(&self, files: &[&std::path::Path], to: &str) -> Result<(), Failure> {
        let args = self.target.scp_args(files, to);
        self.output("scp", args, "copying").map(|_| ())
    }
}
