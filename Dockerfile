# syntax=docker/dockerfile:1
# ctriage appliance for x86-64 (Intel NUC, any Intel/AMD server): OpenVINO and ONNX Runtime on the CPU.
#
#   docker build -t ctriage:0.1.0 .
#   docker run -d --name ctriage --restart unless-stopped \
#     --group-add "$(getent group ctriage | cut -d: -f3)" \
#     -v /etc/ctriage:/etc/ctriage:ro -v /var/lib/ctriage:/var/lib/ctriage \
#     -v /srv/ctriage/incoming:/srv/ctriage/incoming ctriage:0.1.0
#
# The base image is pinned by version tag; for a release, pin it by digest too
# (docker buildx imagetools inspect python:3.11-slim-bookworm) and pass --build-arg PYTHON_IMAGE=...@sha256:...
# See docs/DEPLOYMENT.md ("Containers").
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the ctriage wheel and every dependency as wheels -----------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY models ./models
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime ------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ARG CTRIAGE_UID=10001
LABEL org.opencontainers.image.title="ctriage" \
      org.opencontainers.image.description="CT-side COVID-19 pneumonia triage appliance (x86-64, OpenVINO)"

# tini: a real PID 1 (signals, zombies); libgomp1: OpenMP runtime some CPU kernels load.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid "${CTRIAGE_UID}" ctriage \
 && useradd --system --uid "${CTRIAGE_UID}" --gid ctriage --home-dir /var/lib/ctriage --no-create-home \
        --shell /usr/sbin/nologin ctriage \
 && install -d -m 0755 /etc/ctriage /opt/ctriage \
 && install -d -m 0750 -o ctriage -g ctriage /var/lib/ctriage /var/lib/ctriage/bundles \
 && install -d -m 2770 -o ctriage -g ctriage /srv/ctriage/incoming

COPY --from=build /wheels /tmp/wheels
RUN python -m venv /opt/ctriage/venv \
 && /opt/ctriage/venv/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels ctriage \
 && rm -rf /tmp/wheels \
 && /opt/ctriage/venv/bin/ctriage --version

# Liveness: the daemon's heartbeat in <state>/status.json is recent (see firmware_scripts/healthcheck.sh).
COPY --chmod=0755 firmware_scripts/healthcheck.sh /usr/local/bin/ctriage-healthcheck

ENV PATH=/opt/ctriage/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CTRIAGE_CONFIG=/etc/ctriage/ctriage.toml

# Watch folder (the CT console's exports), state (store, spool, quarantine) and installed model bundles.
VOLUME ["/srv/ctriage/incoming", "/var/lib/ctriage", "/var/lib/ctriage/bundles"]
# 11112: DICOM node ([dicom] enabled); 8080: triage display (`display` command).
EXPOSE 11112 8080

USER ${CTRIAGE_UID}:${CTRIAGE_UID}
WORKDIR /var/lib/ctriage
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["ctriage-healthcheck", "/var/lib/ctriage"]
ENTRYPOINT ["tini", "--", "ctriage"]
CMD ["run", "--config", "/etc/ctriage/ctriage.toml"]
