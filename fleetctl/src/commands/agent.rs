//! `fleetctl agent`: agent releases. `push` uploads the builds of a
//! release: every executable a DIST directory's `SHA256SUMS` lists (what
//! `cross/build` writes), each hashed here and compared with its listed
//! hash before anything is sent, or single files given as
//! `--file TRIPLE=PATH`; `list` and `delete`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use fleet_server::api::types::{AgentBuildRecord, AgentRelease};

use crate::cli::AgentCommand;
use crate::failure::{refused, usage, Failure};
use crate::output::{ago, print_json, print_table};
use crate::Context;

/// The name of the executable in each DIST target directory.
const EXECUTABLE: &str = "edgefleet-agent";

/// One executable to push: the target triple it was built for, where it
/// is, and its hash and size as read here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub target: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// Runs an `agent` command.
pub async fn run(ctx: &Context, command: &AgentCommand) -> Result<(), Failure> {
    match command {
        AgentCommand::Push {
            dist,
            version,
            files,
            notes,
        } => {
            version
                .parse::<edgefleet_shared::ReleaseVersion>()
                .map_err(usage)?;
            let uploads = match dist {
                Some(dist) => uploads_from_dist(dist)?,
                None => uploads_from_files(files)?,
            };
            push(ctx, version, &uploads, notes.as_deref()).await
        }
        AgentCommand::List => {
            let answer = ctx.client.list_agent_releases().await?;
            if ctx.json {
                print_json(&answer.raw);
            } else {
                print_table(&HEADERS, &rows(&answer.body));
            }
            Ok(())
        }
        AgentCommand::Delete { version } => {
            let answer = ctx.client.delete_agent_release(version).await?;
            ctx.report(&answer.raw, || {
                format!(
                    "deleted agent release {version} ({} build(s))",
                    answer.body.builds.len()
                )
            });
            Ok(())
        }
    }
}

/// The release table's columns.
const HEADERS: [&str; 7] = [
    "VERSION", "TARGET", "SIZE", "SHA256", "PUSHED", "BY", "NOTES",
];

/// The release table's rows: one per build.
pub fn rows(releases: &[AgentRelease]) -> Vec<Vec<String>> {
    releases
        .iter()
        .flat_map(|r| &r.builds)
        .map(|b| {
            vec![
                b.version.clone(),
                b.target.clone(),
                b.size.to_string(),
                b.sha256.get(..16).unwrap_or(&b.sha256).to_string(),
                ago(b.created_at),
                b.pushed_by.clone().unwrap_or_else(|| "-".into()),
                b.notes.clone().unwrap_or_default(),
            ]
        })
        .collect()
}

/// Hashes a file to push.
fn hash(path: &Path) -> Result<(String, u64), Failure> {
    fleet_server::artifacts::file_sha256(path)
        .with_context(|| format!("cannot read {}", path.display()))
        .map_err(usage)
}

/// Checks a target triple's spelling.
fn check_target(target: &str) -> Result<(), Failure> {
    edgefleet_shared::agent_release::validate_target(target).map_err(usage)
}

/// The executables a DIST directory's `SHA256SUMS` lists
/// (`<sha256>  ./<triple>/edgefleet-agent` lines), each hashed and
/// compared with its line; any missing or different file refuses the
/// whole push, naming it.
pub fn uploads_from_dist(dist: &Path) -> Result<Vec<Upload>, Failure> {
    let sums_path = dist.join("SHA256SUMS");
    let sums = std::fs::read_to_string(&sums_path).map_err(|e| {
        usage(anyhow::anyhow!(
            "cannot read {}: {e}; DIST must be what cross/build wrote (SHA256SUMS and <triple>/{EXECUTABLE})",
            sums_path.display()
        ))
    })?;
    let mut uploads: Vec<Upload> = Vec::new();
    for (n, line) in sums.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad_line = || {
            usage(anyhow::anyhow!(
                "{} line {}: {line:?} is not `<sha256>  ./<triple>/{EXECUTABLE}`",
                sums_path.display(),
                n + 1
            ))
        };
        let (listed, name) = line.split_once(char::is_whitespace).ok_or_else(bad_line)?;
        // sha256sum marks files read in binary mode with `*`.
        let name = name.trim_start().trim_start_matches('*');
        let relative = name.strip_prefix("./").unwrap_or(name);
        let target = match relative.split('/').collect::<Vec<_>>().as_slice() {
            [target, file] if *file == EXECUTABLE => target.to_string(),
            _ => return Err(bad_line()),
        };
        let listed = listed.to_ascii_lowercase();
        if listed.len() != 64 || !listed.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad_line());
        }
        check_target(&target)?;
        if uploads.iter().any(|u| u.target == target) {
            return Err(usage(anyhow::anyhow!(
                "{} lists {target} twice",
                sums_path.display()
            )));
        }
        let path = dist.join(relative);
        if !path.is_file() {
            return Err(usage(anyhow::anyhow!(
                "{} is listed in {} but missing; nothing was pushed",
                path.display(),
                sums_path.display()
            )));
        }
        let (sha256, size) = hash(&path)?;
        if sha256 != listed {
            return Err(usage(anyhow::anyhow!(
                "{} has sha256 {sha256}, but {} lists {listed}: the file changed after it was built (or was tampered with); nothing was pushed",
                path.display(),
                sums_path.display()
            )));
        }
        uploads.push(Upload {
            target,
            path,
            sha256,
            size,
        });
    }
    if uploads.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "{} lists no <triple>/{EXECUTABLE}",
            sums_path.display()
        )));
    }
    Ok(uploads)
}

/// The executables given as `--file TRIPLE=PATH`, each hashed.
pub fn uploads_from_files(files: &[String]) -> Result<Vec<Upload>, Failure> {
    let mut uploads: Vec<Upload> = Vec::new();
    for f in files {
        let (target, path) = f
            .split_once('=')
            .ok_or_else(|| usage(anyhow::anyhow!("--file {f:?} must be TRIPLE=PATH")))?;
        check_target(target)?;
        if uploads.iter().any(|u| u.target == target) {
            return Err(usage(anyhow::anyhow!("--file gives {target} twice")));
        }
        let path = PathBuf::from(path);
        let (sha256, size) = hash(&path)?;
        uploads.push(Upload {
            target: target.to_string(),
            path,
            sha256,
            size,
        });
    }
    if uploads.is_empty() {
        return Err(usage(anyhow::anyhow!(
            "give a DIST directory or --file TRIPLE=PATH"
        )));
    }
    Ok(uploads)
}

/// Uploads each build (stopping at the first refusal; what was pushed
/// stays: pushing the same files again is a no-op), checks the server
/// stored what was read here, and prints the builds.
async fn push(
    ctx: &Context,
    version: &str,
    uploads: &[Upload],
    notes: Option<&str>,
) -> Result<(), Failure> {
    let mut stored: Vec<AgentBuildRecord> = Vec::new();
    let mut raw = Vec::new();
    for upload in uploads {
        let answer = push_one(ctx, version, upload, notes).await.map_err(|e| {
            e.context(format!(
                "pushing agent {version} for {} ({})",
                upload.target,
                upload.path.display()
            ))
        })?;
        if answer.body.sha256 != upload.sha256 {
            return Err(refused(anyhow::anyhow!(
                "the server stored agent {version} for {} with sha256 {}, but {} has {}: it changed while being sent",
                upload.target,
                answer.body.sha256,
                upload.path.display(),
                upload.sha256
            )));
        }
        stored.push(answer.body);
        raw.push(answer.raw);
    }
    if ctx.json {
        print_json(&serde_json::Value::Array(raw));
    } else {
        println!("pushed agent release {version}:");
        let rows: Vec<Vec<String>> = stored
            .iter()
            .map(|b| vec![b.target.clone(), b.size.to_string(), b.sha256.clone()])
            .collect();
        print_table(&["TARGET", "SIZE", "SHA256"], &rows);
    }
    Ok(())
}

/// Streams one executable to the server, showing progress unless the
/// output is JSON.
async fn push_one(
    ctx: &Context,
    version: &str,
    upload: &Upload,
    notes: Option<&str>,
) -> Result<crate::client::Answer<AgentBuildRecord>, Failure> {
    let handle = tokio::fs::File::open(&upload.path)
        .await
        .with_context(|| format!("cannot open {}", upload.path.display()))
        .map_err(usage)?;
    let (body, bar) = super::upload_body(
        handle,
        upload.size,
        format!("pushing agent {version} for {}", upload.target),
        ctx.json,
    );
    let answer = ctx
        .client
        .push_agent_build(version, &upload.target, notes, body, upload.size)
        .await;
    bar.finish_and_clear();
    Ok(answer?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::Exit;

    const ARM: &str = "aarch64-unknown-linux-musl";
    const X86: &str = "x86_64-unknown-linux-musl";

    /// A DIST as cross/build writes it, with an executable per target.
    fn dist(targets: &[(&str, &[u8])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut sums = String::new();
        for (target, content) in targets {
            let path = dir.path().join(target).join(EXECUTABLE);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, content).expect("write");
            let (sha, _) = fleet_server::artifacts::file_sha256(&path).expect("hash");
            sums.push_str(&format!("{sha}  ./{target}/{EXECUTABLE}\n"));
        }
        std::fs::write(dir.path().join("SHA256SUMS"), sums).expect("write sums");
        dir
    }

    #[test]
    fn a_dist_yields_every_listed_build_with_its_hash() {
        let d = dist(&[(ARM, b"arm binary"), (X86, b"x86 binary")]);
        let uploads = uploads_from_dist(d.path()).expect("a good DIST");
        let targets: Vec<&str> = uploads.iter().map(|u| u.target.as_str()).collect();
        assert_eq!(targets, [ARM, X86]);
        assert_eq!(uploads[0].size, 10);
        assert_eq!(uploads[0].path, d.path().join(ARM).join(EXECUTABLE));
    }

    #[test]
    fn a_tampered_dist_is_refused_naming_the_file() {
        let d = dist(&[(ARM, b"arm binary"), (X86, b"x86 binary")]);
        let tampered = d.path().join(X86).join(EXECUTABLE);
        std::fs::write(&tampered, b"x86 binary, patched").expect("write");
        let err = uploads_from_dist(d.path()).expect_err("a tampered file");
        assert_eq!(err.exit, Exit::Usage);
        let message = err.error.to_string();
        assert!(
            message.contains(&tampered.display().to_string()),
            "{message}"
        );
        assert!(message.contains("nothing was pushed"), "{message}");
    }

    #[test]
    fn a_dist_missing_a_listed_file_or_its_sums_is_refused() {
        let d = dist(&[(ARM, b"arm binary")]);
        let gone = d.path().join(ARM).join(EXECUTABLE);
        std::fs::remove_file(&gone).expect("rm");
        let err = uploads_from_dist(d.path()).expect_err("a missing file");
        assert!(
            err.error.to_string().contains(&gone.display().to_string()),
            "{}",
            err.error
        );
        std::fs::remove_file(d.path().join("SHA256SUMS")).expect("rm");
        let err = uploads_from_dist(d.path()).expect_err("no SHA256SUMS");
        assert_eq!(err.exit, Exit::Usage);
        assert!(
            err.error.to_string().contains("SHA256SUMS"),
            "{}",
            err.error
        );
    }

    #[test]
    fn malformed_sums_lines_are_refused() {
        let d = dist(&[(ARM, b"arm binary")]);
        for bad in [
            "nothex  ./aarch64-unknown-linux-musl/edgefleet-agent\n",
            &format!("{}  ./aarch64-unknown-linux-musl/other\n", "ab".repeat(32)),
            &format!("{}  ./Bad_Triple/edgefleet-agent\n", "ab".repeat(32)),
        ] {
            std::fs::write(d.path().join("SHA256SUMS"), bad).expect("write");
            assert!(uploads_from_dist(d.path()).is_err(), "{bad}");
        }
        std::fs::write(d.path().join("SHA256SUMS"), "\n").expect("write");
        let err = uploads_from_dist(d.path()).expect_err("empty");
        assert!(err.error.to_string().contains("lists no"), "{}", err.error);
    }

    #[test]
    fn single_files_are_triple_equals_path() {
        let d = dist(&[(ARM, b"arm binary")]);
        let path = d.path().join(ARM).join(EXECUTABLE);
        let uploads = uploads_from_files(&[format!("{ARM}={}", path.display())]).expect("a file");
        assert_eq!(uploads[0].target, ARM);
        assert_eq!(uploads[0].size, 10);
        assert!(uploads_from_files(&[path.display().to_string()]).is_err());
        assert!(uploads_from_files(&[format!("x86={}", path.display())]).is_err());
        let twice = [
            format!("{ARM}={}", path.display()),
            format!("{ARM}={}", path.display()),
        ];
        assert!(uploads_from_files(&twice).is_err());
        assert!(uploads_from_files(&[]).is_err());
    }
}
