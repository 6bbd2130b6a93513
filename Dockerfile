# syntax=docker/dockerfile:1
# The operator image: `testlooper operator` (docs/operator.md), with git and ssh for the Repos'
# mirrors. Build from the repository's top:
#   docker build -t testlooper/operator:dev .
# The runtime dependencies are pinned by constraints.txt (scripts/constraints.py regenerates it).
# Runs as uid 10001 with a read-only root filesystem: it writes only to /var/cache/testlooper
# (mirrors, artifacts, the S3 spool: a volume) and /tmp (an emptyDir in the chart).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY operator/ operator/
# A virtualenv at the path the final image keeps it, so its scripts' #! lines stay right.
RUN python -m venv /opt/testlooper/venv \
    && /opt/testlooper/venv/bin/pip install --constraint constraints.txt . \
    && /opt/testlooper/venv/bin/pip check

FROM ${PYTHON_IMAGE}
# git and ssh: the operator fetches each Repo into a bare mirror (repos/mirror.py). Not pinned to
# exact versions (DL3008): Debian replaces them with each security fix; the base tag pins the
# release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# The home is /tmp: the one writable place besides the cache, and git and ssh read ~ there.
RUN groupadd --system --gid 10001 testlooper \
    && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
       --shell /usr/sbin/nologin testlooper \
    && mkdir -p /var/cache/testlooper \
    && chown 10001:10001 /var/cache/testlooper
COPY --from=build /opt/testlooper/venv /opt/testlooper/venv
# Imports the operator once, as root: the build fails if it cannot, and the standard-library
# modules it uses are compiled now (the python image ships no .pyc files, and a read-only root
# filesystem cannot keep them), so the operator does not compile them at each start.
RUN /opt/testlooper/venv/bin/python -c "import testlooper.cli.main, testlooper.cluster.app"
ENV PATH=/opt/testlooper/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TESTLOOPER_CACHE_DIR=/var/cache/testlooper
USER 10001:10001
WORKDIR /var/cache/testlooper
VOLUME ["/var/cache/testlooper"]
# /healthz, /readyz, /metrics, the webhooks and the worker API (--api-port).
EXPOSE 8080
ENTRYPOINT ["testlooper", "operator"]
