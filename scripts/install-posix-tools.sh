#!/usr/bin/env bash
# Installs the public POSIX test tools that tests/posix_suites.rs runs against a real
# objfs mount: pjdfstest (POSIX conformance) and fsx (random I/O exerciser that
# verifies data). Both come from crates.io and go to /opt/posix-tools/bin.
# Idempotent: a tool whose binary is already there is not rebuilt. Debian 12, as root.
# Run it, or source it (`. scripts/install-posix-tools.sh`) to also get PJDFSTEST_BIN and
# FSX_BIN exported; scripts/test.sh calls it before `cargo test`.
set -euo pipefail

POSIX_TOOLS_ROOT=${POSIX_TOOLS_ROOT:-/opt/posix-tools}
PJDFSTEST_VERSION=0.2.2
FSX_VERSION=0.3.2

# pjdfstest links against libacl.
if ! dpkg -s libacl1-dev >/dev/null 2>&1; then
    echo "== installing: libacl1-dev"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libacl1-dev >/dev/null
fi

if [ ! -x "$POSIX_TOOLS_ROOT/bin/pjdfstest" ]; then
    echo "== building pjdfstest $PJDFSTEST_VERSION (once per machine)"
    cargo install pjdfstest --version "$PJDFSTEST_VERSION" --locked --root "$POSIX_TOOLS_ROOT"
fi

if [ ! -x "$POSIX_TOOLS_ROOT/bin/fsx" ]; then
    echo "== building fsx $FSX_VERSION (once per machine)"
    cargo install fsx --version "$FSX_VERSION" --locked --root "$POSIX_TOOLS_ROOT"
fi

export PJDFSTEST_BIN="$POSIX_TOOLS_ROOT/bin/pjdfstest"
export FSX_BIN="$POSIX_TOOLS_ROOT/bin/fsx"
