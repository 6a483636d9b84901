# Container images of mailroute, one build with two targets, for linux/amd64 and linux/arm64:
#
#   docker buildx build --platform linux/amd64,linux/arm64 --target relay    -t <registry>/mailroute-relay:<tag>    --push .
#   docker buildx build --platform linux/amd64,linux/arm64 --target operator -t <registry>/mailroute-operator:<tag> --push .
#
# (.github/workflows/release.yml does this on a version tag, then signs the images.) The build
# stage runs on the builder's own platform and cross-compiles for the other one with Debian's
# cross gcc (as scripts/cross-arm64.sh does outside Docker): no Rust compilation under emulation.
#
# The runtime images hold one Rust binary (linked only against glibc) on distroless `cc`
# (glibc, libgcc, CA certificates, tzdata, no shell, no package manager), run as UID/GID 65532, write
# nothing to the root filesystem (the chart mounts it read-only) and need no capabilities: the
# relay listens on 2525/2587/2465 and the Service maps 25/587/465 to them.
#
# Base images are pinned by digest, so a rebuild uses exactly the reviewed bytes:
#   rust:1.95.0-bookworm            (Debian 12, matches the glibc of distroless debian12)
#   gcr.io/distroless/cc-debian12:nonroot
# Where the digests came from: these machines cannot pull images, so they were taken from
# public Dockerfiles and build logs that pin the same tags (the rust digest is the one a BuildKit
# log resolved `rust:1.95-bookworm` to); they were not re-resolved here. Before the first
# release, and to pick up security fixes, refresh and verify them on a machine with registry
# access:
#   docker buildx imagetools inspect docker.io/library/rust:1.95.0-bookworm --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot --format '{{json .Manifest.Digest}}'
# (or `crane digest <image>`), then replace the sha256 values below. scripts/check-packaging.sh
# fails if any FROM line lacks a digest. BuildKit is required (cache mounts).

FROM --platform=$BUILDPLATFORM docker.io/library/rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
ARG BUILDARCH
ARG TARGETARCH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The Rust target and, when it differs from the builder's, Debian's cross gcc and glibc for it
# (bookworm's glibc 2.36, as in the distroless debian12 runtime). The cross packages are not
# version-pinned: bookworm point releases remove the old versions; the base image is pinned.
# hadolint ignore=DL3008
RUN case "$TARGETARCH" in \
      amd64) echo x86_64-unknown-linux-gnu x86_64-linux-gnu gcc-x86-64-linux-gnu > /rust-target ;; \
      arm64) echo aarch64-unknown-linux-gnu aarch64-linux-gnu gcc-aarch64-linux-gnu > /rust-target ;; \
      *) echo "unsupported platform linux/$TARGETARCH (linux/amd64 and linux/arm64 are built)" >&2; exit 1 ;; \
    esac \
 && read -r triple _ gcc < /rust-target \
 && rustup target add "$triple" \
 && if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends "$gcc" "libc6-dev-$TARGETARCH-cross" \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
# The whole workspace: cargo needs every member's manifest; .dockerignore keeps target/, .git
# and the deployment files out of the context.
COPY Cargo.toml Cargo.lock ./
COPY api ./api
COPY tls ./tls
COPY oauth ./oauth
COPY smtp ./smtp
COPY redisconn ./redisconn
COPY operator ./operator
COPY relay ./relay
COPY cli ./cli
COPY testkit ./testkit
COPY tests ./tests
COPY bench ./bench
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=mailroute-target-$TARGETARCH \
    read -r triple gnu _ < /rust-target \
 && env_triple="$(tr 'a-z-' 'A-Z_' <<<"$triple")" \
 && if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
      export "CARGO_TARGET_${env_triple}_LINKER=$gnu-gcc" "CC_${triple//-/_}=$gnu-gcc" "AR_${triple//-/_}=$gnu-ar"; \
    fi \
 && cargo build --release --locked --target "$triple" -p mailroute-relay -p mailroute-operator \
 && install -D -m 0555 "target/$triple/release/mailroute-relay" /out/mailroute-relay \
 && install -D -m 0555 "target/$triple/release/mailroute-operator" /out/mailroute-operator

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f AS runtime
LABEL org.opencontainers.image.vendor="mailroute" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532

FROM runtime AS operator
LABEL org.opencontainers.image.title="mailroute-operator" \
      org.opencontainers.image.description="Compiles SmtpRoute and SenderQuota resources into mailroute relay configuration"
COPY --from=build /out/mailroute-operator /usr/local/bin/mailroute-operator
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/mailroute-operator"]
CMD ["run"]

# Last stage: the default target.
FROM runtime AS relay
LABEL org.opencontainers.image.title="mailroute-relay" \
      org.opencontainers.image.description="mailroute SMTP relay: durable Redis queue, routed delivery, delivery log, metrics"
COPY --from=build /out/mailroute-relay /usr/local/bin/mailroute-relay
EXPOSE 2525 2587 2465 8080
ENTRYPOINT ["/usr/local/bin/mailroute-relay"]
# Container defaults (the chart passes its own flags): listen on all interfaces, in-memory queue.
CMD ["run", "--smtp-listen=0.0.0.0:2525", "--admin-listen=0.0.0.0:8080"]
