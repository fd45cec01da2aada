# One image with the three lvmlocal binaries; the manifests in deploy/ pick
# one with `command:`.
#   docker build -t lvmlocal:0.1.0 .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# protox compiles csi.proto in Rust: no protoc is needed.
RUN cargo build --release --locked \
        -p csi-agent -p csi-controller -p csi-scheduler \
 && install -D -t /out target/release/csi-agent target/release/csi-controller target/release/csi-scheduler

FROM debian:bookworm-slim
# What the agent runs: lvm2 (pvcreate, vgcreate, lvcreate, lvs, ...),
# util-linux (blkid), mount (mount, umount), e2fsprogs (mkfs.ext4,
# resize2fs) and xfsprogs (mkfs.xfs, xfs_growfs).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        lvm2 util-linux mount e2fsprogs xfsprogs \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The agent must run as root (privileged); the controller and the scheduler
# are given a non-root user by their manifests.
CMD ["csi-agent", "--help"]
