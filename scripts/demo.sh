#!/usr/bin/env bash
# The whole system on one machine: a control plane on 127.0.0.1 with
# lvmlocal installed from deploy/, and a node in the VM test bed (kubelet,
# containerd, the agent, emulated NVMe, SSD and HDD disks); then a
# StatefulSet on NVMe whose data outlives its pod, an online expansion and a
# deletion, each step with the commands a user would type and its time.
# Everything it starts stops at the end.
#
# --standalone: the agent alone in the VM instead, walking an ext4 volume on
# NVMe and an xfs volume on HDD through their whole life over its CSI socket.
set -euo pipefail
cd "$(dirname "$0")/.."

demo=cluster-demo
case "${1:-}" in
    --standalone) demo=lvmlocal-demo ;;
    "") ;;
    *) echo "usage: scripts/demo.sh [--standalone]" >&2; exit 2 ;;
esac
scripts/setup.sh
cargo build -q -p csi-agent -p csi-controller -p csi-scheduler -p lvmlocal-tests
exec "target/debug/$demo"
