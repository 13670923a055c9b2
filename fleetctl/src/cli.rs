//! The command line: every command, argument and default of `fleetctl`,
//! as clap parses them. The text here is the `--help` operators read;
//! [`crate::run`] hands each parsed command to its module under
//! [`crate::commands`].

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The whole command line: global options and one command.
#[derive(Parser)]
#[command(
    name = "fleetctl",
    version,
    about = "Operate an edgefleet fleet server"
)]
pub struct Cli {
    /// Fleet server base URL.
    #[arg(
        long,
        global = true,
        env = "FLEETCTL_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Operator token (eft_...). Default: EDGEFLEET_TOKEN, then the
    /// token file.
    #[arg(long, global = true, env = "EDGEFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the operator token, used when no --token is given
    /// (the server writes its first admin token here).
    #[arg(long, global = true, default_value = "fleet-data/admin.token")]
    pub token_file: PathBuf,
    /// A PEM CA certificate to trust for the server's HTTPS (a private
    /// CA or a self-signed server certificate).
    #[arg(long, global = true, env = "FLEETCTL_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// fleetctl's commands, one per group.
#[derive(Subcommand)]
pub enum Command {
    /// Key management.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Model registry.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Agent releases: push the builds of a release, list, delete.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Point devices (or every device) at a model version
    /// (`--model NAME --version N`) or at an agent release (`--agent V`).
    Deploy {
        #[arg(long, required_unless_present = "agent", requires = "version")]
        model: Option<String>,
        #[arg(long, requires = "model")]
        version: Option<u64>,
        /// An agent release (semantic version) instead of a model.
        #[arg(long, conflicts_with_all = ["model", "version"])]
        agent: Option<String>,
        /// With --agent: devices on a newer release go back to this one
        /// (they refuse an older release otherwise).
        #[arg(long, requires = "agent")]
        allow_downgrade: bool,
        /// A device id; repeat for several.
        #[arg(
            long = "device",
            conflicts_with_all = ["all", "tags"],
            required_unless_present_any = ["all", "tags"]
        )]
        devices: Vec<String>,
        /// Every device, including ones that enroll later.
        #[arg(long, conflicts_with = "tags")]
        all: bool,
        /// KEY=VALUE, repeatable: the devices that have all these tags now.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Devices: list (the default), enroll, revoke.
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
    /// Broker configuration for an external broker.
    Broker {
        #[command(subcommand)]
        command: BrokerCommand,
    },
    /// Recent update events of one device.
    Events {
        device: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Operator tokens (admin scope).
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Staged rollouts.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Operator actions, oldest first (admin scope).
    Audit {
        /// Only entries after this id (for paging).
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// `fleetctl devices ...`.
#[derive(Subcommand)]
pub enum DevicesCommand {
    /// List devices with the model versions they report.
    List {
        /// KEY=VALUE; repeat to require several.
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long)]
        hardware: Option<String>,
        #[arg(long, conflicts_with = "offline")]
        online: bool,
        #[arg(long)]
        offline: bool,
        /// Only ids after this one (paging).
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Enroll a device and write its bundle (agent.toml with its MQTT
    /// credentials, root.json) to DIR, for the flashing step to copy to
    /// /etc/edgefleet/ on the device. Enrolling again gives a new password.
    Enroll {
        #[arg(long)]
        id: String,
        /// Hardware class (rpi4, jetson-orin, ...).
        #[arg(long)]
        hardware: String,
        /// KEY=VALUE; repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Bundle directory (created; must not hold a bundle already).
        #[arg(long)]
        out: PathBuf,
        /// A board's agent settings to merge into the bundle's agent.toml
        /// (devices/<board>/agent.toml): outbox, telemetry, display,
        /// runtime, API limits.
        #[arg(long)]
        profile: Option<PathBuf>,
        /// The device's public key (64 hex), if it made one already
        /// (the agent logs it at start). Without it the agent makes a
        /// key at first start and registers it with the bundle's
        /// credentials; the server takes only the first.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// Put the agent and a device's bundle on a board: over SSH
    /// (--host: copy, install, start, then wait until the device reports
    /// in), or onto the board's mounted root file system for its first
    /// boot to install (--to).
    Flash(FlashArgs),
    /// Revoke a device: its credentials stop working and its broker
    /// connection is cut.
    Revoke { id: String },
    /// Set the key a device's messages must be signed with, replacing any
    /// other (a key made on the device, or a rotation).
    SetKey {
        id: String,
        /// 64 hex characters (the agent logs its key at start, "device key").
        #[arg(long)]
        public_key: String,
    },
    /// Replace a device's tags (KEY=VALUE ...; none clears them).
    Tag { id: String, tags: Vec<String> },
    /// One device: what it reports, its tags and enrollment.
    Show { id: String },
    /// A device's stored telemetry (JSON lines, oldest first).
    Telemetry {
        id: String,
        #[arg(long)]
        after_seq: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// A device's uploaded inference results (JSON lines, oldest first).
    Results {
        id: String,
        #[arg(long)]
        model: Option<String>,
        #[arg(long)]
        after_seq: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// `fleetctl rollout ...`.
#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Create a rollout (with --dry-run, show the waves only).
    Create(Box<CreateRolloutArgs>),
    /// Status: phase (and why it paused), counts per state in all and per
    /// wave; with --json, also each device's state.
    Status {
        id: Option<String>,
        /// With --json: leave out each device's state.
        #[arg(long)]
        brief: bool,
    },
    /// An operator's decision about one device: exclude (take it out, and
    /// send it back if it moved), retry (a failed, reverted, excluded or
    /// offline device back in line), force (ask it now, ahead of its wave).
    Device {
        id: String,
        device: String,
        #[arg(value_parser = ["exclude", "retry", "force"])]
        action: String,
    },
    Start {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Approve the next wave.
    Approve {
        id: String,
    },
    /// Abort: every device that moved goes back to its previous version.
    Abort {
        id: String,
    },
}

/// `fleetctl broker ...`.
#[derive(Subcommand)]
pub enum BrokerCommand {
    /// Write a Mosquitto password file and ACL file (devices publish and
    /// subscribe only under their own id) to DIR.
    Mosquitto {
        #[arg(long)]
        out: PathBuf,
        /// The fleet server's user on the broker.
        #[arg(long, default_value = "edgefleet-server")]
        server_user: String,
        /// Its password (the server's --broker-password), hashed into
        /// the password file.
        #[arg(long, env = "EDGEFLEET_BROKER_PASSWORD", hide_env_values = true)]
        server_password: String,
    },
}

/// `fleetctl tokens ...`.
#[derive(Subcommand)]
pub enum TokensCommand {
    /// Create a token; it is printed once and never shown again.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        scope: fleet_server::auth::Scope,
    },
    /// List tokens (ids, names, scopes; never secrets).
    List,
    /// Revoke a token by id; calls with it are refused at once.
    Revoke { id: String },
}

/// `fleetctl keys ...`.
#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create the offline root key(s), the online signing key and the
    /// signed root document.
    Init {
        #[arg(long, default_value = "fleet-data/keys")]
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        root_keys: u32,
        #[arg(long, default_value_t = 1)]
        threshold: u32,
        #[arg(long, default_value_t = 365)]
        expires_days: u64,
    },
    /// Write the next root document with a new online key (and, with
    /// --new-root-keys, new root keys). Needs a threshold of the current
    /// root key files in DIR. Restart the server afterwards: it publishes
    /// the chain and re-signs every device's desired state.
    Rotate {
        #[command(flatten)]
        root: NextRoot,
    },
    /// Write the next root document without KEYID (a compromised online or
    /// root key). Revoking the server's own online key gives it a new one.
    /// Restart the server afterwards.
    Revoke {
        keyid: String,
        #[command(flatten)]
        root: NextRoot,
    },
}

/// Where the keys are and what else the next root document changes.
#[derive(clap::Args)]
pub struct NextRoot {
    #[arg(long, default_value = "fleet-data/keys")]
    pub dir: PathBuf,
    /// Replace the root keys with this many new ones.
    #[arg(long)]
    pub new_root_keys: Option<u32>,
    /// How many of the new root keys must sign (with --new-root-keys).
    #[arg(long, default_value_t = 1)]
    pub threshold: u32,
    #[arg(long, default_value_t = 365)]
    pub expires_days: u64,
}

/// `fleetctl model ...`.
#[derive(Subcommand)]
pub enum ModelCommand {
    /// Upload a model file as NAME version VERSION.
    Push {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: u64,
        /// onnx or tflite; taken from the file extension by default.
        #[arg(long)]
        format: Option<String>,
        /// Free text kept with the version (what changed, for whom).
        #[arg(long)]
        notes: Option<String>,
        /// A test vector (JSON: {"inputs": [...], "expected": [...],
        /// "tolerance": T}, tensors as {name, datatype, shape, data}) that
        /// devices run before serving this version.
        #[arg(long)]
        test_vector: Option<PathBuf>,
        /// The model's interface (JSON: {"inputs": [{name, datatype,
        /// shape}], "outputs": [...]}, -1 for a dynamic dimension): devices
        /// check the model against it and use fixed dimensions as shape
        /// hints.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// A drift reference file (JSON: {"samples": [{"inputs": {NAME:
        /// [numbers]}, "outputs": {NAME: [numbers]}}]}, each tensor one
        /// sample's values, flat); the server bins its features and
        /// devices report drift against it.
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// List model versions.
    List,
    /// Drift references: set one from a file or from a period of traffic.
    Reference {
        #[command(subcommand)]
        command: ReferenceCommand,
    },
    /// A model's drift scores: fleet-wide, per hardware class, per device.
    Drift { name: String },
    /// A model's versions side by side in the field: per version and A/B
    /// variant its inferences, errors and latency; per shadow candidate its
    /// agreement with the version it ran beside.
    Quality { name: String },
    /// A/B test: on the selected devices, serve --share of client keys
    /// with --version ("b"), the rest with the assigned version ("a").
    Split {
        name: String,
        #[arg(long)]
        version: u64,
        /// Share of client keys (0 to 1) served by --version.
        #[arg(long)]
        share: f64,
        /// Names the experiment (default NAME-vVERSION): keys hash with it.
        #[arg(long)]
        experiment: Option<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// End an A/B test on the selected devices (they keep the assigned
    /// version).
    SplitEnd {
        name: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Keep one side of an A/B test: a ends it, b deploys the variant.
    Promote {
        name: String,
        #[arg(long, value_parser = ["a", "b"])]
        variant: String,
        /// With b: the variant's version (found from the fleet's figures
        /// when one variant b is running).
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Run --version in shadow beside the served version on the selected
    /// devices, on a sample of their requests, and compare the outputs.
    Shadow {
        name: String,
        #[arg(long)]
        version: u64,
        /// Share of requests also run on the candidate.
        #[arg(long, default_value_t = 0.1)]
        sample_rate: f64,
        /// OUTPUT=KIND[:X], repeatable: top1, cosine:MIN, max_abs:LIMIT,
        /// max_rel:LIMIT (outputs not given compare top-1).
        #[arg(long = "compare")]
        compare: Vec<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Stop the shadow candidate on the selected devices.
    ShadowEnd {
        name: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Delete a model version no deployment points at.
    Delete {
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: u64,
    },
}

/// Which devices a model setting applies to.
#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// A device id; repeat for several.
    #[arg(
        long = "device",
        conflicts_with_all = ["all", "tags"],
        required_unless_present_any = ["all", "tags"]
    )]
    pub devices: Vec<String>,
    /// Every device that runs the model.
    #[arg(long, conflicts_with = "tags")]
    pub all: bool,
    /// KEY=VALUE, repeatable: the devices that have all these tags now.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
}

/// `fleetctl model reference ...`.
#[derive(Subcommand)]
pub enum ReferenceCommand {
    /// Set NAME VERSION's drift reference from a reference file.
    Set {
        name: String,
        version: u64,
        file: PathBuf,
    },
    /// Make NAME VERSION's drift reference from the drift statistics its
    /// devices reported in a period (needs a reference in force: devices
    /// collect only in a reference's bins).
    FromTraffic {
        name: String,
        version: u64,
        /// Start of the period: unix seconds, or an age like 2h, 30m, 1d.
        #[arg(long)]
        since: String,
        /// End of the period (default now): unix seconds or an age.
        #[arg(long)]
        until: Option<String>,
    },
}

/// `fleetctl agent ...`.
#[derive(Subcommand)]
pub enum AgentCommand {
    /// Upload the builds of an agent release: every executable a DIST
    /// directory's SHA256SUMS lists (`<sha256>  ./<triple>/edgefleet-agent`,
    /// as cross/build writes it), each checked against its listed hash
    /// first, or single files with --file TRIPLE=PATH.
    Push {
        /// The directory cross/build wrote (SHA256SUMS and
        /// <triple>/edgefleet-agent).
        #[arg(required_unless_present = "files", conflicts_with = "files")]
        dist: Option<PathBuf>,
        /// The release's semantic version (MAJOR.MINOR.PATCH[-PRE]).
        #[arg(long)]
        version: String,
        /// TRIPLE=PATH: one executable and the target triple it was built
        /// for; repeat for several.
        #[arg(long = "file")]
        files: Vec<String>,
        /// Free text kept with each build (what changed).
        #[arg(long)]
        notes: Option<String>,
    },
    /// List agent releases and their builds.
    List,
    /// Delete an agent release no deployment points at.
    Delete {
        #[arg(long)]
        version: String,
    },
}

/// Where `devices flash` puts a device's agent and bundle.
#[derive(clap::Args)]
pub struct FlashArgs {
    #[arg(long)]
    pub id: String,
    /// user@address of the board (key-based SSH; the user is root or
    /// may sudo without a password).
    #[arg(long, required_unless_present = "to", conflicts_with = "to")]
    pub host: Option<String>,
    /// The board's mounted root file system (e.g. an SD card's).
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// The bundle from enrollment [default: bundles/ID].
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// The package [default: the --flavour's one in --dist for the
    /// board's architecture].
    #[arg(long)]
    pub package: Option<PathBuf>,
    /// Which build the board gets [default: static]: `static` (musl, pure
    /// Rust, every board) or `native` (glibc, with ONNX Runtime and
    /// LiteRT; amd64 and arm64 boards whose glibc and libstdc++ meet the
    /// package's floor). Each board profile in devices/ says which to use.
    #[arg(long, value_enum)]
    pub flavour: Option<crate::flash::Flavour>,
    /// The board's Debian architecture (arm64, armhf, amd64), for --to
    /// without --package.
    #[arg(long)]
    pub arch: Option<String>,
    #[arg(long, default_value = "dist")]
    pub dist: PathBuf,
    /// SSH port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Extra `ssh -o` options (KEY=VALUE); repeatable.
    #[arg(long = "ssh-option")]
    pub ssh_options: Vec<String>,
    /// Seconds to wait for the device to report in (0: do not wait).
    #[arg(long, default_value_t = 120)]
    pub wait_secs: u64,
}

/// What `rollout create` selects, how it stages the waves and the gates
/// each wave must pass.
#[derive(clap::Args)]
pub struct CreateRolloutArgs {
    #[arg(long)]
    pub id: String,
    #[arg(long, required_unless_present = "agent", requires = "version")]
    pub model: Option<String>,
    #[arg(long, requires = "model")]
    pub version: Option<u64>,
    /// Roll out an agent release (semantic version) instead of a model.
    #[arg(long, conflicts_with_all = ["model", "version"])]
    pub agent: Option<String>,
    /// With --agent: devices on a newer release go back to this one.
    #[arg(long, requires = "agent")]
    pub allow_downgrade: bool,
    #[arg(long = "device", conflicts_with_all = ["all", "tags", "hardware"], required_unless_present_any = ["all", "tags", "hardware"])]
    pub devices: Vec<String>,
    #[arg(long, conflicts_with_all = ["tags", "hardware"])]
    pub all: bool,
    /// Devices with every KEY=VALUE tag given.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Devices of this hardware class (with --tag, or alone).
    #[arg(long)]
    pub hardware: Option<String>,
    /// Cumulative waves: counts and percents, e.g. 1,5%,25%,100%.
    #[arg(long, conflicts_with = "ramp")]
    pub waves: Option<String>,
    /// Exponential ramp BASE,FACTOR, e.g. 2,3.
    #[arg(long)]
    pub ramp: Option<String>,
    /// Percent of settled devices failed at which to stop.
    #[arg(long, default_value_t = 10.0)]
    pub failure_pct: f64,
    /// pause or abort at the failure threshold.
    #[arg(long, default_value = "pause")]
    pub on_failure: String,
    /// Percent of a wave's settled devices that must be healthy.
    #[arg(long, default_value_t = 95.0)]
    pub success_pct: f64,
    #[arg(long, default_value_t = 0)]
    pub soak_secs: u64,
    /// Wait for `fleetctl rollout approve` before each next wave.
    #[arg(long)]
    pub approve_each: bool,
    #[arg(long, default_value_t = 100)]
    pub max_in_flight: u32,
    /// A device that does not report within this is asked again.
    #[arg(long, default_value_t = 600)]
    pub device_timeout_secs: u64,
    /// How often a device is asked again before it counts as failed.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// How long an offline device may hold a wave's gate.
    #[arg(long, default_value_t = 900)]
    pub offline_grace_secs: u64,
    /// A device on the new version whose inference error rate (percent,
    /// in one telemetry interval) is above this counts as failed.
    #[arg(long)]
    pub max_error_pct: Option<f64>,
    /// Likewise for its p95 inference latency, in milliseconds.
    #[arg(long)]
    pub max_p95_ms: Option<f64>,
    /// Likewise for its drift score (largest feature PSI of an interval
    /// against the version's reference; needs a reference).
    #[arg(long)]
    pub max_drift_psi: Option<f64>,
    /// Fewest inferences in an interval to judge it by.
    #[arg(long, default_value_t = 20)]
    pub min_inferences: u64,
    /// Shadow gate: each wave's devices first run the new version in
    /// shadow; the wave moves once this share (0 to 1) of compared
    /// requests agree, and the rollout takes --on-failure otherwise.
    #[arg(long)]
    pub min_shadow_agreement: Option<f64>,
    /// Compared requests (summed over a wave's devices) the shadow gate
    /// judges by.
    #[arg(long, default_value_t = 200, requires = "min_shadow_agreement")]
    pub min_shadow_requests: u64,
    /// Share of requests devices also run on the new version in shadow.
    #[arg(long, default_value_t = 0.1, requires = "min_shadow_agreement")]
    pub shadow_sample_rate: f64,
    /// OUTPUT=KIND[:X], repeatable: how the shadow compares an output
    /// (top1, cosine:MIN, max_abs:LIMIT, max_rel:LIMIT; default top1).
    #[arg(long = "shadow-compare", requires = "min_shadow_agreement")]
    pub shadow_compare: Vec<String>,
    #[arg(long)]
    pub dry_run: bool,
}
