#!/usr/bin/env bash
# The agent's figures: inventory + plan over a 64-disk sysfs tree (beside the
# floor of reading the same files), and its resident memory when idle in the
# VM test bed after building the volume groups of 2 NVMe, 1 SSD and 1 HDD disk.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh >/dev/null
cargo bench -q -p csi-agent --bench inventory
cargo build -q --release -p csi-agent
cargo build -q -p lvmlocal-tests --bin vmbed
target/debug/vmbed --nvme 5=8G --nvme 6=8G --ssd 0=4G --hdd 1=16G -- sh -c '
    target/release/csi-agent --node-name vm --standalone --claim-disks --csi-endpoint unix:///run/lvmlocal.sock --metrics-address 127.0.0.1:9808 2>/dev/null &
    agent=$!
    for _ in $(seq 60); do
        [ "$(vgs --noheadings -o vg_name 2>/dev/null | wc -l)" -ge 3 ] && break
        sleep 1
    done
    sleep 10
    echo "volume groups built: $(vgs --noheadings -o vg_name | tr -s " \n" " ")"
    grep -E "^(VmRSS|VmHWM)" /proc/$agent/status | sed "s/^/agent idle, standalone: /"
    kill $agent'
