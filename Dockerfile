# lora-entrypoint on a backend's image. One file for every base:
#   GPU, vLLM (default):  docker build -t lora-entrypoint:vllm .
#   GPU, SGLang:          docker build --build-arg BASE_IMAGE=lmsysorg/sglang:v0.5.23 -t lora-entrypoint:sglang .
#                         (run with NIM_MODEL_PROFILE=sglang-bf16-tp1-pp1-feat_lora or another SGLang profile)
#   CPU, vLLM's CPU build: `make image` builds the base (container/cpu-base.Containerfile) and
#                         this file on top of it, tagged lora-entrypoint:cpu.
# The build passes the host's CA bundle as a secret where HTTPS is re-signed:
#   --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt (optional; never kept in the image).
ARG BASE_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="lora-entrypoint" \
      org.opencontainers.image.description="One base LLM plus hot-swapped LoRA adapters, configured like NVIDIA NIM" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
USER 0

# tini as PID 1 (Debian/Ubuntu's package; docs/container.md says why), and the user the
# service runs as by default: uid/gid 1000, as NIM's images. Any other uid works with -u.
# hadolint ignore=DL3008
RUN if ! command -v tini >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends tini \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && (getent group 1000 >/dev/null || groupadd --gid 1000 nim) \
    && (getent passwd 1000 >/dev/null || useradd --uid 1000 --gid 1000 --create-home nim)

# The project as a normal package (its profiles ship as package data), into the base's Python.
# No extras: the base image brings the backend (vLLM or SGLang) and its torch.
WORKDIR /opt/lora-entrypoint
COPY pyproject.toml README.md ./
COPY entrypoint ./entrypoint
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python3 -m pip install --no-cache-dir "./[s3]" \
    && rm -rf /opt/lora-entrypoint/build \
    && lora-entrypoint --help >/dev/null \
    && mkdir -p /opt/nim/loras /opt/nim/.cache /opt/nim/profiles \
    && chown 1000:1000 /opt/nim /opt/nim/loras /opt/nim/profiles \
    && chmod 1777 /opt/nim/.cache

# NIM's conventional places; override any of them with -e. The caches of vLLM, torch and the
# Hugging Face libraries go under NIM_CACHE_PATH too, so any uid (-u) can write them.
ENV NIM_PEFT_SOURCE=/opt/nim/loras \
    NIM_CACHE_PATH=/opt/nim/.cache \
    NIM_SERVER_PORT=8000 \
    XDG_CACHE_HOME=/opt/nim/.cache \
    XDG_CONFIG_HOME=/opt/nim/.cache/config \
    VLLM_NO_USAGE_STATS=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1
VOLUME ["/opt/nim/loras", "/opt/nim/.cache"]
EXPOSE 8000
USER 1000:1000

# tini (PID 1) passes signals to the entrypoint and reaps orphans from the first instant; the
# entrypoint stops the backend's whole process group gracefully and exits with its code
# (0 after a stop, non-zero when the backend died).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/health/ready' % os.environ.get('NIM_SERVER_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "lora-entrypoint", "serve"]
