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
