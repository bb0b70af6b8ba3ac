# syntax=docker/dockerfile:1
# ember-dispatcher: HTTP API, result store writer, signed callbacks.
# Build from the repository root:  docker build -f docker/dispatcher.Dockerfile -t ember-dispatcher .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Every workspace member is copied (cargo needs them all to resolve the workspace);
# tests/deploy checks this list against Cargo.toml's members.
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
    cargo build --release --locked -p ember-dispatcher \
    && cp target/release/ember-dispatcher /ember-dispatcher

# distroless cc: glibc, libgcc, CA certificates, nothing else; runs as uid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ember-dispatcher /usr/local/bin/ember-dispatcher
# The dispatcher reads only model.toml (names, tensors, labels), not the model itself.
COPY models/ssdlite-person/model.toml /opt/ember/models/ssdlite-person/model.toml
ENV EMBER_DISPATCHER_LISTEN=0.0.0.0:8080 \
    EMBER_DISPATCHER_GRPC_LISTEN=0.0.0.0:8081 \
    EMBER_DISPATCHER_ADMIN_ADDR=0.0.0.0:9200 \
    EMBER_DISPATCHER_MODEL_DIRS=/opt/ember/models/ssdlite-person \
    EMBER_LOG_FORMAT=json
USER 65532:65532
EXPOSE 8080 8081 9200
ENTRYPOINT ["/usr/local/bin/ember-dispatcher"]
