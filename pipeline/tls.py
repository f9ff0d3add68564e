"""TLS client contexts for MQTT, Kafka and HTTPS; verification is never turned off.

The one place where the configured CA bundle, client certificate and key are loaded: the
configuration's check at start-up (:func:`pipeline.config.load_config`) loads them here
too, so a file it accepts is one the clients can load, and a file they cannot load stops
the command at start-up with one line naming the key.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import TlsConfig

__all__ = ["client_context"]


def client_context(cfg: TlsConfig, *, key: str = "tls") -> ssl.SSLContext:
    """A verifying client context: the configured CA (or the system store) and client cert.

    Args:
        cfg: the TLS settings.
        key: where they are in the configuration (``mqtt.tls``), for the error.

    Raises:
        ConfigError: naming ``{key}.ca_file`` or ``{key}.cert_file`` when a file cannot be
            read or loaded.
    """
    ca_key, cert_key = f"{key}.ca_file", f"{key}.cert_file"
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
    except ssl.SSLError as exc:  # an OSError too: first
        reason = f"not a PEM bundle of CA certificates ({exc.reason or exc})"
        raise ConfigError.at(ca_key, reason) from None
    except OSError as exc:
        reason = f"cannot read {cfg.ca_file}: {exc.strerror or exc}"
        raise ConfigError.at(ca_key, reason) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert_file:
        password = cfg.key_password.reveal() if cfg.key_password else None
        try:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file, password=password)
        except ssl.SSLError as exc:
            reason = f"no usable certificate and key ({exc.reason or exc})"
            raise ConfigError.at(cert_key, reason) from None
        except OSError as exc:
            reason = f"cannot read the certificate or its key: {exc.strerror or exc}"
            raise ConfigError.at(cert_key, reason) from None
    return ctx
