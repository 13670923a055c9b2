//! fleetctl end to end: the real binary against a real fleet server,
//! asserting what it prints and the exit codes scripts rely on.

#![allow(clippy::unwrap_used)] // a test: a failed unwrap is a failed test

mod support;

use serde_json::Value;
use support::{assert_success, fleetctl, repo_root, stderr, stdout, Server};

#[test]
fn devices_list_as_a_table_and_as_json() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    let bundle = dir.path().join("bundle");
    let out = server.ctl(&[
        "devices",
        "enroll",
        "--id",
        "pi-lyon-1",
        "--hardware",
        "rpi4",
        "--tag",
        "site=lyon",
        "--out",
        bundle.to_str().expect("a UTF-8 temp path"),
    ]);
    assert_success(&out, "devices enroll");
    assert!(
        stdout(&out).starts_with("enrolled pi-lyon-1 (rpi4); bundle in "),
        "{}",
        stdout(&out)
    );
    assert!(bundle.join("agent.toml").is_file() && bundle.join("root.json").is_file());

    // `devices` alone lists, as `devices list` does.
    for args in [&["devices"][..], &["devices", "list", "--tag", "site=lyon"]] {
        let out = server.ctl(args);
        assert_success(&out, "devices");
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "a header and one device: {text}");
        let header: Vec<&str> = lines[0]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            header,
            [
                "DEVICE",
                "STATE",
                "HARDWARE",
                "TAGS",
                "MODELS",
                "DESIRED",
                "AGENT",
                "LAST SEEN"
            ]
        );
        let row: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            row[..7],
            ["pi-lyon-1", "offline", "rpi4", "site=lyon", "-", "-/0", "-"]
        );
    }
    // A filter that matches nothing: the header alone.
    let out = server.ctl(&["devices", "list", "--tag", "site=paris"]);
    assert_success(&out, "devices list --tag site=paris");
    assert_eq!(stdout(&out).lines().count(), 1);

    let out = server.ctl(&["--json", "devices", "list"]);
    assert_success(&out, "--json devices list");
    let devices: Value = serde_json::from_slice(&out.stdout)?;
    let devices = devices.as_array().expect("a JSON array of devices");
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0]["id"], "pi-lyon-1");
    assert_eq!(devices[0]["hardware"], "rpi4");
    assert_eq!(devices[0]["tags"]["site"], "lyon");
    assert_eq!(stdout(&out).lines().count(), 1, "--json prints one line");
    Ok(())
}

#[test]
fn an_unknown_device_exits_1_naming_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    for args in [
        &["devices", "show", "no-such-device"][..],
        &["devices", "revoke", "no-such-device"],
        &["devices", "telemetry", "no-such-device"],
    ] {
        let out = server.ctl(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.starts_with("fleetctl: server answered 404 Not Found: "),
            "{err}"
        );
        assert!(err.contains("no-such-device"), "{err}");
        assert!(stdout(&out).is_empty());
    }
    Ok(())
}

#[test]
fn bad_arguments_exit_2_before_calling_the_server() {
    // Nothing listens here: a usage error must not get as far as a call.
    let server = "http://127.0.0.1:9";
    let cases: [(&[&str], &str); 9] = [
        (&["deploy", "--model", "digits"], "--version"),
        (
            &["deploy", "--agent", "1.0.0", "--model", "m", "--all"],
            "cannot be used with",
        ),
        (
            &[
                "deploy",
                "--model",
                "m",
                "--version",
                "1",
                "--allow-downgrade",
                "--all",
            ],
            "--agent",
        ),
        (
            &[
                "agent",
                "push",
                "--version",
                "1.0.0",
                "--file",
                "x86_64-unknown-linux-musl",
            ],
            "must be TRIPLE=PATH",
        ),
        (
            &[
                "agent",
                "push",
                "--version",
                "v1",
                "--file",
                "x86_64-unknown-linux-musl=/x",
            ],
            "semantic version",
        ),
        (
            &["devices", "list", "--limit", "many"],
            "invalid value 'many'",
        ),
        (&["no-such-command"], "unrecognized subcommand"),
        (
            &["deploy", "--model", "m", "--version", "1", "--tag", "site"],
            "must be KEY=VALUE",
        ),
        (
            &[
                "rollout",
                "create",
                "--id",
                "r",
                "--model",
                "m",
                "--version",
                "1",
                "--all",
                "--waves",
                "1,half",
            ],
            "\"half\" is not a count or a percent",
        ),
    ];
    for (args, says) in cases {
        let out = fleetctl()
            .args(["--server", server])
            .args(args)
            .output()
            .expect("run fleetctl");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn an_unreachable_server_exits_3_naming_its_url() -> anyhow::Result<()> {
    // A port that was free a moment ago and has no listener now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = fleetctl()
        .args(["--server", &url, "--token", "eft_a_b", "model", "list"])
        .output()?;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "fleetctl: cannot reach the fleet server at {url}/api/v1/models: "
        )),
        "{err}"
    );
    Ok(())
}

#[test]
fn a_bad_token_exits_4() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    let out = fleetctl()
        .args([
            "--server",
            &server.url,
            "--token",
            "eft_nobody_secret",
            "devices",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("401 Unauthorized"),
        "{}",
        stderr(&out)
    );
    Ok(())
}

#[test]
fn a_pushed_model_is_listed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    let model = repo_root().join("models/digits/digits_fp32.onnx");
    let size = std::fs::metadata(&model)?.len();
    let out = server.ctl(&[
        "model",
        "push",
        model.to_str().expect("a UTF-8 path"),
        "--name",
        "digits",
        "--version",
        "3",
        "--notes",
        "fp32 & retrained",
    ]);
    assert_success(&out, "model push");
    let said = stdout(&out);
    assert!(
        said.starts_with(&format!("pushed digits v3 ({size} bytes, onnx, sha256 ")),
        "{said}"
    );

    let out = server.ctl(&["model", "list"]);
    assert_success(&out, "model list");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("NAME    VERSION  FORMAT  SIZE"),
        "{text}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..4], ["digits", "3", "onnx", &size.to_string()]);
    assert_eq!(row[4].len(), 16, "a shortened digest: {text}");
    assert!(
        lines[1].ends_with("bootstrap-admin  fp32 & retrained"),
        "{text}"
    );

    let out = server.ctl(&["--json", "model", "list"]);
    assert_success(&out, "--json model list");
    let models: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(models[0]["name"], "digits");
    assert_eq!(models[0]["version"], 3);
    assert_eq!(models[0]["size"], size);
    assert_eq!(models[0]["notes"], "fp32 & retrained");
    assert!(models[0]["sha256"]
        .as_str()
        .is_some_and(|s| s.len() == 64 && row[4] == &s[..16]));

    // The same version with other bytes is refused; the first stays.
    let other = repo_root().join("models/digits/digits_int8.onnx");
    let out = server.ctl(&[
        "model",
        "push",
        other.to_str().expect("a UTF-8 path"),
        "--name",
        "digits",
        "--version",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("409 Conflict"), "{}", stderr(&out));

    let out = server.ctl(&["model", "delete", "--name", "digits", "--version", "3"]);
    assert_success(&out, "model delete");
    assert_eq!(stdout(&out), "deleted digits v3\n");
    let out = server.ctl(&["--json", "model", "list"]);
    assert_eq!(stdout(&out).trim(), "[]");
    Ok(())
}

#[test]
fn an_agent_release_is_pushed_from_a_dist_listed_and_deployed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path())?;
    // A DIST as cross/build writes it.
    let dist = dir.path().join("dist");
    let mut sums = String::new();
    for (triple, content) in [
        ("aarch64-unknown-linux-musl", "arm agent"),
        ("x86_64-unknown-linux-musl", "x86 agent"),
    ] {
        let file = dist.join(triple).join("edgefleet-agent");
        std::fs::create_dir_all(file.parent().expect("a parent"))?;
        std::fs::write(&file, content)?;
        let (sha, _) = fleet_server::artifacts::file_sha256(&file)?;
        sums.push_str(&format!("{sha}  ./{triple}/edgefleet-agent\n"));
    }
    std::fs::write(dist.join("SHA256SUMS"), &sums)?;
    let dist_arg = dist.to_str().expect("a UTF-8 temp path");

    // A tampered file: refused before anything is sent.
    let arm = dist.join("aarch64-unknown-linux-musl/edgefleet-agent");
    std::fs::write(&arm, "arm agent, patched")?;
    let out = server.ctl(&["agent", "push", dist_arg, "--version", "1.2.0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&arm.display().to_string()),
        "{}",
        stderr(&out)
    );
    let out = server.ctl(&["--json", "agent", "list"]);
    assert_eq!(stdout(&out).trim(), "[]", "nothing was pushed");
    std::fs::write(&arm, "arm agent")?;

    let out = server.ctl(&[
        "agent",
        "push",
        dist_arg,
        "--version",
        "1.2.0",
        "--notes",
        "faster",
    ]);
    assert_success(&out, "agent push");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "pushed agent release 1.2.0:", "{text}");
    assert!(lines[1].starts_with("TARGET"), "{text}");
    let row: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(row[..2], ["aarch64-unknown-linux-musl", "9"]);
    assert_eq!(row[2].len(), 64, "{text}");

    // Single files, as --file TRIPLE=PATH.
    let out = server.ctl(&[
        "--json",
        "agent",
        "push",
        "--version",
        "1.3.0-rc.1",
        "--file",
        &format!("aarch64-unknown-linux-musl={}", arm.display()),
    ]);
    assert_success(&out, "agent push --file");
    let pushed: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(pushed[0]["version"], "1.3.0-rc.1");

    let out = server.ctl(&["agent", "list"]);
    assert_success(&out, "agent list");
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(2).collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["1.2.0", "aarch64-unknown-linux-musl"],
            ["1.2.0", "x86_64-unknown-linux-musl"],
            ["1.3.0-rc.1", "aarch64-unknown-linux-musl"],
        ],
        "{text}"
    );

    let out = server.ctl(&["deploy", "--agent", "1.2.0", "--device", "pi-1"]);
    assert_success(&out, "deploy --agent");
    assert_eq!(
        stdout(&out),
        "agent 1.2.0 deployed; signed desired state published to 1 device(s)\n"
    );
    let out = server.ctl(&["deploy", "--agent", "9.9.9", "--device", "pi-1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("404 Not Found"), "{}", stderr(&out));

    let out = server.ctl(&[
        "rollout",
        "create",
        "--id",
        "agent-1.3",
        "--agent",
        "1.3.0-rc.1",
        "--device",
        "pi-1",
        "--dry-run",
    ]);
    assert_success(&out, "rollout create --agent --dry-run");
    assert!(
        stdout(&out).contains("agent 1.3.0-rc.1"),
        "{}",
        stdout(&out)
    );
    Ok(())
}
