#!/bin/sh
# Copies the part of sysfs that lvmlocal's discovery reads (block devices,
# their device attributes, ATA port numbers) into a tree with the same shape,
# and writes it to stdout as a base64 tar. Run it in the VM test bed:
#   target/debug/vmbed --nvme 5=4G ... -- scripts/capture-sysfs.sh \
#       | base64 -d | tar -x -C csi-agent/tests/fixtures/NAME
set -eu
out=$(mktemp -d)
copy() { [ -r "$1" ] && mkdir -p "$out$(dirname "$1")" && cat "$1" > "$out$1" 2>/dev/null || true; }
mkdir -p "$out/sys/block"
for link in /sys/block/*; do
    dir=$(readlink -f "$link")
    ln -s "..${dir#/sys}" "$out/sys/block/${link##*/}"
    for attr in dev size ro removable nsid queue/rotational; do copy "$dir/$attr"; done
    mkdir -p "$out$dir/holders"
    for holder in "$dir"/holders/*; do [ -e "$holder" ] && : > "$out$dir/holders/${holder##*/}"; done
    for part in "$dir"/*/partition; do
        [ -e "$part" ] || continue
        copy "$part"; copy "${part%/partition}/dev"
    done
    [ -e "$dir/device" ] || continue
    device=$(readlink -f "$dir/device")
    mkdir -p "$out$device"
    ln -s "$(realpath --relative-to="$dir" "$device")" "$out$dir/device"
    for attr in serial model vpd_pg80 sas_address; do copy "$device/$attr"; done
done
for port in /sys/class/ata_port/*; do
    [ -e "$port" ] && copy "$(readlink -f "$port")/port_no"
done
tar -C "$out/sys" -cf - . | base64
