//! `fleetctl devices flash`: puts the agent's package and a device's
//! enrollment bundle on a board, either over SSH (copy, install, start; the
//! caller then waits for the device to report in) or onto a mounted root
//! file system (an SD card) for the board's first boot.
//!
//! Both paths stage the same layout in a directory on the device,
//!   DIR/edgefleet-agent.deb
//!   DIR/bundle/agent.toml   (the device's MQTT password: mode 0600)
//!   DIR/bundle/root.json
//! and run the same [`install_script`] on it: over SSH at once, or from a
//! one-shot systemd unit on first boot.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Where the first-boot path stages its files on the device.
pub const FIRST_BOOT_DIR: &str = "/var/cache/edgefleet/flash";
/// The first-boot unit's name.
pub const FIRST_BOOT_UNIT: &str = "edgefleet-firstboot.service";

/// A device's bundle (`fleetctl devices enroll --out DIR`), checked.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub agent_toml: PathBuf,
    pub root_json: PathBuf,
}

/// Checks that `dir` holds the bundle of device `id`.
pub fn bundle(dir: &Path, id: &str) -> anyhow::Result<Bundle> {
    let agent_toml = dir.join("agent.toml");
    let root_json = dir.join("root.json");
    for f in [&agent_toml, &root_json] {
        if !f.is_file() {
            bail!(
                "{} is missing: enroll the device first (fleetctl devices enroll --id {id} --hardware CLASS --out {})",
                f.display(),
                dir.display()
            );
        }
    }
    let text = std::fs::read_to_string(&agent_toml)
        .with_context(|| format!("cannot read {}", agent_toml.display()))?;
    let config: toml::Table = toml::from_str(&text)
        .with_context(|| format!("{} is not valid TOML", agent_toml.display()))?;
    match config.get("device_id").and_then(|v| v.as_str()) {
        Some(found) if found == id => {}
        Some(found) => bail!(
            "{} is the bundle of device {found:?}, not {id:?}",
            dir.display()
        ),
        None => bail!("{} names no device_id: not a bundle", agent_toml.display()),
    }
    Ok(Bundle {
        agent_toml,
        root_json,
    })
}

/// Which build of the agent a board gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavour {
    /// The static (musl) build: pure-Rust runtimes, no libraries, every
    /// architecture.
    Static,
    /// The glibc build with ONNX Runtime and LiteRT (amd64 and arm64).
    Native,
}

impl Flavour {
    /// The Debian package that carries this flavour.
    pub fn package_name(self) -> &'static str {
        match self {
            Flavour::Static => "edgefleet-agent",
            Flavour::Native => "edgefleet-agent-native",
        }
    }

    /// The flavour of a package file (`edgefleet-agent-native_0.1.0_arm64.deb`
    /// → native), by its package name.
    pub fn of_package(package: &Path) -> Option<Flavour> {
        let name = package.file_name()?.to_str()?;
        match name.split('_').next()? {
            "edgefleet-agent" => Some(Flavour::Static),
            "edgefleet-agent-native" => Some(Flavour::Native),
            _ => None,
        }
    }

    fn architectures(self) -> &'static [&'static str] {
        match self {
            Flavour::Static => &["arm64", "armhf", "amd64"],
            Flavour::Native => &["arm64", "amd64"],
        }
    }
}

impl std::fmt::Display for Flavour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Flavour::Static => "static",
            Flavour::Native => "native",
        })
    }
}

/// The Debian architecture a package file name ends in
/// (`edgefleet-agent_0.1.0_arm64.deb` → `arm64`).
pub fn package_arch(package: &Path) -> Option<&str> {
    let name = package.file_name()?.to_str()?;
    name.strip_suffix(".deb")?.rsplit('_').next()
}

/// The package in `dist` of a flavour for a Debian architecture; an error
/// names what is there when there is not exactly one.
pub fn find_package(dist: &Path, arch: &str, flavour: Flavour) -> anyhow::Result<PathBuf> {
    if !flavour.architectures().contains(&arch) {
        bail!(
            "there is no {flavour} agent for {arch} (it is built for {}); use --flavour static",
            flavour.architectures().join(" and ")
        );
    }
    let entries = std::fs::read_dir(dist).with_context(|| {
        format!(
            "cannot read {}: build the packages first (cross/build && cross/package) or pass --package",
            dist.display()
        )
    })?;
    let mut all = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if Flavour::of_package(&path).is_some() && path.extension().is_some_and(|e| e == "deb") {
            all.push(path);
        }
    }
    all.sort();
    let matching: Vec<&PathBuf> = all
        .iter()
        .filter(|p| package_arch(p) == Some(arch) && Flavour::of_package(p) == Some(flavour))
        .collect();
    let package = flavour.package_name();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => bail!(
            "no {package} package for {arch} in {} (found: {}); build it (cross/build && cross/package) or pass --package",
            dist.display(),
            if all.is_empty() {
                "none".to_string()
            } else {
                all.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            }
        ),
        several => bail!(
            "several {package} packages for {arch} in {}: {}; pass --package",
            dist.display(),
            several.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The package to flash: `--package` as given (its name must agree with
/// `--flavour` when both are given), or the flavour's package for `arch`
/// from `dist`.
pub fn choose_package(
    package: Option<&Path>,
    flavour: Option<Flavour>,
    dist: &Path,
    arch: &str,
) -> anyhow::Result<PathBuf> {
    match package {
        Some(p) => {
            if let (Some(wanted), Some(is)) = (flavour, Flavour::of_package(p)) {
                if wanted != is {
                    bail!(
                        "{} is the {is} package, but --flavour {wanted} was asked for",
                        p.display()
                    );
                }
            }
            Ok(p.to_path_buf())
        }
        None => find_package(dist, arch, flavour.unwrap_or(Flavour::Static)),
    }
}

/// A board reached with the system's `ssh` and `scp`: `[user@]address`,
/// an optional port and extra `-o` options.
///
/// The host comes from the command line and lands among `ssh`'s and
/// `scp`'s arguments, so one starting with `-` (`-oProxyCommand=...`) would
/// be taken as an option and run a command locally. [`SshTarget::new`]
/// refuses such hosts and user names, and every invocation puts `--`
/// before the destination (`ssh`) or the files (`scp`), so nothing after
/// it is read as an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    host: String,
    port: Option<u16>,
    options: Vec<String>,
}

impl SshTarget {
    /// Checks `host` (`[user@]address`) and keeps the rest.
    pub fn new(host: &str, port: Option<u16>, options: &[String]) -> anyhow::Result<Self> {
        let (user, address) = match host.rsplit_once('@') {
            Some((user, address)) => (Some(user), address),
            None => (None, host),
        };
        if host.starts_with('-') || user.is_some_and(|u| u.starts_with('-')) {
            bail!(
                "--host {host:?} starts with '-', which ssh would read as an option: give the board as user@address"
            );
        }
        if address.starts_with('-') {
            bail!("--host {host:?}: the address {address:?} starts with '-', which is not a host name");
        }
        if address.is_empty() || user.is_some_and(str::is_empty) {
            bail!("--host {host:?} is not user@address");
        }
        if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("--host {host:?} contains spaces or control characters");
        }
        Ok(Self {
            host: host.to_string(),
            port,
            options: options.to_vec(),
        })
    }

    /// `user@address`, as given.
    pub fn host(&self) -> &str {
        &self.host
    }

    fn common_args(&self, port_flag: &str) -> Vec<String> {
        let mut args = vec!["-o".to_string(), "BatchMode=yes".to_string()];
        for o in &self.options {
            args.push("-o".into());
            args.push(o.clone());
        }
        if let Some(port) = self.port {
            args.push(port_flag.into());
            args.push(port.to_string());
        }
        args
    }

    /// The arguments of `ssh` that run `command` on the board.
    pub fn ssh_args(&self, command: &str) -> Vec<String> {
        let mut args = self.common_args("-p");
        args.push("--".into());
        args.push(self.host.clone());
        args.push(command.to_string());
        args
    }

    /// The arguments of `scp` that copy local `files` to `remote_path` on
    /// the board, keeping their modes.
    pub fn scp_args(&self, files: &[&Path], remote_path: &str) -> Vec<String> {
        let mut args = self.common_args("-P");
        args.push("-p".into());
        args.push("--".into());
        args.extend(files.iter().map(|f| f.display().to_string()));
        args.push(format!("{}:{remote_path}", self.host));
        args
    }
}

/// `s` as one POSIX shell word.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell script (run as root) that installs a staged directory: the
/// package (the agent keeps its config and data on an upgrade), then the
/// bundle as its config (readable by the agent's group only), then
/// (re)starts the agent and removes the staged files.
pub fn install_script(dir: &str) -> String {
    let d = sh_quote(dir);
    let check = dependency_check(&format!("{d}/edgefleet-agent.deb"));
    format!(
        "set -eu\n\
         export DEBIAN_FRONTEND=noninteractive\n\
         {check}\
         dpkg --force-confold -i {d}/edgefleet-agent.deb\n\
         install -d -m 0755 /etc/edgefleet\n\
         install -m 0640 -o root -g edgefleet {d}/bundle/agent.toml {d}/bundle/root.json /etc/edgefleet/\n\
         rm -rf {d}\n\
         if [ -d /run/systemd/system ]; then\n\
         \x20   systemctl daemon-reload\n\
         \x20   systemctl enable edgefleet-agent.service\n\
         \x20   systemctl restart edgefleet-agent.service\n\
         fi\n"
    )
}

/// Shell that refuses, before anything is installed or removed, a package
/// whose versioned dependencies the board does not meet (the native
/// flavour's glibc and libstdc++ floor). Left to dpkg, a failed dependency
/// would come after dpkg had already removed the other flavour it
/// replaces, leaving the board without a working agent.
fn dependency_check(deb: &str) -> String {
    // Only versioned, single-package dependencies are checked (the floor);
    // `a | b` alternatives carry no version here. The board's own
    // architecture is asked for, as a multiarch board (a 64-bit Raspberry
    // Pi OS) may hold libc6 for armhf as well.
    format!(
        "arch=\"$(dpkg --print-architecture)\"\n\
         dpkg-deb -f {deb} Depends | tr ',' '\\n' | tr -d '()' | while read -r name op version rest; do\n\
         \x20   case \"$op\" in '>='|'>>'|'='|'<='|'<<') ;; *) continue ;; esac\n\
         \x20   have=\"$(dpkg-query -W -f '${{Version}}\\n' \"$name:$arch\" 2>/dev/null | head -n 1)\"\n\
         \x20   if [ -z \"$have\" ] || ! dpkg --compare-versions \"$have\" \"$op\" \"$version\"; then\n\
         \x20       echo \"this board has $name ${{have:-(not installed)}}; the package needs $name $op $version: flash --flavour static instead\" >&2\n\
         \x20       exit 1\n\
         \x20   fi\n\
         done\n"
    )
}

/// The one-shot unit that runs [`install_script`] on first boot.
pub fn first_boot_unit() -> String {
    format!(
        "[Unit]\n\
         Description=Install the edgefleet agent staged by fleetctl devices flash\n\
         ConditionPathExists={FIRST_BOOT_DIR}/edgefleet-agent.deb\n\
         After=local-fs.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         ExecStart=/bin/sh {FIRST_BOOT_DIR}.sh\n\
         ExecStartPost=/bin/rm -f {FIRST_BOOT_DIR}.sh\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

fn copy(from: &Path, to: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", to.display()))
}

/// Copies a file holding a secret: written with mode 0600 from the start,
/// never through a symlink ([`edgefleet_shared::secret_file`]).
fn copy_secret(from: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    edgefleet_shared::secret_file::write(to, &bytes)
        .with_context(|| format!("cannot write {}", to.display()))
}

/// Stages `package` and `bundle` under `root` (a board's mounted root file
/// system) for the first boot to install, and enables the one-shot unit
/// that does. Returns the files written.
pub fn write_first_boot(
    root: &Path,
    package: &Path,
    bundle: &Bundle,
) -> anyhow::Result<Vec<PathBuf>> {
    if !root.join("etc").is_dir() {
        bail!(
            "{} has no etc/: point --to at the board's mounted root file system",
            root.display()
        );
    }
    let staged = root.join(FIRST_BOOT_DIR.trim_start_matches('/'));
    if staged.exists() {
        bail!(
            "{} exists: a flash is already staged there (remove it to stage again)",
            staged.display()
        );
    }
    std::fs::create_dir_all(staged.join("bundle"))
        .with_context(|| format!("cannot create {}", staged.display()))?;
    let deb = staged.join("edgefleet-agent.deb");
    copy(package, &deb, 0o644)?;
    let agent_toml = staged.join("bundle/agent.toml");
    copy_secret(&bundle.agent_toml, &agent_toml)?;
    let root_json = staged.join("bundle/root.json");
    copy(&bundle.root_json, &root_json, 0o644)?;
    let script = root.join(format!("{}.sh", FIRST_BOOT_DIR.trim_start_matches('/')));
    std::fs::write(
        &script,
        format!(
            "{}systemctl disable {FIRST_BOOT_UNIT} || true\n",
            install_script(FIRST_BOOT_DIR)
        ),
    )
    .with_context(|| format!("cannot write {}", script.display()))?;
    let units = root.join("etc/systemd/system");
    let wants = units.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants)
        .with_context(|| format!("cannot create {}", wants.display()))?;
    let unit = units.join(FIRST_BOOT_UNIT);
    std::fs::write(&unit, first_boot_unit())
        .with_context(|| format!("cannot write {}", unit.display()))?;
    let link = wants.join(FIRST_BOOT_UNIT);
    if !link.exists() {
        std::os::unix::fs::symlink(format!("../{FIRST_BOOT_UNIT}"), &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    Ok(vec![deb, agent_toml, root_json, script, unit, link])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_bundle(dir: &Path, id: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("agent.toml"), format!("device_id = \"{id}\"\n")).unwrap();
        std::fs::write(dir.join("root.json"), "{}").unwrap();
    }

    #[test]
    fn bundles_must_be_the_devices_own() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("b");
        let missing = bundle(&dir, "pi-1").unwrap_err().to_string();
        assert!(missing.contains("enroll the device first"), "{missing}");
        write_bundle(&dir, "pi-2");
        let wrong = bundle(&dir, "pi-1").unwrap_err().to_string();
        assert!(wrong.contains("bundle of device \"pi-2\""), "{wrong}");
        assert!(bundle(&dir, "pi-2").is_ok());
    }

    #[test]
    fn packages_are_found_by_architecture_and_flavour() {
        let tmp = tempfile::tempdir().unwrap();
        for name in [
            "edgefleet-agent_0.1.0_arm64.deb",
            "edgefleet-agent_0.1.0_armhf.deb",
            "edgefleet-agent-native_0.1.0_arm64.deb",
            "notes.txt",
        ] {
            std::fs::write(tmp.path().join(name), "").unwrap();
        }
        let arm64 = find_package(tmp.path(), "arm64", Flavour::Static).unwrap();
        assert_eq!(package_arch(&arm64), Some("arm64"));
        assert_eq!(Flavour::of_package(&arm64), Some(Flavour::Static));
        let native = find_package(tmp.path(), "arm64", Flavour::Native).unwrap();
        assert_eq!(
            native.file_name().unwrap(),
            "edgefleet-agent-native_0.1.0_arm64.deb"
        );
        let none = find_package(tmp.path(), "amd64", Flavour::Static)
            .unwrap_err()
            .to_string();
        assert!(
            none.contains("no edgefleet-agent package for amd64") && none.contains("armhf"),
            "{none}"
        );
        let armhf = find_package(tmp.path(), "armhf", Flavour::Native)
            .unwrap_err()
            .to_string();
        assert!(
            armhf.contains("no native agent for armhf") && armhf.contains("--flavour static"),
            "{armhf}"
        );
        std::fs::write(tmp.path().join("edgefleet-agent_0.2.0_arm64.deb"), "").unwrap();
        assert!(find_package(tmp.path(), "arm64", Flavour::Static)
            .unwrap_err()
            .to_string()
            .contains("several"));
        // The native package is still found alone beside two static ones.
        assert!(find_package(tmp.path(), "arm64", Flavour::Native).is_ok());
    }

    #[test]
    fn a_given_package_must_be_of_the_asked_flavour() {
        let tmp = tempfile::tempdir().unwrap();
        let static_deb = tmp.path().join("edgefleet-agent_0.1.0_amd64.deb");
        let err = choose_package(
            Some(&static_deb),
            Some(Flavour::Native),
            tmp.path(),
            "amd64",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("is the static package, but --flavour native was asked for"),
            "{err}"
        );
        assert_eq!(
            choose_package(Some(&static_deb), None, tmp.path(), "amd64").unwrap(),
            static_deb
        );
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(
            sh_quote("/tmp/edgefleet-flash.Ab3"),
            "/tmp/edgefleet-flash.Ab3"
        );
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's; rm -rf /"), r"'it'\''s; rm -rf /'");
        assert_eq!(sh_quote(""), "''");
        let script = install_script("/tmp/x y");
        assert!(script.contains("dpkg --force-confold -i '/tmp/x y'/edgefleet-agent.deb"));
    }

    #[test]
    fn hosts_and_users_that_look_like_options_are_refused() {
        for host in [
            "-oProxyCommand=touch /tmp/pwned",
            "-oProxyCommand=sh@board",
            "--help",
            "-l",
        ] {
            let err = SshTarget::new(host, None, &[]).unwrap_err().to_string();
            assert!(err.contains("starts with '-'"), "{host}: {err}");
        }
        let err = SshTarget::new("root@-oProxyCommand=x", None, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("starts with '-'"), "{err}");
        for host in ["", "@board", "root@", "root@board name", "root@board\n"] {
            assert!(SshTarget::new(host, None, &[]).is_err(), "{host:?}");
        }
        for host in [
            "board",
            "root@192.168.1.20",
            "pi@rpi4-kitchen.local",
            "a-b@c-d",
        ] {
            assert_eq!(SshTarget::new(host, None, &[]).unwrap().host(), host);
        }
    }

    #[test]
    fn ssh_and_scp_end_their_options_before_the_destination() {
        let options = vec!["StrictHostKeyChecking=no".to_string()];
        let t = SshTarget::new("root@board", Some(2222), &options).unwrap();
        assert_eq!(
            t.ssh_args("dpkg --print-architecture"),
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-p",
                "2222",
                "--",
                "root@board",
                "dpkg --print-architecture"
            ]
        );
        let scp = t.scp_args(
            &[Path::new("-rf.deb"), Path::new("bundle/agent.toml")],
            "/tmp/x/",
        );
        assert_eq!(
            scp,
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-P",
                "2222",
                "-p",
                "--",
                "-rf.deb",
                "bundle/agent.toml",
                "root@board:/tmp/x/"
            ]
        );
        // Without a port, no port flag; `--` still right before the host.
        let t = SshTarget::new("board", None, &[]).unwrap();
        assert_eq!(
            t.ssh_args("true"),
            ["-o", "BatchMode=yes", "--", "board", "true"]
        );
    }

    #[test]
    fn ssh_takes_what_follows_the_double_dash_as_the_destination() {
        // With the real ssh client, when there is one: a host that slipped
        // past the check is at worst an unknown host, never an option
        // (without the `--`, ssh runs this ProxyCommand, which creates the
        // marker file).
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("pwned");
        // Built directly: `SshTarget::new` refuses this host.
        let target = SshTarget {
            host: format!("-oProxyCommand=touch {}", marker.display()),
            port: None,
            options: vec!["ConnectTimeout=1".into()],
        };
        let args = target.ssh_args("true");
        let Ok(out) = std::process::Command::new("ssh").args(&args).output() else {
            return; // no ssh here
        };
        assert!(!out.status.success());
        assert!(!marker.exists(), "ssh ran the ProxyCommand");
    }

    #[test]
    fn the_install_script_is_valid_shell() {
        for script in [install_script("/tmp/a"), first_boot_unit()] {
            assert!(!script.is_empty());
        }
        let status = std::process::Command::new("sh")
            .args(["-n", "-c", &install_script("/tmp/a b")])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Runs the install script's dependency check on a real package built
    /// with `dpkg-deb`, against this machine's own dpkg database (a Debian
    /// machine: the test command's machines are).
    #[test]
    fn packages_whose_floor_the_board_misses_are_refused_before_install() {
        if std::process::Command::new("dpkg-deb")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: no dpkg-deb on this machine (not Debian)");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let build = |name: &str, depends: &str| {
            let root = tmp.path().join(name);
            std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
            std::fs::write(
                root.join("DEBIAN/control"),
                format!(
                    "Package: {name}\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n\
                     Description: t\nDepends: {depends}\n"
                ),
            )
            .unwrap();
            let deb = tmp.path().join(format!("{name}.deb"));
            let out = std::process::Command::new("dpkg-deb")
                .args(["--root-owner-group", "--build"])
                .arg(&root)
                .arg(&deb)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            deb
        };
        let check = |deb: &Path| {
            std::process::Command::new("sh")
                .args(["-c", &dependency_check(deb.to_str().unwrap())])
                .output()
                .unwrap()
        };
        let met = build("met", "libc6 (>= 2.17), libgcc-s1 | libgcc1");
        let out = check(&met);
        assert!(out.status.success(), "{out:?}");
        let unmet = build("unmet", "libc6 (>= 2.17), libc6 (>= 99.0)");
        let out = check(&unmet);
        assert!(!out.status.success());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("the package needs libc6 >= 99.0: flash --flavour static instead"),
            "{said}"
        );
        let missing = build("missing", "no-such-package-here (>= 1)");
        let said = String::from_utf8_lossy(&check(&missing).stderr).into_owned();
        assert!(
            said.contains("no-such-package-here (not installed)"),
            "{said}"
        );
    }

    #[test]
    fn first_boot_stages_the_package_and_the_bundle() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let not_root = write_first_boot(
            &root,
            Path::new("/nonexistent"),
            &Bundle {
                agent_toml: PathBuf::new(),
                root_json: PathBuf::new(),
            },
        );
        assert!(not_root.unwrap_err().to_string().contains("no etc/"));
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let dir = tmp.path().join("bundle");
        write_bundle(&dir, "pi-1");
        let package = tmp.path().join("edgefleet-agent_0.1.0_arm64.deb");
        std::fs::write(&package, "deb").unwrap();
        let b = bundle(&dir, "pi-1").unwrap();
        let written = write_first_boot(&root, &package, &b).unwrap();
        assert_eq!(written.len(), 6);
        let staged = root.join("var/cache/edgefleet/flash");
        assert_eq!(
            std::fs::read(staged.join("edgefleet-agent.deb")).unwrap(),
            b"deb"
        );
        let mode = std::fs::metadata(staged.join("bundle/agent.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the password stays private");
        assert_eq!(
            std::fs::read(staged.join("bundle/agent.toml")).unwrap(),
            b"device_id = \"pi-1\"\n"
        );
        let link = root
            .join("etc/systemd/system/multi-user.target.wants")
            .join(FIRST_BOOT_UNIT);
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            PathBuf::from(format!("../{FIRST_BOOT_UNIT}"))
        );
        // Staging twice is refused rather than mixing two flashes.
        assert!(write_first_boot(&root, &package, &b)
            .unwrap_err()
            .to_string()
            .contains("already staged"));
    }
}
