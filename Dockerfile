# syntax=docker/dockerfile:1
#
# The `increment` service image.
#
#   docker build -t increment .
#   docker run --rm -p 4000:4000 increment          # embedded SQLite in /var/lib/increment
#   docker compose up -d --scale increment=3        # with PostgreSQL, nginx, Prometheus, Grafana, Tempo
#   kubectl apply -k deploy/kubernetes              # see deploy/kubernetes/README.md
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
    && install -d -o increment -g increment -m 0750 /var/lib/increment /var/lib/increment/spill
COPY --from=build /out/increment /usr/local/bin/increment

# /var/lib/increment is the working directory and a volume. Without
# DATABASE_URL the service uses its default, a SQLite file relative to the
# working directory.
# /var/lib/increment/spill is the spill dir: at shutdown, if the database did
# not take the final flush, the instance writes its own file there, and at
# start an instance replays every file it finds (each once). It has to
# outlive the container and may be shared: docker-compose.yml mounts one
# named volume there for every replica, Kubernetes an emptyDir or a volume
# claim. The directory belongs to the service's user, and Docker copies that
# owner into a new named volume mounted on it, so the user can write there.
# INCREMENT_STOP_GRACE_PERIOD is the time between SIGTERM and SIGKILL the
# platform allows, the service's shutdown timeout being 5 s less. 10s is
# `docker stop`'s default; compose and Kubernetes set their own.
ENV INCREMENT_LISTEN=0.0.0.0:4000 \
    INCREMENT_SPILL_DIR=/var/lib/increment/spill \
    INCREMENT_STOP_GRACE_PERIOD=10s
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
# accepting, finish in-flight requests, write everything. To give it longer,
# raise both together: `docker run --stop-timeout 60 -e
# INCREMENT_STOP_GRACE_PERIOD=60s` (compose: stop_grace_period, which
# docker-compose.yml ties to the same variable).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/increment"]
