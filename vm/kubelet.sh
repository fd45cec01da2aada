#!/bin/sh
# Makes a test bed guest a Kubernetes node: containerd (Debian's, with runc)
# holding the test images, and kubelet registering the node NODE_NAME with
# the API server of KUBECONFIG. Each runs in a session of its own; pids and
# logs go to /run/vmbed (the host's control directory).
# Environment: NODE_NAME, KUBECONFIG, KUBELET (the binary), IMAGES (the
# archive scripts/images.sh builds), NODE_LABELS (k=v,...; may be empty).
set -eu
: "${NODE_NAME:?}" "${KUBECONFIG:?}" "${KUBELET:?}" "${IMAGES:?}"
[ -x "$KUBELET" ] || { echo "no kubelet at $KUBELET (scripts/components.sh builds it)"; exit 1; }
[ -s "$IMAGES" ] || { echo "no images at $IMAGES (scripts/images.sh builds them)"; exit 1; }
for bin in containerd containerd-shim-runc-v2 runc ctr; do
    command -v "$bin" >/dev/null || { echo "no $bin (scripts/setup.sh installs containerd and runc)"; exit 1; }
done

# cgroup v2 with every controller delegated to the pods' cgroups.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for controller in $(cat /sys/fs/cgroup/cgroup.controllers); do
    echo "+$controller" > /sys/fs/cgroup/cgroup.subtree_control
done

# The guest's root is an overlay, which cannot hold another overlay's upper
# layer: containerd's and kubelet's state live on filesystems of their own.
for dir in /var/lib/containerd /var/lib/kubelet; do
    mkdir -p "$dir"
    mount -t tmpfs -o mode=0755 state "$dir"
done
mkdir -p /run/node/cni /var/lib/kubelet/plugins_registry /var/log/pods

# Pods use the host's network; containerd still wants one network
# configured before it reports the network ready.
cat > /run/node/cni/10-loopback.conflist <<'EOF'
{"cniVersion": "0.4.0", "name": "lvmlocal-test", "plugins": [{"type": "loopback"}]}
EOF
cat > /run/node/containerd.toml <<'EOF'
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "lvmlocal.test/pause:1"
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/run/node/cni"
EOF
setsid containerd --config /run/node/containerd.toml > /run/vmbed/containerd.log 2>&1 < /dev/null &
echo $! > /run/vmbed/containerd.pid
i=0
until ctr --address /run/containerd/containerd.sock version > /dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -le 600 ] || { echo "containerd did not start"; tail -20 /run/vmbed/containerd.log; exit 1; }
    sleep 0.1
done
ctr --address /run/containerd/containerd.sock -n k8s.io images import "$IMAGES" > /dev/null

cat > /run/node/kubelet.yaml <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
cgroupDriver: cgroupfs
failSwapOn: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
# The tests read kubelet's metrics over plain HTTP from inside the guest;
# nothing outside the VM reaches this port.
readOnlyPort: 10255
# Memory is small and state lives in memory: evict only at the very end.
evictionHard: {memory.available: 20Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
volumeStatsAggPeriod: 10s
EOF
setsid "$KUBELET" --config=/run/node/kubelet.yaml --kubeconfig="$KUBECONFIG" \
    --hostname-override="$NODE_NAME" --node-ip=10.0.2.15 --root-dir=/var/lib/kubelet \
    --node-labels="${NODE_LABELS:-}" --v=2 > /run/vmbed/kubelet.log 2>&1 < /dev/null &
echo $! > /run/vmbed/kubelet.pid
