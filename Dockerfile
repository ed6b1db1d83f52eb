# fluxbot on an NVIDIA GPU. Needs the NVIDIA Container Toolkit on the host.
# torch's CUDA 13 wheels carry their own CUDA libraries; the base image brings a matching runtime.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH MODELSCOPE_CACHE=/models/.cache
# gcc and python3-dev: Triton builds its kernel launchers at run time with a C compiler and
# Python's headers; without them torch.compile, float8 matmuls and the attention kernel stay off
# (`fluxbot doctor` says so) and each step is slower.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
RUN pip install .

# Non-root; weights, the database and the compiled kernels (with them kept, the warm-up after a
# restart took ~20 s instead of 35-134 s on an H100) live on volumes, the config is mounted read-only.
RUN useradd --create-home --uid 1000 fluxbot \
 && mkdir -p /models /data /config && chown fluxbot:fluxbot /models /data
USER fluxbot
VOLUME ["/models", "/data"]
# Healthy only while the gateway is connected, the database answers and the GPU worker runs
# (`fluxbot health` asks /health on [metrics] listen). The first start loads and compiles the model.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --retries=3 \
  CMD ["fluxbot", "health", "--config", "/config/config.toml"]
ENTRYPOINT ["fluxbot"]
CMD ["run", "--config", "/config/config.toml"]
