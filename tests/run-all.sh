#!/usr/bin/env bash
# The test command of README.md (and of .ci/run): installs what the tests need, checks
# formatting and lints, then runs every test with cargo-nextest (tests that use FUSE,
# loop devices and mounts serialise themselves through a lock file). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
# The simulator's CI swarm: thousands of seeds through the real core (release build;
# PAIRBD_SIM_CI_SEEDS changes how many). It prints its figures.
cargo test -p pairbd-sim --release --locked -- --ignored --nocapture
