#!/usr/bin/env bash
# Installs everything lvmlocal's build, tests and demo need on a Debian
# machine: the packages, the VM test bed's boot files, the Kubernetes
# components and the test images. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/packages.sh
vm/image.sh
scripts/components.sh
scripts/images.sh
