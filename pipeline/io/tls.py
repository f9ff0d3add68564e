"""TLS contexts for MQTT, Kafka and HTTPS clients; verification is never turned off."""

from __future__ import annotations

import ssl

from pipeline.config import TlsConfig

__all__ = ["client_context"]


def client_context(cfg: TlsConfig) -> ssl.SSLContext:
    """A verifying client context: the configured CA (or the system store) and client cert."""
    ctx = ssl.create_default_context(cafile=cfg.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        password = cfg.key_password.reveal() if cfg.key_password else None
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file, password=password)
    return ctx
