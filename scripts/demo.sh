#!/usr/bin/env bash
# Boots the VM test bed with two NVMe disks, one SATA SSD and one SATA HDD,
# and shows what lvmlocal's agent sees in it: every disk by slot, kernel name,
# media class and size, and the volume groups it would build.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build -q -p csi-agent -p lvmlocal-tests
exec target/debug/vmbed \
    --nvme 5=8G:nvme-a --nvme 6=8G:nvme-b --ssd 0=4G:ssd-a --hdd 1=16G:hdd-a \
    -- target/debug/csi-agent discover
