# swarmfold peer image: CPU torch, runs as a non-root user, state in /var/lib/swarmfold.
#
#   docker build -t swarmfold .
#   docker run -d --name swarmfold -v swarmfold:/var/lib/swarmfold -p 127.0.0.1:8470:8470 \
#     swarmfold run --spec /var/lib/swarmfold/spec.toml --data /var/lib/swarmfold/data/shard-0 \
#       --workdir /var/lib/swarmfold/work --api-host 0.0.0.0 --allow-remote-api
#   docker stop -t 300 swarmfold     (SIGTERM: the peer checkpoints and exits 0)
#
# See docs/daemon.md and deploy/docker-compose.yml (3 peers, Prometheus, Grafana).
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/swarmfold
# torch first, from the CPU index (the determinism contract pins torch 2.13.0)
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY swarmfold ./swarmfold
RUN pip install . && python -c "import swarmfold, hivemind, torch"

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /var/lib/swarmfold \
        --shell /usr/sbin/nologin swarmfold
USER swarmfold:swarmfold
WORKDIR /var/lib/swarmfold
# settings: /var/lib/swarmfold/work/settings.toml or /var/lib/swarmfold/config/swarmfold/settings.toml
ENV HOME=/var/lib/swarmfold \
    XDG_CONFIG_HOME=/var/lib/swarmfold/config \
    SWARMFOLD_CACHE=/var/lib/swarmfold/cache
VOLUME ["/var/lib/swarmfold"]
# 8470: dashboard, control API and /metrics; 31337: libp2p (when run with --host-maddrs .../tcp/31337);
# 31338: direct streams, the all-reduce's bulk bytes (when run with --data-port 31338)
EXPOSE 8470 31337 31338

# asks the peer's /api/status (the port is read from the workdir's api.json)
HEALTHCHECK --interval=30s --timeout=15s --start-period=180s --retries=3 \
    CMD ["swarmfold", "status", "--workdir", "/var/lib/swarmfold/work", "--check"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["swarmfold"]
CMD ["--help"]
