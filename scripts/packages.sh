#!/usr/bin/env bash
# Installs the Debian packages and Rust components lvmlocal's build, tests
# and demo need. Safe to run again: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# qemu runs the test bed; lvm2, thin-provisioning-tools (thin_check for thin
# pools), e2fsprogs, xfsprogs and util-linux are the host tools the guest borrows (fdisk makes partition tables in tests); busybox-static, cpio and kmod build its initramfs;
# socat carries the guest's connections to the host's API server; openssl makes the test cluster's certificates;
# containerd, runc and the CNI plugins are the container runtime of the kubelet that runs in the guest.
packages=(qemu-system-x86 lvm2 thin-provisioning-tools e2fsprogs xfsprogs util-linux fdisk mount busybox-static cpio kmod socat openssl
    containerd runc containernetworking-plugins)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]:-nothing, refreshing package lists}"
    apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for component in clippy rustfmt; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
