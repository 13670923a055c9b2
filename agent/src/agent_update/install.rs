//! Taking a signed agent release from the desired state to a switch:
//! decide whether it applies ([`AgentInstaller::decide`]), install its
//! downloaded, verified build into the free slot, self-test it, then
//! switch the agent state to it. The update task does the download and
//! the reporting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgefleet_shared::{AgentBuild, AgentSlot};

use super::self_test::{self, SelfTestReport};
use super::state::{AgentState, Installed, Slot};
use super::{Identity, TARGET};

/// What to do with a desired agent slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStep<'a> {
    /// The device runs it already, or it failed here before.
    Nothing,
    /// It cannot apply here; the reason is reported once per document.
    Unusable(String),
    /// Download, install and self-test this build, then switch.
    Install(&'a AgentBuild),
}

/// Installs agent releases into the slots of one data dir.
#[derive(Debug, Clone)]
pub struct AgentInstaller {
    pub data_dir: PathBuf,
    /// The config the self-test reads (the running agent's).
    pub config_path: PathBuf,
    pub identity: Identity,
    /// How long a self-test may take.
    pub self_test_limit: Duration,
}

impl AgentInstaller {
    /// What `slot` asks of this device.
    pub fn decide<'a>(&self, slot: &'a AgentSlot) -> AgentStep<'a> {
        if self.identity.release.as_deref() == Some(slot.version.as_str()) {
            return AgentStep::Nothing;
        }
        let Some(build) = slot.build_for(TARGET) else {
            return AgentStep::Unusable(format!(
                "agent release {} has no build for {TARGET} (this device's target); push one with `fleetctl agent push`",
                slot.version
            ));
        };
        if let Ok(state) = AgentState::load(&self.data_dir) {
            if let Some(refused) = state.refused(&slot.version, &build.sha256) {
                tracing::debug!(release = %slot.version, reason = %refused.reason, "agent release failed here before; not installed again");
                return AgentStep::Nothing;
            }
        }
        if !self.identity.supervised {
            return AgentStep::Unusable(format!(
                "agent release {} cannot be installed: this agent was not started by its supervisor (`edgefleet-agent run`)",
                slot.version
            ));
        }
        AgentStep::Install(build)
    }

    /// Where a build's download is assembled.
    pub fn staging_path(&self, sha256: &str) -> PathBuf {
        self.data_dir
            .join("agent")
            .join("staging")
            .join(format!("{sha256}.part"))
    }

    /// Moves a verified download into the free slot as an executable;
    /// returns the slot and the executable's path.
    pub fn install(&self, staged: &Path) -> std::io::Result<(Slot, PathBuf)> {
        use std::os::unix::fs::PermissionsExt;
        let state = AgentState::load(&self.data_dir)?;
        let slot = state.free_slot();
        let dir = AgentState::slot_dir(&self.data_dir, slot);
        std::fs::create_dir_all(&dir)?;
        let exe = AgentState::executable(&self.data_dir, slot);
        std::fs::set_permissions(staged, std::fs::Permissions::from_mode(0o755))?;
        std::fs::File::open(staged)?.sync_all()?;
        crate::durable::rename_durable(staged, &exe)?;
        Ok((slot, exe))
    }

    /// Self-tests the executable installed in a slot.
    pub async fn self_test(&self, exe: &Path) -> Result<SelfTestReport, String> {
        self_test::check(exe, &self.config_path, self.self_test_limit).await
    }

    /// Records that `release` failed here, so it is never tried again.
    pub fn refuse(&self, release: &str, sha256: &str, reason: &str) {
        let result = AgentState::load(&self.data_dir).and_then(|mut state| {
            state.refuse(release, sha256, reason);
            state.save(&self.data_dir)
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot record the refused agent release");
        }
    }

    /// Makes the release in `slot` the active one, on trial. The agent
    /// then stops and its supervisor starts it.
    pub fn switch(&self, slot: Slot, release: &str, sha256: &str) -> std::io::Result<()> {
        let mut state = AgentState::load(&self.data_dir)?;
        state.switch(
            Installed {
                slot,
                release: release.into(),
                sha256: sha256.into(),
            },
            edgefleet_shared::unix_now(),
        );
        state.save(&self.data_dir)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn installer(dir: &Path, release: Option<&str>, supervised: bool) -> AgentInstaller {
        AgentInstaller {
            data_dir: dir.to_path_buf(),
            config_path: dir.join("agent.toml"),
            identity: Identity {
                supervised,
                slot: release.map(|_| Slot::A),
                release: release.map(str::to_string),
            },
            self_test_limit: Duration::from_secs(5),
        }
    }

    fn slot(version: &str, triple: &str) -> AgentSlot {
        AgentSlot {
            version: version.into(),
            allow_downgrade: false,
            builds: BTreeMap::from([(
                triple.to_string(),
                AgentBuild {
                    sha256: "ab".repeat(32),
                    size: 3,
                    urls: vec!["http://x/a".into()],
                    zstd: None,
                },
            )]),
        }
    }

    #[test]
    fn a_release_applies_once_for_this_target_and_never_after_it_failed() {
        let dir = tempfile::tempdir().unwrap();
        let running = installer(dir.path(), Some("1.0.0"), true);
        assert_eq!(running.decide(&slot("1.0.0", TARGET)), AgentStep::Nothing);
        assert!(matches!(
            running.decide(&slot("1.1.0", TARGET)),
            AgentStep::Install(_)
        ));
        let AgentStep::Unusable(why) = running.decide(&slot("1.1.0", "mips-unknown-linux-musl"))
        else {
            panic!("a release without this target's build applies");
        };
        assert!(why.contains(TARGET), "{why}");
        running.refuse("1.1.0", &"ab".repeat(32), "self-test failed");
        assert_eq!(running.decide(&slot("1.1.0", TARGET)), AgentStep::Nothing);
        let AgentStep::Unusable(why) =
            installer(dir.path(), None, false).decide(&slot("1.2.0", TARGET))
        else {
            panic!("an unsupervised agent would switch");
        };
        assert!(why.contains("supervisor"), "{why}");
    }

    #[tokio::test]
    async fn installs_into_the_free_slot_and_refuses_an_executable_that_fails_its_self_test() {
        let dir = tempfile::tempdir().unwrap();
        let installer = installer(dir.path(), None, true);
        let staged = installer.staging_path("x");
        std::fs::create_dir_all(staged.parent().unwrap()).unwrap();
        std::fs::write(&staged, "#!/bin/sh\necho 'no such config' >&2\nexit 3\n").unwrap();
        let (slot, exe) = installer.install(&staged).unwrap();
        assert_eq!(slot, Slot::A);
        assert!(!staged.exists());
        let why = installer.self_test(&exe).await.unwrap_err();
        assert!(
            why.contains("exit status: 3") && why.contains("no such config"),
            "{why}"
        );

        // One that exits 0 but is not an agent (no report).
        std::fs::write(&staged, "#!/bin/sh\necho hello\n").unwrap();
        let (_, exe) = installer.install(&staged).unwrap();
        let why = installer.self_test(&exe).await.unwrap_err();
        assert!(why.contains("no report"), "{why}");

        // One built for another target.
        let report =
            r#"{"target":"mips-unknown-linux-musl","version":"9.9.9","models":[],"millis":1}"#;
        std::fs::write(&staged, format!("#!/bin/sh\necho '{report}'\n")).unwrap();
        let (_, exe) = installer.install(&staged).unwrap();
        let why = installer.self_test(&exe).await.unwrap_err();
        assert!(why.contains("built for mips-unknown-linux-musl"), "{why}");

        installer.switch(Slot::A, "2.0.0", "h").unwrap();
        let state = AgentState::load(dir.path()).unwrap();
        assert_eq!(state.release(), Some("2.0.0"));
        assert!(state.trial.is_some());
        assert_eq!(state.free_slot(), Slot::B);
    }
}
