# voxaffect server image.
#   GPU (default): docker build -t voxaffect .
#   CPU only:      docker build -t voxaffect:cpu --build-arg BASE=ubuntu:22.04 \
#                    --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# Run: docker run --gpus all -p 5000:5000 -v voxaffect-models:/models -v voxaffect-data:/data voxaffect
ARG BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04
FROM ${BASE}

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && useradd --create-home --uid 10001 voxaffect \
    && mkdir -p /models /data \
    && chown voxaffect:voxaffect /models /data

WORKDIR /app

# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml scripts/install-deps.sh ./
RUN PIP=/opt/venv/bin/pip TORCH="${TORCH}" TORCH_INDEX="${TORCH_INDEX}" ./install-deps.sh gpu

COPY README.md ./
COPY engine/ engine/
COPY server/ server/
COPY client/ client/
COPY bench/ bench/
COPY clients/js/src/ clients/js/src/
COPY static/ static/
RUN pip install --no-cache-dir --no-deps .

USER 10001
ENV VOXAFFECT_HOST=0.0.0.0 \
    VOXAFFECT_PORT=5000 \
    VOXAFFECT_DB=/data/voxaffect.db \
    VOXAFFECT_STATIC_DIR=/app/static \
    MODELSCOPE_CACHE=/models/modelscope \
    HF_HOME=/models/huggingface
VOLUME ["/models", "/data"]
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4)"]
ENTRYPOINT ["voxaffect", "serve"]
