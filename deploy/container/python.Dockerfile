# local/python:3.11, a stand-in for python:3.11-slim from Debian bookworm's Python 3.11:
# python3 with venv/ensurepip (python3-venv) and the `python` name (python-is-python3).
# The CA bundle comes from the base (local/debian, which trusts the host's CAs), so pip
# reaches PyPI from a build exactly as it does on the host.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv python-is-python3 \
 && rm -rf /var/lib/apt/lists/*

ENV LANG=C.UTF-8
CMD ["python3"]
