# syntax=docker/dockerfile:1
# ember-autoscaler (kubernetes backend in the cluster).
# Build from the repository root:  docker build -f docker/autoscaler.Dockerfile -t ember-autoscaler .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Every workspace member is copied; tests/deploy checks this list against Cargo.toml's members.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY protocol protocol
COPY grpc grpc
COPY core core
COPY worker worker
COPY dispatcher dispatcher
COPY autoscaler autoscaler
COPY bench bench
COPY testkit testkit
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ember-autoscaler --bin ember-autoscaler \
    && cp target/release/ember-autoscaler /ember-autoscaler

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ember-autoscaler /usr/local/bin/ember-autoscaler
ENV EMBER_AUTOSCALER_BACKEND=kubernetes \
    EMBER_AUTOSCALER_ADMIN_ADDR=0.0.0.0:9300 \
    EMBER_LOG_FORMAT=json
USER 65532:65532
EXPOSE 9300
ENTRYPOINT ["/usr/local/bin/ember-autoscaler"]
