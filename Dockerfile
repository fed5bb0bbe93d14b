# syntax=docker/dockerfile:1
# opserve's image: one per framework extra, CPU or CUDA.
#
#   docker build --build-arg EXTRA=onnxruntime -t opserve:onnxruntime-cpu .
#   docker build --build-arg EXTRA=pytorch --build-arg VARIANT=cuda \
#       --build-arg TORCH_INDEX_URL=<PyTorch's wheel index for your CUDA version> \
#       -t opserve:pytorch-cuda .
#   docker run --rm -p 8000-8002:8000-8002 -v "$PWD/examples/model_repository:/models:ro" \
#       opserve:onnxruntime-cpu --model-repository=/models
#
# EXTRA: onnxruntime, pytorch, tensorflow or all (opserve's extras). VARIANT: cpu (a Python slim
# image) or cuda (CUDA_IMAGE, an nvidia/cuda runtime image, with its distribution's python3).
# TORCH_INDEX_URL: where pip takes torch from (a CPU-only or CUDA build) instead of the default
# index. The entrypoint is `opserve serve`: arguments are its flags (tritonserver's names).
# Stopping: SIGTERM ends the server gracefully within --exit-timeout-secs (default 30 s); give
# `docker stop --time` (or a pod's terminationGracePeriodSeconds) more than that.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

# --- the two bases: an interpreter with venv support at /usr/local/bin/python ---------------
FROM ${PYTHON_IMAGE} AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /usr/bin/python3 /usr/local/bin/python

# --- build: opserve and its framework in a virtual environment -------------------------------
FROM base-${VARIANT} AS build
ARG EXTRA=onnxruntime
ARG TORCH_INDEX_URL=""
RUN case "${EXTRA}" in onnxruntime|pytorch|tensorflow|all) ;; \
        *) echo "EXTRA must be onnxruntime, pytorch, tensorflow or all, not '${EXTRA}'" >&2; exit 1;; \
    esac
RUN python -m venv /opt/opserve
ENV PATH=/opt/opserve/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if [ -n "${TORCH_INDEX_URL}" ] && { [ "${EXTRA}" = pytorch ] || [ "${EXTRA}" = all ]; }; then \
        pip install --index-url "${TORCH_INDEX_URL}" torch; \
    fi
COPY pyproject.toml README.md /src/
COPY opserve /src/opserve
# remote: model repositories in object storage (s3://, gs://, as://) work in every image
RUN pip install "/src[${EXTRA},remote]" && rm -rf /src

# --- the image: the environment, a non-root user, health checks ------------------------------
FROM base-${VARIANT} AS runtime
RUN groupadd --gid 1000 opserve \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/opserve --shell /usr/sbin/nologin opserve \
    && mkdir -p /models && chown opserve:opserve /models
COPY --from=build /opt/opserve /opt/opserve
ENV PATH=/opt/opserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OPSERVE_HEALTH_URL=http://127.0.0.1:8000/v2/health/live
USER 1000:1000
WORKDIR /home/opserve
EXPOSE 8000 8001 8002
# liveness; readiness (every model READY) is GET /v2/health/ready, which orchestrators probe
# themselves (deploy/kubernetes/deployment.yaml). OPSERVE_HEALTH_URL follows another --http-port.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['OPSERVE_HEALTH_URL'], timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["opserve", "serve"]
CMD ["--model-repository=/models"]
