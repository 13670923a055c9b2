//! Loading a new model version in a child process first.
//!
//! The shipped builds abort on panic (profile `agent`, 2 MB smaller), and
//! the native build's C runtimes can crash outright: either way a runtime
//! that dies on a model would take the agent with it. So before a new
//! version is loaded into the agent, the agent runs itself as a child
//! (`edgefleet-agent probe-load --model-dir DIR`), which loads and checks
//! the version exactly as an activation does and prints one [`Report`]
//! line. A child that dies instead is a model that would have killed the
//! agent: the version is refused, and the agent never stopped serving.
//!
//! The child prints a start line before loading anything, so a child that
//! could not run at all (no exec, or a binary for another architecture
//! under an emulator) is told apart from one that crashed: the agent then
//! loads the version itself, as unwinding builds always do.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::activation::Failure;
use crate::config::RuntimeConfig;
use crate::engine::load::{
    local_format, read_test_vector, select_installed, select_local, Loading,
};
use crate::model_store::InstalledModel;

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "probe-load";

/// The child's first line: it runs and is about to load.
pub const STARTED: &str = "edgefleet-probe started";

/// A load that takes longer than this is taken to hang.
const TIMEOUT: Duration = Duration::from_secs(600);

/// What the child prints last: how the load went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub ok: bool,
    /// The runtime that would serve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// It loaded but failed its test vector (or cross-check).
    #[serde(default)]
    pub test_vector: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// What a probe found.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Loaded and checked in the child: safe to load in the agent.
    Passed,
    /// Failed its load or checks the ordinary way; the child said why.
    Failed(Failure),
    /// The child died loading it: so would the agent.
    Crashed(String),
    /// The child could not be run at all; says nothing about the model.
    Unavailable(String),
}

/// Why a probe says the agent must not load a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// It failed its load or checks the ordinary way.
    #[error("{0}")]
    Failed(Failure),
    /// It crashed the child: it would crash the agent.
    #[error("{0}")]
    Crashed(String),
}

/// Whether the agent may load `subject` itself: yes when there is no
/// probe (panics unwind), when the child passed it, or when no child could
/// run (said in the log; the load then happens in-process as without a
/// probe); otherwise why not.
pub async fn gate(probe: Option<&Probe>, subject: Subject<'_>) -> Result<(), Refusal> {
    let Some(probe) = probe else {
        return Ok(());
    };
    match probe.check(subject).await {
        Outcome::Passed => Ok(()),
        Outcome::Unavailable(reason) => {
            tracing::warn!(%reason, "cannot load the model in a probe process first; loading it here");
            Ok(())
        }
        Outcome::Failed(failure) => Err(Refusal::Failed(failure)),
        Outcome::Crashed(reason) => Err(Refusal::Crashed(reason)),
    }
}

/// What the child loads.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    /// An installed version's directory in the model store (fleet mode).
    Installed(&'a Path),
    /// A local model file (standalone), with its test vector and runtime pin.
    File {
        path: &'a Path,
        test_vector: Option<&'a Path>,
        pin: Option<&'a str>,
    },
}

/// How to start the child.
#[derive(Debug, Clone)]
pub struct Probe {
    program: PathBuf,
    /// The runtime settings, but the pin.
    args: Vec<OsString>,
    pin: Option<String>,
}

impl Probe {
    /// The probe for this build: `None` where panics unwind (the engine
    /// layer catches them in-process there).
    pub fn for_this_build(runtime: &RuntimeConfig) -> Option<Self> {
        if !cfg!(panic = "abort") {
            return None;
        }
        // /proc/self/exe still runs this binary after an upgrade has
        // replaced the file on disk.
        let program = if Path::new("/proc/self/exe").exists() {
            PathBuf::from("/proc/self/exe")
        } else {
            std::env::current_exe().ok()?
        };
        Some(Self::new(program, runtime))
    }

    /// A probe that runs `program` with the runtime settings of `runtime`.
    pub fn new(program: PathBuf, runtime: &RuntimeConfig) -> Self {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(p) = &runtime.onnxruntime_library {
            args.extend(["--onnxruntime-library".into(), p.into()]);
        }
        if let Some(p) = &runtime.litert_library {
            args.extend(["--litert-library".into(), p.into()]);
        }
        for provider in &runtime.onnxruntime_providers {
            if let Some(name) = clap::ValueEnum::to_possible_value(provider) {
                args.extend(["--onnxruntime-provider".into(), name.get_name().into()]);
            }
        }
        Self {
            program,
            args,
            pin: runtime.pin.clone(),
        }
    }

    /// The child's arguments for `subject`.
    fn command_line(&self, subject: Subject<'_>) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![SUBCOMMAND.into()];
        let pin = match subject {
            Subject::Installed(dir) => {
                args.extend(["--model-dir".into(), dir.into()]);
                self.pin.as_deref()
            }
            Subject::File {
                path,
                test_vector,
                pin,
            } => {
                args.extend(["--model-file".into(), path.into()]);
                if let Some(tv) = test_vector {
                    args.extend(["--test-vector".into(), tv.into()]);
                }
                pin
            }
        };
        if let Some(pin) = pin {
            args.extend(["--runtime".into(), pin.into()]);
        }
        args.extend(self.args.iter().cloned());
        args
    }

    /// Loads `subject` in a child process.
    pub async fn check(&self, subject: Subject<'_>) -> Outcome {
        let child = tokio::process::Command::new(&self.program)
            .args(self.command_line(subject))
            .env("EDGEFLEET_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                return Outcome::Unavailable(format!(
                    "cannot start {}: {e}",
                    self.program.display()
                ))
            }
        };
        match tokio::time::timeout(TIMEOUT, child.wait_with_output()).await {
            Err(_) => Outcome::Crashed(format!(
                "loading it did not finish within {} s",
                TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Outcome::Unavailable(format!("cannot wait for the probe process: {e}")),
            Ok(Ok(out)) => interpret(out.status, &out.stdout, &out.stderr),
        }
    }
}

/// What a finished child means.
pub fn interpret(status: ExitStatus, stdout: &[u8], stderr: &[u8]) -> Outcome {
    let stdout = String::from_utf8_lossy(stdout);
    let mut lines = stdout.lines().filter(|l| !l.trim().is_empty());
    if lines.next() != Some(STARTED) {
        return Outcome::Unavailable(format!(
            "the probe process did not start ({status}): {}",
            last_line(stderr)
        ));
    }
    let report = lines
        .next_back()
        .and_then(|l| serde_json::from_str::<Report>(l).ok());
    match (status.success(), report) {
        (true, Some(r)) if r.ok => Outcome::Passed,
        (true, Some(r)) if r.test_vector => Outcome::Failed(Failure::TestVector(r.reason)),
        (true, Some(r)) => Outcome::Failed(Failure::Load(r.reason)),
        _ => {
            use std::os::unix::process::ExitStatusExt;
            let how = match status.signal() {
                Some(6) => "aborted (SIGABRT: a panic, or a C runtime's abort)".to_string(),
                Some(11) => "killed by SIGSEGV".to_string(),
                Some(9) => "killed (SIGKILL: out of memory?)".to_string(),
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("ended with {status} and no report"),
            };
            Outcome::Crashed(format!(
                "a runtime crashed loading it: the probe process {how}; its last words: {}",
                last_line(stderr)
            ))
        }
    }
}

fn last_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(nothing)")
        .trim();
    line.chars().take(300).collect()
}

/// The child's side: loads `subject` as an activation (or `serve`) would:
/// every runtime, its checks, the choice; and reports.
pub fn run_child(subject: Subject<'_>, runtime: &RuntimeConfig) -> Report {
    let runtimes = crate::engine::runtimes::detect(runtime);
    let failed = |test_vector: bool, reason: String| Report {
        ok: false,
        runtime: None,
        test_vector,
        reason,
    };
    let selection = match subject {
        Subject::Installed(dir) => {
            let installed = match InstalledModel::read(dir) {
                Ok(installed) => installed,
                Err(e) => return failed(false, e.to_string()),
            };
            let loading = Loading {
                runtimes,
                pin: runtime.pin.clone(),
            };
            select_installed(&installed, &loading).map_err(|failure| {
                let test_vector = matches!(failure, Failure::TestVector(_));
                let reason = match failure {
                    Failure::Load(r) | Failure::TestVector(r) => r,
                    other => other.to_string(),
                };
                (test_vector, reason)
            })
        }
        Subject::File {
            path,
            test_vector,
            pin,
        } => {
            let loaded = (|| {
                let format = local_format(path)?;
                let tv = test_vector.map(read_test_vector).transpose()?;
                select_local(&runtimes, format, path, tv.as_ref(), pin)
            })();
            loaded.map_err(|e| (e.is_incorrect(), e.to_string()))
        }
    };
    match selection {
        Ok(selection) => Report {
            ok: true,
            runtime: Some(selection.engine.runtime().to_string()),
            test_vector: false,
            reason: String::new(),
        },
        Err((test_vector, reason)) => failed(test_vector, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A real process's exit status, made by `sh`.
    fn status(script: &str) -> ExitStatus {
        Command::new("sh").arg("-c").arg(script).status().unwrap()
    }

    fn report(r: &Report) -> String {
        format!("{STARTED}\n{}\n", serde_json::to_string(r).unwrap())
    }

    #[test]
    fn reports_become_outcomes() {
        let ok = Report {
            ok: true,
            runtime: Some("tract-onnx".into()),
            test_vector: false,
            reason: String::new(),
        };
        assert_eq!(
            interpret(status("exit 0"), report(&ok).as_bytes(), b""),
            Outcome::Passed
        );
        let wrong = Report {
            ok: false,
            runtime: None,
            test_vector: true,
            reason: "output 0 differs".into(),
        };
        assert_eq!(
            interpret(status("exit 0"), report(&wrong).as_bytes(), b""),
            Outcome::Failed(Failure::TestVector("output 0 differs".into()))
        );
        let refused = Report {
            test_vector: false,
            reason: "no runtime could load it".into(),
            ..wrong
        };
        assert_eq!(
            interpret(status("exit 0"), report(&refused).as_bytes(), b""),
            Outcome::Failed(Failure::Load("no runtime could load it".into()))
        );
    }

    #[test]
    fn a_child_that_dies_after_starting_crashed() {
        let started = format!("{STARTED}\n");
        let out = interpret(
            status("kill -ABRT $$"),
            started.as_bytes(),
            b"x\nERROR panic location=src/ops/nn.rs:10 message=axis out of range\n",
        );
        let Outcome::Crashed(reason) = out else {
            panic!("{out:?}")
        };
        assert!(reason.contains("SIGABRT"), "{reason}");
        assert!(reason.contains("axis out of range"), "{reason}");
        // Dying before the report, even with a clean exit code, is no pass.
        assert!(matches!(
            interpret(status("exit 0"), started.as_bytes(), b""),
            Outcome::Crashed(_)
        ));
        assert!(matches!(
            interpret(status("kill -SEGV $$"), started.as_bytes(), b""),
            Outcome::Crashed(r) if r.contains("SIGSEGV")
        ));
    }

    #[test]
    fn a_child_that_never_started_says_nothing_about_the_model() {
        let out = interpret(
            status("exit 1"),
            b"",
            b"qemu: unknown option 'probe-load'\n",
        );
        let Outcome::Unavailable(reason) = out else {
            panic!("{out:?}")
        };
        assert!(reason.contains("unknown option"), "{reason}");
    }

    #[tokio::test]
    async fn a_program_that_cannot_run_is_unavailable() {
        let probe = Probe::new(
            PathBuf::from("/nonexistent/edgefleet-agent"),
            &RuntimeConfig::default(),
        );
        let out = probe.check(Subject::Installed(Path::new("/tmp"))).await;
        assert!(
            matches!(out, Outcome::Unavailable(ref r) if r.contains("cannot start")),
            "{out:?}"
        );
    }

    #[test]
    fn runtime_settings_reach_the_child() {
        let config = RuntimeConfig {
            pin: Some("onnxruntime".into()),
            onnxruntime_library: Some(PathBuf::from("/opt/ort/libonnxruntime.so")),
            litert_library: None,
            onnxruntime_providers: vec![crate::config::OrtProvider::Cuda],
        };
        let probe = Probe::new(PathBuf::from("/usr/bin/edgefleet-agent"), &config);
        let line = |subject| {
            probe
                .command_line(subject)
                .into_iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line(Subject::Installed(Path::new(
                "/var/lib/edgefleet/models/kws/3"
            ))),
            "probe-load --model-dir /var/lib/edgefleet/models/kws/3 --runtime onnxruntime \
             --onnxruntime-library /opt/ort/libonnxruntime.so --onnxruntime-provider cuda"
        );
        // A local model's own pin wins over the config's.
        assert_eq!(
            line(Subject::File {
                path: Path::new("/srv/kws.onnx"),
                test_vector: Some(Path::new("/srv/kws-tv.json")),
                pin: Some("tract-onnx"),
            }),
            "probe-load --model-file /srv/kws.onnx --test-vector /srv/kws-tv.json --runtime tract-onnx \
             --onnxruntime-library /opt/ort/libonnxruntime.so --onnxruntime-provider cuda"
        );
    }
}
