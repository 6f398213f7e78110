# The GPU worker image: `worker` built with the libtorch backend (burn-tch) against PyTorch
# 2.9.0's libtorch, whose pip wheels carry the CUDA 12.8 runtime. The coordinator stays on the
# CPU image (deploy/Dockerfile); only workers need a GPU.
#
#   docker build -f deploy/gpu.Dockerfile -t dtrain-gpu:latest .          (repository root)
#   docker run --gpus all dtrain-gpu:latest --coordinator http://HOST:50051 --device cuda:0
#
# Needs an NVIDIA driver >= 570 (CUDA 12.8) and the NVIDIA Container Toolkit on the host.
# Not built by CI (no GPU and no registry there); the same build runs on CPU with --device cpu.
ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS torch
# torch 2.9.0 with its nvidia-* CUDA libraries (several GB); libtorch is torch/lib inside it.
RUN pip install --no-cache-dir --target /opt/torch torch==2.9.0

FROM ${RUST_IMAGE} AS build
COPY --from=torch /opt/torch /opt/torch
ENV LIBTORCH=/opt/torch/torch LD_LIBRARY_PATH=/opt/torch/torch/lib
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p worker --features tch \
    && cp target/release/worker /usr/local/bin/worker

FROM ${PYTHON_IMAGE} AS runtime
COPY --from=torch /opt/torch /opt/torch
COPY --from=build /usr/local/bin/worker /usr/local/bin/worker
ENV LD_LIBRARY_PATH=/opt/torch/torch/lib \
    WORKER_BACKEND=tch \
    WORKER_DEVICE=cuda:0 \
    CUBLAS_WORKSPACE_CONFIG=:4096:8
USER 10001:10001
ENTRYPOINT ["worker"]
