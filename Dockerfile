# rerankd, CPU image: python:3.11-slim + the CPU build of torch + rerankd.
#   docker build -t rerankd .
#   docker run -p 8000:8000 -v rerankd-hf:/data/hf rerankd --model Qwen/Qwen3-Reranker-0.6B
# Arguments after the image name go to `rerankd serve`. For CUDA see docs/docker.md.
FROM python:3.11-slim

# torch first, from PyTorch's CPU index: the default PyPI wheel on Linux bundles CUDA
# libraries (gigabytes) that a CPU image never uses. A CUDA image passes its own index.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/hf \
    RERANKD_HOST=0.0.0.0 \
    RERANKD_PORT=8000

# g++: torch.compile's CPU backend builds its fused kernels with it (`--compile auto` turns
# compiling on for bf16 on AMX CPUs, measured ~40% faster; without a compiler rerankd warns
# and runs eager), and rerankd builds its AMX attention kernel with it on first start
# (without it: PyTorch's SDPA, slower)
# libtcmalloc-minimal4: `rerankd serve` preloads tcmalloc where it is installed (reused
# activations instead of page faults: +2-12 % docs/s and 0.5-0.9 GB less memory on CPU,
# docs/benchmarks.md "Memory allocator"; RERANKD_ALLOCATOR=system turns it off)
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY rerankd ./rerankd
RUN pip install . \
    && useradd --create-home --uid 1000 rerankd \
    && mkdir -p /data/hf \
    && chown -R rerankd /data/hf

USER rerankd
# the Hugging Face cache: downloaded weights survive container restarts
VOLUME /data/hf
EXPOSE 8000

# /health is 200 once the model is loaded and warmed; a first start may download weights
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('RERANKD_PORT', '8000'), timeout=4)"

ENTRYPOINT ["rerankd", "serve"]
