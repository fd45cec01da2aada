# One image per binary, each with only what it runs; the three share one
# build stage, so the workspace compiles once:
#   docker build --target agent      -t lvmlocal-agent:0.1.0 .
#   docker build --target controller -t lvmlocal-controller:0.1.0 .
#   docker build --target scheduler  -t lvmlocal-scheduler:0.1.0 .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
# protox compiles csi.proto in Rust: no protoc is needed.
RUN cargo build --release --locked \
        -p csi-agent -p csi-controller -p csi-scheduler \
 && install -D -t /out target/release/csi-agent target/release/csi-controller target/release/csi-scheduler

# The controller and the scheduler call no tools: glibc and CA certificates
# are all they need. Their manifests give them a non-root user.
FROM gcr.io/distroless/cc-debian12 AS controller
COPY --from=build /out/csi-controller /usr/local/bin/
ENTRYPOINT ["csi-controller"]

FROM gcr.io/distroless/cc-debian12 AS scheduler
COPY --from=build /out/csi-scheduler /usr/local/bin/
ENTRYPOINT ["csi-scheduler"]

# Last, so a build without --target makes the node plugin. What the agent
# runs: lvm2 (pvcreate, vgcreate, lvcreate, lvs, ...), util-linux (blkid,
# wipefs, blkdiscard), mount (mount, umount), e2fsprogs (mkfs.ext4,
# resize2fs), xfsprogs (mkfs.xfs, xfs_growfs) and thin-provisioning-tools
# (thin_check, which LVM runs on thin pools). It must run as root (privileged).
FROM debian:bookworm-slim AS agent
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        lvm2 util-linux mount e2fsprogs xfsprogs thin-provisioning-tools \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/csi-agent /usr/local/bin/
ENTRYPOINT ["csi-agent"]
