# syntax=docker/dockerfile:1
#
# The `increment` service image.
#
#   docker build -t increment .
#   docker run --rm -p 4000:4000 increment          # embedded SQLite in /var/lib/increment
#   docker compose up -d --scale increment=3        # with PostgreSQL, nginx, Prometheus, Grafana, Tempo
#
# Build stage: the Rust image with the cargo registry and target directory in
# BuildKit cache mounts, so a rebuild after a source change compiles only what
# changed. --locked: Cargo.lock is used exactly as committed.
# The workspace needs Rust 1.94 or newer (rust-version in Cargo.toml).
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin increment \
    && install -D -m 0755 target/release/increment /out/increment

# Runtime stage: Debian slim with CA certificates (TLS to a managed database)
# and curl for the health check. The service runs as an unprivileged user.
FROM ${RUNTIME_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 increment \
    && useradd --system --uid 10001 --gid increment --home-dir /var/lib/increment \
        --no-create-home --shell /usr/sbin/nologin increment \
    && install -d -o increment -g increment -m 0750 /var/lib/increment
COPY --from=build /out/increment /usr/local/bin/increment

# /var/lib/increment is the working directory and a volume. The spill file is
# written there at shutdown if the database did not take the final flush, and
# replayed at the next start, so it has to outlive the container. With
# several replicas each container gets its own anonymous volume, so each has
# its own spill file. Without DATABASE_URL the service uses its default, a
# SQLite file relative to the working directory, which is also this one.
ENV INCREMENT_LISTEN=0.0.0.0:4000 \
    INCREMENT_SPILL_PATH=/var/lib/increment/spill.jsonl
WORKDIR /var/lib/increment
VOLUME ["/var/lib/increment"]
USER increment:increment
EXPOSE 4000

# Liveness: /healthz answers 200 while the process runs. docker-compose.yml
# checks /readyz (database reachable, not shutting down) instead, so that
# nginx starts only after the replicas are ready. The port is the one in
# INCREMENT_LISTEN above; change both together.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", "http://127.0.0.1:4000/healthz"]

# SIGTERM (Docker's default stop signal) starts the graceful shutdown: stop
# accepting, finish in-flight requests, write everything. Give it time with
# `docker stop -t` / compose `stop_grace_period` longer than
# INCREMENT_SHUTDOWN_TIMEOUT (30s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/increment"]
