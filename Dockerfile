# The animus engine as a container: `animus up` against the Postgres in DATABASE_URL.
# Built and run by docker-compose.yml (the appliance); see README.md, "Appliance".
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/animus

# animus (its dependencies include the OpenTelemetry exporters and the Anthropic client),
# then every first-party faculty package.
COPY pyproject.toml README.md ./
COPY animus_core ./animus_core
COPY plugins ./plugins
RUN pip install . ./plugins/*/

# TOML faculties (compose mounts ./faculties over these) and the health check.
COPY faculties ./faculties
COPY docker/healthcheck.py ./docker/healthcheck.py

# Run as an unprivileged user; ANIMUS_HOME holds the focus directories.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/animus --create-home \
        --shell /usr/sbin/nologin animus
USER animus
ENV ANIMUS_HOME=/var/lib/animus \
    ANIMUS_FACULTIES=/opt/animus/faculties \
    LOG_LEVEL=info

# Healthy while this engine's listener is connected to its database.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/opt/animus/docker/healthcheck.py"]

# SIGTERM drains: running foci get --grace seconds (30 by default) before release.
STOPSIGNAL SIGTERM
CMD ["animus", "up"]
