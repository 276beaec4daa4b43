# lora-entrypoint on the official vLLM OpenAI image (GPU). For SGLang:
#   docker build --build-arg BASE_IMAGE=lmsysorg/sglang:v0.5.23 -t lora-entrypoint:sglang .
# and run with NIM_MODEL_PROFILE=sglang-bf16-tp1-pp1-feat_lora (or another SGLang profile).
ARG BASE_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="lora-entrypoint" \
      org.opencontainers.image.description="One base LLM plus hot-swapped LoRA adapters, configured like NVIDIA NIM" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The project (its profiles ship as package data). No extras: the
# base image brings the backend (vLLM or SGLang) and its torch.
WORKDIR /opt/lora-entrypoint
COPY pyproject.toml README.md ./
COPY entrypoint ./entrypoint
RUN python3 -m pip install --no-cache-dir --editable . \
    && mkdir -p /opt/nim/loras /opt/nim/.cache /opt/nim/profiles

# NIM's conventional places; override any of them with -e.
ENV NIM_PEFT_SOURCE=/opt/nim/loras \
    NIM_CACHE_PATH=/opt/nim/.cache \
    NIM_SERVER_PORT=8000 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1
VOLUME ["/opt/nim/loras", "/opt/nim/.cache"]
EXPOSE 8000

# The entrypoint runs as PID 1: it forwards SIGTERM/SIGINT to the backend, adopts and reaps
# orphaned processes, and exits 0 after a graceful stop (non-zero if the backend dies).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/health/ready' % os.environ.get('NIM_SERVER_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lora-entrypoint", "serve"]
