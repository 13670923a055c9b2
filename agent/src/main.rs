//! `edgefleet-agent`: parse arguments, load config, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use edgefleet_agent::config::{AgentConfig, LocalModel, RuntimeConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "edgefleet-agent",
    version,
    about = "Runs ML models on an edge device and installs signed updates from an edgefleet server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run with a config file (fleet mode when it has an [mqtt] section):
    /// a supervisor that holds the local API socket and runs the agent
    /// release installed in the data dir, or this executable.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check that this executable can run this device's agent: read the
    /// config, open the data dir, verify the trust state, load every
    /// active model; print a JSON report, exit 0 if all passed (what a new
    /// agent release must pass before the agent switches to it).
    #[command(name = "self-test")]
    SelfTest {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Serve local model files with no fleet server.
    Serve {
        /// NAME=PATH, repeatable; the format comes from the extension.
        #[arg(long = "model", value_parser = parse_model, required = true)]
        models: Vec<LocalModel>,
        /// NAME=FILE, repeatable: the test vector model NAME must reproduce
        /// before it is served (the JSON `fleetctl model push
        /// --test-vector` takes); runtimes are timed on its inputs.
        #[arg(long = "test-vector", value_parser = parse_test_vector)]
        test_vectors: Vec<(String, PathBuf)>,
        /// Unix socket for the local API.
        #[arg(long, default_value = "/run/edgefleet/agent.sock")]
        socket: PathBuf,
        /// Also listen on this loopback TCP address.
        #[arg(long)]
        tcp: Option<std::net::SocketAddr>,
        /// Data directory (model store).
        #[arg(long, default_value = "/var/lib/edgefleet")]
        data_dir: PathBuf,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Load and check one installed model version, then report (how the
    /// agent tries a new version in a child process first; see probe.rs).
    #[command(name = "probe-load", hide = true)]
    ProbeLoad {
        /// An installed version's directory (slot.json and the model).
        #[arg(
            long,
            required_unless_present = "model_file",
            conflicts_with = "model_file"
        )]
        model_dir: Option<PathBuf>,
        /// A local model file.
        #[arg(long)]
        model_file: Option<PathBuf>,
        #[arg(long, requires = "model_file")]
        test_vector: Option<PathBuf>,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

/// Runtime choices on the command line (`serve`, and the probe child).
#[derive(clap::Args)]
struct RuntimeArgs {
    /// Serve every model with this runtime instead of the fastest correct one.
    #[arg(long)]
    runtime: Option<String>,
    /// Path of libonnxruntime.so (native build).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    onnxruntime_library: Option<PathBuf>,
    /// Path of libLiteRt.so (native build).
    #[arg(long, env = "LITERT_LIBRARY")]
    litert_library: Option<PathBuf>,
    /// Also offer this ONNX Runtime execution provider (native build
    /// with a GPU build of ONNX Runtime); repeatable.
    #[arg(long = "onnxruntime-provider", value_enum)]
    onnxruntime_providers: Vec<edgefleet_agent::config::OrtProvider>,
}

impl From<RuntimeArgs> for RuntimeConfig {
    fn from(a: RuntimeArgs) -> Self {
        Self {
            pin: a.runtime,
            onnxruntime_library: a.onnxruntime_library,
            litert_library: a.litert_library,
            onnxruntime_providers: a.onnxruntime_providers,
        }
    }
}

fn parse_model(s: &str) -> Result<LocalModel, String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PATH, got {s:?}"))?;
    Ok(LocalModel {
        name: name.to_string(),
        path: PathBuf::from(path),
        runtime: None,
        upload_results: false,
        test_vector: None,
    })
}

fn parse_test_vector(s: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=FILE, got {s:?}"))?;
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Logs to stderr (journald adds the time). `EDGEFLEET_LOG` is a level
/// and/or `target=level` directives (`warn,edgefleet_agent::uplink=debug`),
/// RUST_LOG's syntax without its span-field filters: those need a regex
/// engine, which would add about a megabyte to the static binary.
fn init_logging() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = match std::env::var("EDGEFLEET_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("EDGEFLEET_LOG={spec:?} is not a log filter ({e}); logging at info");
            Targets::new().with_default(LevelFilter::INFO)
        }),
        _ => Targets::new().with_default(LevelFilter::INFO),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .with(filter)
        .init();
}

/// Runtimes can panic on hostile models; the engine layer catches that
/// per request. Report it as one log line (journald-friendly) instead of
/// the default multi-line stderr dump.
fn install_panic_logger() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(%location, %message, "panic");
    }));
}

fn main() -> ExitCode {
    edgefleet_agent::trim::single_malloc_arena();
    let cli = Cli::parse();
    init_logging();
    install_panic_logger();
    let config = match cli.command {
        Command::ProbeLoad {
            model_dir,
            model_file,
            test_vector,
            runtime,
        } => {
            use edgefleet_agent::probe;
            println!("{}", probe::STARTED);
            let runtime = RuntimeConfig::from(runtime);
            let subject = match (&model_dir, &model_file) {
                (Some(dir), _) => probe::Subject::Installed(dir),
                (None, Some(path)) => probe::Subject::File {
                    path,
                    test_vector: test_vector.as_deref(),
                    pin: runtime.pin.as_deref(),
                },
                (None, None) => unreachable!("clap requires --model-dir or --model-file"),
            };
            let report = probe::run_child(subject, &runtime);
            println!(
                "{}",
                serde_json::to_string(&report)
                    .expect("a probe Report is plain data and always serialises")
            );
            return ExitCode::SUCCESS;
        }
        Command::SelfTest { config } => {
            return match edgefleet_agent::agent_update::self_test::run(&config) {
                Ok(report) => {
                    println!(
                        "{}",
                        serde_json::to_string(&report).expect("a self-test report is plain data")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgefleet-agent self-test: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Run { config: path } => {
            let config = AgentConfig::load(&path);
            if std::env::var_os(edgefleet_agent::agent_update::ENV_SUPERVISED).is_none() {
                use edgefleet_agent::agent_update::supervisor::{self, Outcome};
                match &config {
                    Ok(c) => match supervisor::run(&path, c) {
                        Outcome::Exit(code) => return code,
                        Outcome::Unsupervised => {}
                    },
                    Err(e) => {
                        eprintln!("edgefleet-agent: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            config
        }
        Command::Serve {
            mut models,
            test_vectors,
            socket,
            tcp,
            data_dir,
            runtime,
        } => {
            for (name, path) in test_vectors {
                match models.iter_mut().find(|m| m.name == name) {
                    Some(model) => model.test_vector = Some(path),
                    None => {
                        eprintln!(
                            "error: --test-vector {name}=… names no model given with --model"
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            let mut config = AgentConfig::standalone(socket, data_dir);
            config.api.tcp = tcp;
            config.runtime = runtime.into();
            config.models = models;
            config.validate().map(|()| config)
        }
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgefleet-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("edgefleet-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let result = runtime.block_on(async {
        let token = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            token.cancel();
        });
        edgefleet_agent::run(config, shutdown).await
    });
    match result {
        Ok(()) if edgefleet_agent::agent_update::switch_requested() => {
            ExitCode::from(edgefleet_agent::agent_update::EXIT_SWITCH as u8)
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgefleet-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot handle SIGTERM; stopping on Ctrl-C only");
            if tokio::signal::ctrl_c().await.is_err() {
                // No signal can reach the agent: it runs until killed.
                std::future::pending::<()>().await;
            }
        }
    }
}
