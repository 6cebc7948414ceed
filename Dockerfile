# pyproxy's image: the agent plus the kernel tools it drives.
#
#   docker build -t REGISTRY/pyproxy:TAG .
#
# It runs as root, in the host's network namespace (see manifests/daemonset.yaml):
# programming iptables, IPVS, ipset and conntrack takes CAP_NET_ADMIN in the
# host's namespace, and setting net.* sysctls takes a writable /proc/sys, so a
# non-root user would gain nothing but a failed start.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="pyproxy" \
      org.opencontainers.image.description="A kube-proxy replacement in Python: iptables and IPVS dataplanes" \
      org.opencontainers.image.licenses="Apache-2.0"

# iptables: iptables-{legacy,nft}-{save,restore}, pyproxy picks the host's backend.
# ipset and iproute2: IPVS mode's sets and dummy interface; conntrack: stale UDP
# flows; kmod: modprobe of the ip_vs modules from the host's /lib/modules.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iptables ipset conntrack iproute2 kmod \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY setup.cfg setup.py pyproject.toml README.md ./
COPY pyproxy/ ./pyproxy/
RUN pip install . \
    && pyproxy version \
    && rm -rf /src

WORKDIR /
ENTRYPOINT ["pyproxy"]
CMD ["run"]
