# local/jaeger:1.75.0, a stand-in for jaegertracing/jaeger:2.12.0 (the same release: module
# v1.75.0 is Jaeger v2.12.0): the binary deploy/local/jaeger.sh builds from the Go module
# proxy (static, CGO_ENABLED=0), on the local Debian base. build-base.sh --jaeger builds it
# with the binary's cache folder as the context. As upstream: the binary at
# /cmd/jaeger/jaeger-linux is the entrypoint, JAEGER_LISTEN_HOST=0.0.0.0, uid 10001.
# Unlike upstream it has no UI assets (they are not in the Go module): the query HTTP API
# (/api/...) works, the UI page is Jaeger's placeholder; Grafana's Jaeger data source shows
# the traces. compose.yaml passes --config (deploy/local/jaeger.yaml, mounted).
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}

COPY jaeger /cmd/jaeger/jaeger-linux
ENV JAEGER_LISTEN_HOST=0.0.0.0
EXPOSE 4317 4318 13133 16685 16686
USER 10001
# Ready once every component has started (healthcheckv2 on JAEGER_HEALTH_PORT; no curl in
# the image, bash's /dev/tcp instead).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 CMD ["bash", "-c", \
  "exec 3<>/dev/tcp/127.0.0.1/${JAEGER_HEALTH_PORT:-13133} && printf 'GET /status HTTP/1.0\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/cmd/jaeger/jaeger-linux"]
