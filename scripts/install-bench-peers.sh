#!/usr/bin/env bash
# Install the peer backup tools the benchmark harness (examples/bench) compares Lifeboat with:
# restic, borgbackup and virtnbdbackup, from Debian's archive. `lifeboat-bench --peers` installs
# nothing itself; it measures whichever of these are on PATH.
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "run as root (apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends restic borgbackup virtnbdbackup
restic version
borg --version
virtnbdbackup --version || true
