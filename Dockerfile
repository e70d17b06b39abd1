# syntax=docker/dockerfile:1
# One image for every process of the control plane: `apphosting api | scheduler | provisioner | migrate`.

# --- build: install the project and its runtime dependencies into a virtualenv ---
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY apphosting/ apphosting/
COPY services/ services/
COPY scheduler/ scheduler/
COPY provisioner/ provisioner/
# Runtime dependencies only: not the `dev` extras (pytest, ruff, buf, grpcurl, ...).
RUN pip install .

# --- runtime: the virtualenv on a clean base, run as an unprivileged user ---
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# git: the kubernetes driver commits each app's manifests or values for Argo CD to sync.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends git ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 apphosting \
 && useradd --system --uid 10001 --gid apphosting --home-dir /app --create-home apphosting
COPY --from=build /opt/venv /opt/venv
# /app is writable by the user, so the default SQLite file (./apphosting.db) works without PostgreSQL.
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 50051
# No HEALTHCHECK here: the same image also runs the scheduler, provisioners and migrations, which serve
# no gRPC. docker-compose.yml checks the API with grpc.health.v1 instead.
ENTRYPOINT ["apphosting"]
CMD ["api", "--listen", "0.0.0.0:50051"]
