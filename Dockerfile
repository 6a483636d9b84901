# Container images of mailroute, one build with two targets:
#
#   docker build --target relay    -t <registry>/relay:<version>    .
#   docker build --target operator -t <registry>/operator:<version> .
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

FROM docker.io/library/rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
WORKDIR /src
# The whole workspace: cargo needs every member's manifest; .dockerignore keeps target/, .git
# and the deployment files out of the context.
COPY Cargo.toml Cargo.lock ./
COPY api ./api
COPY tls ./tls
COPY operator ./operator
COPY relay ./relay
COPY testkit ./testkit
COPY tests ./tests
COPY bench ./bench
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p mailroute-relay -p mailroute-operator \
 && install -D -m 0555 target/release/mailroute-relay /out/mailroute-relay \
 && install -D -m 0555 target/release/mailroute-operator /out/mailroute-operator

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
