#!/usr/bin/env bash
# Builds the container images the pods of the cluster tests run, since no
# registry is reachable: a shell image and a pod sandbox ("pause") image,
# both a single layer holding Debian's static busybox, written as one
# docker-archive that the node's containerd imports.
# Usage: scripts/images.sh [OUT_DIR]   (default: target/images)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../target/images}
mkdir -p "$out"
out=$(cd "$out" && pwd)
archive=$out/test-images.tar

# busybox-static provides it: the image has no libraries.
busybox=/bin/busybox
stamp="$(sha256sum "$busybox" "$here/images.sh" | sha256sum | cut -c1-16)"
if [ -s "$archive" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
    echo "images.sh: already built in $out"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,etc,tmp,data}
cp "$busybox" "$root/bin/busybox"
for applet in sh cat cp dd df echo head id ls mkdir mv rm sha256sum sleep stat sync tail test touch true wc; do
    ln -s busybox "$root/bin/$applet"
done
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"
echo "root:x:0:" >"$root/etc/group"
chmod 1777 "$root/tmp"
# Same bytes for the same busybox: sorted, no owners, no times.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$work/layer.tar" .
layer=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
mkdir -p "$work/archive/$layer"
mv "$work/layer.tar" "$work/archive/$layer/layer.tar"

# config NAME ENTRYPOINT_JSON: writes the image config, prints its file name.
config() {
    local json
    json=$(printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Entrypoint":%s,"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' "$2" "$layer")
    local digest
    digest=$(printf '%s' "$json" | sha256sum | cut -d' ' -f1)
    printf '%s' "$json" >"$work/archive/$digest.json"
    echo "$digest.json"
}
shell=$(config shell '["/bin/sh"]')
# The sandbox holds the pod's namespaces until it is told to stop.
pause=$(config pause '["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]')
printf '[{"Config":"%s","RepoTags":["lvmlocal.test/shell:1"],"Layers":["%s/layer.tar"]},{"Config":"%s","RepoTags":["lvmlocal.test/pause:1"],"Layers":["%s/layer.tar"]}]' \
    "$shell" "$layer" "$pause" "$layer" >"$work/archive/manifest.json"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/archive" -cf "$archive.new" .
mv "$archive.new" "$archive"
echo "$stamp" >"$out/stamp"
echo "images.sh: built lvmlocal.test/shell:1 and lvmlocal.test/pause:1 in $archive"
