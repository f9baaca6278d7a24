# duplex container image.
#
#   docker build -t duplex .
#   docker run --rm -v "$PWD/duplex.toml:/etc/duplex/duplex.toml:ro" \
#     -e DUPLEX_NODES_LEGACY_PASSWORD=... -p 9187:9187 duplex
#
# The config at /etc/duplex/duplex.toml is config/duplex.example.toml with
# metrics.listen on 0.0.0.0:9187; mount your own over it. Node passwords come from
# DUPLEX_NODES_<NAME>_PASSWORD. The process runs as uid/gid 10001 and writes no files,
# so a read-only root filesystem works.

# ---- build ------------------------------------------------------------------
# 1.89: the oldest Rust that builds Cargo.lock as locked (uuid 1.29 needs 1.89, sha2
# 0.11 1.88), above Cargo.toml's rust-version. Bookworm, as the runtime below: the
# binary links the builder's OpenSSL 3.0 and glibc.
ARG RUST_VERSION=1.89
FROM rust:${RUST_VERSION}-bookworm AS builder

# rdkafka builds its bundled librdkafka with TLS: OpenSSL and zlib headers, found
# through pkg-config (the rust image has the compiler, make and perl).
# DL3008 (pin apt package versions) is ignored here and below on purpose: Debian's
# archive keeps only the current bookworm version of a package, so a pinned version
# stops building at its next security update. The base image tags pin the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or
# Cargo.lock change. The stubs stand in for every target Cargo.toml declares.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches tests/it \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs tests/it/main.rs \
 && echo 'fn main() {}' > benches/codec.rs \
 && cargo build --release --locked \
 && rm -rf src

COPY src ./src
COPY config ./config
# touch: the copied sources may be older than the stub build, and Cargo compares
# modification times.
RUN touch src/lib.rs src/main.rs \
 && cargo build --release --locked \
 && objcopy --compress-debug-sections=zlib target/release/duplex /build/duplex \
 && sed 's/^listen = "127.0.0.1:9187"/listen = "0.0.0.0:9187"/' config/duplex.example.toml > /build/duplex.toml \
 && grep -q '^listen = "0.0.0.0:9187"' /build/duplex.toml
# The release profile keeps line tables (debug = 1) for backtraces and profiles;
# compressing them shrinks the binary from about 79 MB to 32 MB.

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="duplex" \
      org.opencontainers.image.description="Keeps two PostgreSQL databases in sync in both directions through Kafka" \
      org.opencontainers.image.licenses="Apache-2.0"

# Runtime libraries of the binary (libssl3 for TLS to the broker and the nodes), CA
# certificates for the broker's TLS, and the user it runs as. DL3008: see above.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 duplex \
 && useradd --system --uid 10001 --gid duplex --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin duplex

COPY --from=builder /build/duplex /usr/local/bin/duplex
COPY --from=builder /build/duplex.toml /etc/duplex/duplex.toml

# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 9187
# duplex handles SIGTERM itself (a clean stop within 60 s), also as PID 1.
STOPSIGNAL SIGTERM
ENTRYPOINT ["duplex"]
CMD ["run", "--config", "/etc/duplex/duplex.toml"]
