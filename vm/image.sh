#!/usr/bin/env bash
# Builds the VM test bed's boot files: Debian's stock kernel (unpacked, never
# installed) and a busybox initramfs that loads the modules lvmlocal needs.
# Usage: vm/image.sh [OUT_DIR]   (default: target/vm)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-${LVMLOCAL_VM_DIR:-$here/../target/vm}}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Resolve the newest Debian kernel flavour the archive offers today.
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$pkg" ] || { echo "image.sh: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 1; }
kver=${pkg#linux-image-}

# Rebuild when the kernel, this script or the init changed.
stamp="$kver $(cat "$here/image.sh" "$here/init" | sha256sum | cut -c1-16)"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initramfs.cpio.gz" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "image.sh: $kver already built in $out"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Package lists older than the archive name a kernel that is gone: refresh once.
if ! (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1); then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    kver=${pkg#linux-image-}
    stamp="$kver $(cat "$here/image.sh" "$here/init" | sha256sum | cut -c1-16)"
    (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "image.sh: apt-get download $pkg failed" >&2; exit 1; }
fi
dpkg-deb -x "$work"/"$pkg"_*.deb "$work/kernel"
depmod -b "$work/kernel" "$kver"

# Storage, filesystems (fuse stands in for a hung one), the virtio-9p
# transport that carries the host root, and the network card of tests that
# reach the host's forwarded ports.
modules="virtio_pci virtio_net 9p 9pnet_virtio overlay nvme ahci sd_mod dm_mod dm_snapshot dm_thin_pool loop ext4 xfs fuse crc32c_generic"
root="$work/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,host,ctl,newroot,lib/modules}
: > "$root/lib/modules/load-order"
for m in $modules; do
    modprobe -d "$work/kernel" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    name=$(basename "$ko")
    cp "$ko" "$root/lib/modules/$name"
    echo "$name" >> "$root/lib/modules/load-order"
done

cp /bin/busybox "$root/bin/busybox"
for applet in sh mount umount mkdir cat echo insmod ip poweroff sync chroot sleep; do
    ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$here/init" "$root/init"

(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.cpio.gz"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "image.sh: built $kver in $out ($(wc -l < "$root/lib/modules/load-order") modules)"
