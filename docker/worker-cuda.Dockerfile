# syntax=docker/dockerfile:1
# ember-worker, CUDA: CUDA 13 + cuDNN runtime base, ONNX Runtime's CUDA provider from the
# onnxruntime-gpu==1.31.1 wheel. The NVIDIA container runtime injects the driver and NVML.
# Build from the repository root:
#   docker build -f docker/worker-cuda.Dockerfile -t ember-worker-cuda .
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

# libonnxruntime.so plus its provider libraries (providers_shared, providers_cuda), which
# ONNX Runtime looks for beside itself.
FROM python:3.12-slim-bookworm AS ort
RUN pip install --no-cache-dir --no-deps --target /ort onnxruntime-gpu==1.31.1 \
    && mkdir /ortlib && cp -a /ort/onnxruntime/capi/libonnxruntime*.so* /ortlib/

FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04
COPY --from=build /ember-worker /usr/local/bin/ember-worker
COPY --from=ort /ortlib/ /opt/onnxruntime/lib/
COPY models/ssdlite-person /opt/ember/models/ssdlite-person
# HOME on /tmp: CUDA's compute cache is the only thing written, and the root filesystem is
# read-only in the cluster (an emptyDir is mounted on /tmp).
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.1.31.1 \
    EMBER_WORKER_MODEL_DIR=/opt/ember/models/ssdlite-person \
    EMBER_WORKER_ADMIN_ADDR=0.0.0.0:9100 \
    EMBER_WORKER_DEVICE=cuda \
    EMBER_LOG_FORMAT=json \
    HOME=/tmp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 65532:65532
EXPOSE 9100
ENTRYPOINT ["/usr/local/bin/ember-worker"]
