#!/usr/bin/env bash
# The whole test suite: installs what it needs, starts libvirt, runs every test.
# Unit tests, property tests, NBD tests against real qemu-nbd, and end-to-end tests that boot real
# QEMU guests through libvirt. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/start-services.sh
command -v cargo >/dev/null || { echo "test.sh: cargo not found: install the Rust toolchain (rustup) first" >&2; exit 1; }
export RUST_BACKTRACE=1
# Release-mode dependencies keep hashing/compression fast in tests (see [profile.dev.package."*"]).
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
