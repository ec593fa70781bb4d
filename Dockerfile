# The gateway image. Build: docker build -t model-gateway .   (docker-compose.yml does this for you)
# Two stages so the final image carries only the installed virtual environment, not pip's build cache.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/gateway
WORKDIR /src
# Only what the package needs: backends/ (PyTriton, model files) and the tests stay out of the image.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /opt/gateway/bin/pip install .

FROM python:3.11-slim
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin gateway \
    && install -d -m 700 -o gateway -g gateway /var/lib/gateway
# The state directory (worker snapshots, overrides, audit log, generated admin token) must be the
# gateway user's own; without a home, its default goes under XDG_STATE_HOME.
ENV XDG_STATE_HOME=/var/lib/gateway
COPY --from=build /opt/gateway /opt/gateway
USER gateway
# 8080: client traffic (KServe v2 over HTTP), 8001: the same over gRPC. 8081: admin API, metrics and
# dashboard; publish it only to trusted networks (docker-compose.yml binds it to the host's 127.0.0.1).
EXPOSE 8080 8001 8081
# gateway serve drains in-flight requests on SIGTERM (up to --shutdown-timeout, 30 s) before exiting.
STOPSIGNAL SIGTERM
CMD ["gateway", "serve", "--config", "/etc/gateway/routes.yaml", "--host", "0.0.0.0"]
