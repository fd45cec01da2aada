#!/usr/bin/env bash
# Boots the VM test bed with two NVMe disks, one SATA SSD and one SATA HDD,
# starts the agent standalone inside, and walks an ext4 volume on NVMe and an
# xfs volume on HDD through their whole life over the agent's CSI socket:
# create, stage, publish, write and read back, grow online, stats, unpublish,
# unstage, delete, each step with its time.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build -q -p csi-agent -p lvmlocal-tests
exec target/debug/lvmlocal-demo
