#!/usr/bin/env bash
# Builds the Kubernetes components the cluster tests run (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kubelet, csi-provisioner,
# csi-resizer, csi-snapshotter, snapshot-controller, csi-sanity, helm) from
# their Go modules at the versions in scripts/versions.env, into
# target/components/bin, and copies the snapshot.storage.k8s.io CRDs of the
# same external-snapshotter release into target/components/crds/snapshot.
# A binary already built at its version is kept, and so are the CRDs, so a
# second run builds and copies nothing; Go's module and build caches make a
# build in a fresh clone a link step.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/versions.env

root=$PWD/target/components
bin=$root/bin
mkdir -p "$bin" "$root/src"
export GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0

# current NAME VERSION: true when bin/NAME was built at VERSION.
current() { [ -x "$bin/$1" ] && [ "$(cat "$bin/$1.version" 2>/dev/null)" = "$2" ]; }
stamp() { echo "$2" >"$bin/$1.version"; echo "components: built $1 $2"; }

# module_dir MODULE@VERSION: the module's source in Go's module cache.
module_dir() { go mod download -json "$1" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p'; }

# Kubernetes is not buildable with `go install` (its go.mod points its staging
# modules at directories the module zip lacks): a module of ours requires it
# and pins each staging module to the release's matching v0 version.
kube_bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
need=()
for b in "${kube_bins[@]}"; do current "$b" "$KUBERNETES" || need+=("$b"); done
if [ ${#need[@]} -gt 0 ]; then
    src=$root/src/kubernetes-$KUBERNETES
    mkdir -p "$src"
    staging=v0.${KUBERNETES#v1.}
    mod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES" | sed -n 's/^\t"GoMod": "\(.*\)",$/\1/p')
    {
        echo "module lvmlocal.io/components/kubernetes"
        echo "go 1.26.0"
        echo "require k8s.io/kubernetes $KUBERNETES"
        sed -n 's#^\t\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#replace \1 => \1 '"$staging"'#p' "$mod"
    } >"$src/go.mod"
    major=${KUBERNETES#v}; major=${major%%.*}
    minor=${KUBERNETES#v*.}; minor=${minor%%.*}
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$KUBERNETES -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    for b in "${need[@]}"; do
        (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$bin/$b" "k8s.io/kubernetes/cmd/$b")
        stamp "$b" "$KUBERNETES"
    done
fi

# etcd's own main module replaces its submodules with directories too; a
# two-line main of ours runs the server package of the pinned release.
if ! current etcd "$ETCD"; then
    src=$root/src/etcd-$ETCD
    mkdir -p "$src"
    cat >"$src/go.mod" <<MOD
module lvmlocal.io/components/etcd
go 1.26.0
require go.etcd.io/etcd/server/v3 $ETCD
MOD
    cat >"$src/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$bin/etcd" .)
    stamp etcd "$ETCD"
fi

# The CSI sidecars pin their Kubernetes dependencies with replace directives,
# which `go install mod@version` refuses: build inside the module's own tree.
# A replace into a directory of that tree (external-snapshotter's
# `=> ./client`) names a nested module, which Go leaves out of the module
# zip: the build then reads a copy of go.mod (and go.sum) in src/ that points
# it at the nested module of the same version in the module cache instead.
sidecar() {
    local name=$1 module=$2 version=$3
    current "$name" "$version" && return
    local dir nested modfile=()
    dir=$(module_dir "$module@$version")
    if grep -q '^replace [^ ]* => \./' "$dir/go.mod"; then
        local src=$root/src/$name-$version
        mkdir -p "$src"
        cp "$dir/go.mod" "$src/go.mod"
        cp "$dir/go.sum" "$src/go.sum"
        chmod u+w "$src/go.mod" "$src/go.sum"
        for nested in $(sed -n 's#^replace \([^ ]*\) => \./.*#\1#p' "$dir/go.mod"); do
            local nested_dir
            nested_dir=$(module_dir "$nested@$version") || true
            [ -d "$nested_dir" ] || { echo "components: no $nested@$version" >&2; exit 1; }
            sed -i "s#^replace $nested => \./.*#replace $nested => $nested_dir#" "$src/go.mod"
        done
        modfile=(-modfile "$src/go.mod")
    fi
    (cd "$dir" && GOFLAGS="-mod=readonly -buildvcs=false" go build "${modfile[@]}" -trimpath \
        -ldflags "-s -w -X main.version=$version" -o "$bin/$name" "./cmd/$name")
    stamp "$name" "$version"
}
sidecar csi-provisioner github.com/kubernetes-csi/external-provisioner/v6 "$CSI_PROVISIONER"
sidecar csi-resizer github.com/kubernetes-csi/external-resizer/v2 "$CSI_RESIZER"
sidecar csi-snapshotter github.com/kubernetes-csi/external-snapshotter/v8 "$CSI_SNAPSHOTTER"
sidecar snapshot-controller github.com/kubernetes-csi/external-snapshotter/v8 "$CSI_SNAPSHOTTER"

# The VolumeSnapshotClass, VolumeSnapshotContent and VolumeSnapshot CRDs of
# that release, which live in its nested client module. Copied again only
# when the version changes.
crds=$root/crds/snapshot
if [ "$(cat "$crds.version" 2>/dev/null)" != "$CSI_SNAPSHOTTER" ]; then
    dir=$(module_dir "github.com/kubernetes-csi/external-snapshotter/client/v8@$CSI_SNAPSHOTTER")
    rm -rf "$crds"
    mkdir -p "$crds"
    cp "$dir"/config/crd/snapshot.storage.k8s.io_*.yaml "$crds/"
    chmod u+w "$crds"/*.yaml
    [ "$(ls "$crds"/*.yaml | wc -l)" = 3 ] || { echo "components: expected 3 snapshot CRDs in $dir" >&2; exit 1; }
    echo "$CSI_SNAPSHOTTER" >"$crds.version"
    echo "components: copied the snapshot CRDs $CSI_SNAPSHOTTER"
fi

if ! current csi-sanity "$CSI_SANITY"; then
    GOBIN=$bin go install -trimpath "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@$CSI_SANITY"
    stamp csi-sanity "$CSI_SANITY"
fi

if ! current helm "$HELM"; then
    GOBIN=$bin go install -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM" \
        "helm.sh/helm/v4/cmd/helm@$HELM"
    stamp helm "$HELM"
fi
