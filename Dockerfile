# The streaming worker (`cdp worker`) as an image; docker-compose.yml runs it next to Kafka and
# PostgreSQL, deploy/kubernetes.yaml on Kubernetes (tests/test_deploy.py checks all three). Build from the repository root: docker build -t cdp .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package needs: the build context may hold .venv, .services (PostgreSQL data owned
# by another user) and .cdp, which must not end up in the image.
COPY pyproject.toml ./
COPY cdp ./cdp
COPY ingest ./ingest
COPY identity ./identity
COPY projections ./projections
COPY schemas ./schemas

RUN pip install '.[postgres]'

# The JSON Schemas are not part of the installed package: point the configuration at the copy.
ENV CDP_SCHEMAS=/app/schemas \
    CDP_HOME=/data

RUN useradd --create-home --uid 10001 cdp && mkdir -p /data && chown cdp /data
USER cdp
VOLUME ["/data"]

# /health (liveness), /ready (readiness) and /metrics (Prometheus) of the worker
EXPOSE 8081
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8081/health', timeout=4).status != 200)"]

# SIGTERM (docker stop, Kubernetes) finishes the batch in hand, commits it and exits 0
STOPSIGNAL SIGTERM
CMD ["cdp", "worker", "--health-host", "0.0.0.0", "--health-port", "8081"]
