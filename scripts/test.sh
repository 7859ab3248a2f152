#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine, as root: installs what the tests
# need (fuse3, attr, ...) and runs unit, fs-core and real-mount tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: run as root (the tests mount FUSE filesystems)" >&2
    exit 1
fi

need=()
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v getfattr >/dev/null 2>&1 || need+=(attr)
command -v setfacl >/dev/null 2>&1 || need+=(acl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v git >/dev/null 2>&1 || need+=(git)
if [ ${#need[@]} -gt 0 ]; then
    echo "== installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# A real S3-compatible server for the S3 backend's tests: Garage, built from crates.io
# once per machine (~7 minutes on 2 cores) and kept in /opt/garage.
GARAGE_BIN=${GARAGE_BIN:-/opt/garage/bin/garage}
if [ ! -x "$GARAGE_BIN" ]; then
    echo "== building garage (once per machine)"
    cargo install garage --version 2.5.0 --locked --root /opt/garage
    GARAGE_BIN=/opt/garage/bin/garage
fi
export GARAGE_BIN

# pjdfstest and fsx for tests/posix_suites.rs (built once per machine).
. scripts/install-posix-tools.sh

# FUSE over io_uring (kernel 6.14+) is off until the fuse module's switch is on: turn
# it on, so the mounts given --io-uring (tests/transport.rs, pjdfstest and fsx in
# tests/posix_suites.rs) run through objfs's io_uring transport.
[ -e /sys/module/fuse ] || modprobe fuse 2>/dev/null || true
if [ -w /sys/module/fuse/parameters/enable_uring ]; then
    echo Y > /sys/module/fuse/parameters/enable_uring
fi

cleanup_mounts() {
    # Teardown bugs must not leave mounts behind on the machine.
    awk '$3 ~ /^fuse/ && $2 ~ /^\/tmp\/\.tmp/ {print $2}' /proc/mounts | while read -r m; do
        echo "!! leftover mount $m" >&2
        umount -l "$m" || true
    done
}
trap cleanup_mounts EXIT

echo "== cargo test"
timeout -k 30 2400 cargo test --locked --all-targets -- --test-threads=4
