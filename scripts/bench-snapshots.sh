#!/usr/bin/env bash
# Snapshot figures in the VM test bed, each beside the bare LVM command it
# stands on, measured in the same run (release builds): snapshot creation
# of a 1 GiB and a 100 GiB thin volume, and sequential writes into a thin
# volume with a live snapshot against a thick one.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo build -q --release -p csi-agent -p lvmlocal-tests
exec target/release/snapshot-bench
