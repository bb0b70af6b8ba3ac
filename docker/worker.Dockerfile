# syntax=docker/dockerfile:1
# ember-worker, CPU: the model baked in, libonnxruntime.so from the onnxruntime==1.31.1 wheel.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t ember-worker .
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
    cargo build --release --locked -p ember-worker \
    && cp target/release/ember-worker /ember-worker

# The worker loads ONNX Runtime at run time (ort's load-dynamic); take the library from the
# same wheel the tests use, without its Python dependencies.
FROM python:3.12-slim-bookworm AS ort
RUN pip install --no-cache-dir --no-deps --target /ort onnxruntime==1.31.1 \
    && mkdir /ortlib && cp /ort/onnxruntime/capi/libonnxruntime.so.1.31.1 /ortlib/

# distroless cc has the libstdc++ ONNX Runtime needs; runs as uid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ember-worker /usr/local/bin/ember-worker
COPY --from=ort /ortlib/ /opt/onnxruntime/lib/
COPY models/ssdlite-person /opt/ember/models/ssdlite-person
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.1.31.1 \
    EMBER_WORKER_MODEL_DIR=/opt/ember/models/ssdlite-person \
    EMBER_WORKER_ADMIN_ADDR=0.0.0.0:9100 \
    EMBER_WORKER_DEVICE=cpu \
    EMBER_LOG_FORMAT=json
USER 65532:65532
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/ember-worker"]
