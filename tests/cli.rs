//! The command line: typos and bad values get a clear message naming the argument and
//! a non-zero exit, and never touch a backing file; --help works for every command.

mod common;

use std::process::Command;

use common::{pairbd_binary, TestDir};

fn pairbd(args: &[&str]) -> (i32, String) {
    let output = Command::new(pairbd_binary())
        .args(args)
        .output()
        .expect("run pairbd");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn help_is_there_for_every_command() {
    let (code, text) = pairbd(&["--help"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("serve"), "{text}");
    let (code, text) = pairbd(&["serve", "--help"]);
    assert_eq!(code, 0, "{text}");
    for option in [
        "--backing",
        "--size",
        "--listen",
        "--export",
        "--read-only",
        "--engine",
        "--direct-io",
    ] {
        assert!(text.contains(option), "serve --help lacks {option}: {text}");
    }
}

#[test]
fn bad_arguments_name_what_is_wrong_and_create_nothing() {
    let dir = TestDir::new("cli");
    let backing = dir.join("never.img");
    let backing = backing.to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (&["serv"], "serve"),
        (&["serve"], "--backing"),
        (&["serve", "--backing", backing, "--size", "12XB"], "--size"),
        (
            &["serve", "--backing", backing, "--size", "1000"],
            "multiple of 512",
        ),
        (
            &[
                "serve",
                "--backing",
                backing,
                "--size",
                "1GiB",
                "--listen",
                "127.0.0.1:1",
            ],
            "--listen",
        ),
        (
            &[
                "serve",
                "--backing",
                backing,
                "--size",
                "1GiB",
                "--listen",
                "tcp:nohost",
            ],
            "--listen",
        ),
        (
            &[
                "serve",
                "--backing",
                backing,
                "--size",
                "1GiB",
                "--engine",
                "fast",
            ],
            "--engine",
        ),
        (
            &[
                "serve",
                "--backing",
                backing,
                "--size",
                "1GiB",
                "--max-in-flight-bytes",
                "1KiB",
            ],
            "--max-in-flight-bytes",
        ),
        (
            &[
                "serve",
                "--backing",
                backing,
                "--size",
                "1GiB",
                "--max-in-flight-requests",
                "0",
            ],
            "--max-in-flight-requests",
        ),
        (
            &[
                "serve",
                "--backing",
                backing,
                "--size",
                "1GiB",
                "--max-connections",
                "9999999",
            ],
            "--max-connections",
        ),
        (&["serve", "--backing", backing], "no size"),
    ];
    for (args, expected) in cases {
        let (code, text) = pairbd(args);
        assert_ne!(code, 0, "pairbd {args:?} succeeded: {text}");
        assert!(
            text.contains(expected),
            "pairbd {args:?} did not mention {expected:?}: {text}"
        );
        assert!(
            !text.contains("panicked"),
            "pairbd {args:?} panicked: {text}"
        );
    }
    assert!(
        !dir.join("never.img").exists(),
        "a refused command created the backing file"
    );
}

#[test]
fn every_replication_subcommand_has_help() {
    for sub in [
        "daemon",
        "gen-cert",
        "create-md",
        "promote",
        "demote",
        "resume-io",
        "restart",
        "invalidate",
        "verify",
        "resync-marked",
        "status",
        "demo",
        "attach",
        "detach",
    ] {
        let (code, text) = pairbd(&[sub, "--help"]);
        assert_eq!(code, 0, "{sub}: {text}");
        assert!(
            text.contains("--config"),
            "{sub} --help lacks the global --config: {text}"
        );
    }
    let (_, text) = pairbd(&["status", "--help"]);
    assert!(text.contains("--json"), "{text}");
    let (_, text) = pairbd(&["resync-marked", "--help"]);
    assert!(text.contains("--json") && text.contains("marked"), "{text}");
    let (_, text) = pairbd(&["restart", "--help"]);
    assert!(
        text.contains("--json") && text.contains("--force"),
        "{text}"
    );
    let (_, text) = pairbd(&["attach", "--help"]);
    assert!(
        text.contains("--dead-timeout") && text.contains("--nbd-client"),
        "{text}"
    );
    assert!(
        !text.contains("--supervise"),
        "the internal flag is hidden: {text}"
    );
}

#[test]
fn a_broken_config_is_named_by_line_and_key_wherever_the_options_go() {
    let dir = TestDir::new("cli-config");
    let config = dir.join("pairbd.toml");
    std::fs::write(
        &config,
        "[resource.mail]\nsize = \"1GiB\"\n\n[resource.mail.node.alpha]\nid = 1\nbakcing = \"a.img\"\n",
    )
    .unwrap();
    let path = config.display().to_string();
    // Global options before and after the subcommand.
    for args in [
        vec!["--config", &path, "--node", "alpha", "status"],
        vec!["status", "--config", &path, "--node", "alpha"],
    ] {
        let (code, text) = pairbd(&args);
        assert_ne!(code, 0);
        assert!(text.contains("line 6"), "{text}");
        assert!(text.contains("bakcing"), "{text}");
        assert!(text.contains("resource.mail.node.alpha"), "{text}");
    }
    let (code, text) = pairbd(&["--config", "/nonexistent/pairbd.toml", "status"]);
    assert_ne!(code, 0);
    assert!(text.contains("/nonexistent/pairbd.toml"), "{text}");
}

#[test]
fn a_daemon_without_metadata_says_what_to_do_and_status_without_a_daemon_too() {
    let dir = TestDir::new("cli-no-md");
    let files = {
        // A configured pair, then its metadata wiped.
        let f = common::pair::setup(&dir, 16 << 20, "");
        std::fs::remove_file(f.backing("alpha")).unwrap();
        f
    };
    let out = files.cli("alpha", &["daemon"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("create-md"), "{text}");
    let out = files.cli("beta", &["status"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("cannot reach the daemon"), "{text}");
    // create-md refuses to overwrite, and names the way out.
    let out = files.cli("beta", &["create-md"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let (code, text) = pairbd(&[
        "--config",
        &files.config.display().to_string(),
        "--node",
        "gamma",
        "status",
    ]);
    assert_ne!(code, 0);
    assert!(text.contains("alpha, beta"), "{text}");
}

#[test]
fn gen_cert_refuses_to_overwrite_a_key() {
    let dir = TestDir::new("cli-gen-cert");
    let out = dir.join("certs").display().to_string();
    let (code, text) = pairbd(&["gen-cert", "--node", "alpha", "--out", &out]);
    assert_eq!(code, 0, "{text}");
    let key = std::fs::read(dir.join("certs/alpha.key")).unwrap();
    let (code, text) = pairbd(&["gen-cert", "--node", "alpha", "--out", &out]);
    assert_ne!(code, 0);
    assert!(text.contains("--force"), "{text}");
    assert_eq!(std::fs::read(dir.join("certs/alpha.key")).unwrap(), key);
    let (code, text) = pairbd(&["gen-cert", "--out", &out]);
    assert_ne!(code, 0);
    assert!(text.contains("--node"), "{text}");
}
