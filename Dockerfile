# syntax=docker/dockerfile:1
# spillway in a container: one binary on Debian slim, run as an
# unprivileged user, with its data on a volume and a health check that needs
# no curl (`spillway healthcheck`).
#
# Build: docker build -t spillway .
# Run:   docker run -p 8080:8080 -v spillway-data:/var/lib/spillway/data \
#          -e SPILLWAY_PUBLISH_TOKEN=... --stop-timeout 20 spillway
#
# Stopping: on SIGTERM readers are told to reconnect over --drain-window
# (default 10 s) and the drain is then bounded by 5 s more, so give the
# container at least 20 s to stop (`--stop-timeout`, compose
# `stop_grace_period`, Kubernetes `terminationGracePeriodSeconds`), or shorten
# SPILLWAY_DRAIN_WINDOW; Docker's default of 10 s would cut the drain short.

FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, against stub sources, so that this slow layer is reused
# until Cargo.toml or Cargo.lock change. The load generator's manifest is
# needed because it is a workspace member; its sources never are.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked --bin spillway

# The real sources, and what they compile in: migrations (sqlx::migrate!),
# templates (askama) and the browser scripts and styles (include_str!).
COPY src src
COPY migrations migrations
COPY templates templates
COPY static static
# COPY keeps the files' own modification times, which can be older than the
# stub build; touching the crate roots makes cargo rebuild our crate.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin spillway \
 && cp target/release/spillway /usr/local/bin/spillway

FROM debian:bookworm-slim
# ca-certificates for when TLS to Redis or PostgreSQL is built in (not yet:
# rediss:// is refused at start). Versions are not
# pinned: the Debian security archive replaces them, and a pin would break the
# build on the next point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/spillway --create-home spillway \
 && mkdir -p /var/lib/spillway/data \
 && chown -R spillway:spillway /var/lib/spillway
COPY --from=build /usr/local/bin/spillway /usr/local/bin/spillway

USER 10001:10001
WORKDIR /var/lib/spillway
# Set the listen address through SPILLWAY_LISTEN (not --listen) so that the
# health check, which reads the same variable, probes the same port.
ENV SPILLWAY_LISTEN=0.0.0.0:8080 \
    SPILLWAY_DATA_DIR=/var/lib/spillway/data
# Declared after the directory is created and owned by the user, so a new
# named volume starts with that ownership.
VOLUME ["/var/lib/spillway/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/spillway", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/spillway"]
