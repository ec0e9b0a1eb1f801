# syntax=docker/dockerfile:1
# A first working image; the operations issue hardens it (healthcheck
# subcommand, tuned defaults).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin spillway \
 && cp target/release/spillway /spillway

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/spillway --create-home spillway
COPY --from=build /spillway /usr/local/bin/spillway
USER spillway
WORKDIR /var/lib/spillway
ENV SPILLWAY_LISTEN=0.0.0.0:8080 \
    SPILLWAY_DATA_DIR=/var/lib/spillway/data
VOLUME ["/var/lib/spillway/data"]
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/spillway"]
