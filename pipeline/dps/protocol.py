"""EnOS API gateway and DPS v2.5 rules as plain functions (pure, no I/O).

Paths, the access-token ``encryption``, the request signature, how an answer is
classified (success, permanent refusal, worth retrying) and ``Retry-After`` parsing
(reference/protocols.md, B1-B3); the search expression, and what Get and Search DPS
Device answers mean (allocated or not, which page comes next). The client
(:mod:`pipeline.dps.client`) and the emulator (:mod:`pipeline.dps.emulator`) both follow
these, so they cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import ipaddress
import math
import time
import urllib.parse
from typing import TYPE_CHECKING, Literal

import msgspec

from pipeline.schemas import Pagination, PvsDevice

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "CONNECT_HINT",
    "DEFAULT_PAGE_SIZE",
    "DEVICE_PATH",
    "SN_NOT_FOUND",
    "TLS_HINT",
    "TOKEN_EXPIRED",
    "TOKEN_PATH",
    "DevicePage",
    "Outcome",
    "classify",
    "cleartext_remote",
    "device_page",
    "hint",
    "is_allocated",
    "params_data",
    "parse_retry_after",
    "search_expression",
    "sign",
    "signature",
    "throttled",
    "token_encryption",
]

TOKEN_PATH = "apim-token-service/v2.0/token/get"  # noqa: S105  (a path, not a password)
"""The API gateway's token endpoint, relative to the gateway's base URL."""
DEVICE_PATH = "dps-service/v2.5/pvs/device"
"""The DPS v2.5 device endpoint (``?action=allocate|get|...``), relative to the base URL."""

Outcome = Literal["ok", "rejected", "transient"]

TOKEN_EXPIRED = 1203
SN_NOT_FOUND = 35601
"""Get DPS Device's "Verify not pass/sn not found": DPS has no device with that sn."""
DEFAULT_PAGE_SIZE = 10
"""Search DPS Device's page size when the request gives none."""

# API-gateway codes (protocols.md B2) and legacy gateway codes (B3) that say nothing about
# the record: a wrong app key or secret, a gateway hiccup, an expired token. Retrying is
# right; dead-lettering would wrongly condemn every record until the operator fixes config.
_TRANSIENT_CODES = frozenset({1001, 1002, 1003, 1004, 1005, 1202, 1203, 1204, 497})
_TRANSIENT_HTTP = frozenset({401, 403, 429})


def token_encryption(app_key: str, timestamp_ms: int, app_secret: str) -> str:
    """The ``encryption`` field of a token request.

    Returns:
        lowercase hex SHA-256 of the UTF-8 of ``appKey + timestamp + appSecret``.
    """
    return hashlib.sha256(f"{app_key}{timestamp_ms}{app_secret}".encode()).hexdigest()


def sign(
    access_token: str,
    params: Mapping[str, str],
    body: bytes,
    timestamp_ms: int,
    app_secret: str,
) -> str:
    """The ``apim-signature`` header of an API call.

    Args:
        access_token: the token sent in ``apim-accesstoken``.
        params: the URL query parameters, unencoded.
        body: the request body exactly as sent (``b""`` when there is none).
        timestamp_ms: the value sent in ``apim-timestamp``.
        app_secret: the application's secret.

    Returns:
        lowercase hex SHA-256 of ``accessToken + paramsData + timestamp + appSecret``, where
        ``paramsData`` is the parameters sorted by key, each as ``key + value`` with no
        separators, followed by the raw body bytes.
    """
    return signature(access_token, params_data(params), body, timestamp_ms, app_secret.encode())


def params_data(params: Mapping[str, str]) -> bytes:
    """The ``paramsData`` of :func:`sign`: the parameters sorted by key, ``key + value`` each."""
    return "".join(f"{key}{params[key]}" for key in sorted(params)).encode()


def signature(
    access_token: str, params: bytes, body: bytes, timestamp_ms: int, app_secret: bytes
) -> str:
    """:func:`sign` from parts a caller computes once: ``params`` is :func:`params_data`."""
    digest = hashlib.sha256(access_token.encode())
    digest.update(params)
    digest.update(body)
    digest.update(b"%d" % timestamp_ms)
    digest.update(app_secret)
    return digest.hexdigest()


def classify(http_status: int, code: int | None) -> Outcome:
    """Whether a DPS answer is a success, a permanent refusal or worth retrying.

    - ``ok``: HTTP 2xx with code 0.
    - ``transient``: HTTP 429 and 5xx; codes 1005 (internal error) and 1203 (access token
      expired); a 2xx without a readable code; and every authentication or gateway failure
      that is not the record's fault: codes 1001-1004, 1202, 1204, legacy 497
      (signature check failed), HTTP 401/403 and 3xx. A wrong app key or secret must not
      dead-letter every record: the operator fixes the configuration and the sink
      carries on where it stopped. Legacy body codes 429 and 5xx (rate limit, server
      error) are transient for the same reason as their HTTP twins.
      Also any 4xx without a DPS envelope (no readable code): that is the gateway or a
      proxy speaking (a wrong ``base_url`` answers 404), not DPS judging the record.
    - ``rejected``: everything else, notably 35400, 35404, 35601, 35603, 99400, and any
      other non-zero code.

    Args:
        http_status: the HTTP status of the response.
        code: the ``code`` of the JSON envelope, or None when the body had none.
    """
    if http_status in _TRANSIENT_HTTP or http_status >= 500 or 300 <= http_status < 400:  # noqa: PLR2004
        return "transient"
    if code is not None and (code in _TRANSIENT_CODES or code == 429 or 500 <= code <= 599):  # noqa: PLR2004
        return "transient"
    if code is None:
        return "transient"
    if 200 <= http_status < 300:  # noqa: PLR2004
        return "ok" if code == 0 else "rejected"
    return "rejected"


def throttled(http_status: int, code: int | None) -> bool:
    """Whether an answer asks us to slow down (HTTP 429, or the legacy body code 429).

    Throttling is not DPS failing: the sink lowers its call rate rather than counting it
    against the breaker.
    """
    return http_status == 429 or code == 429  # noqa: PLR2004


# What an operator should check when DPS keeps answering this: failures that no retry
# cures, because they are about this client's configuration, not about the record or a
# passing fault. The sink pauses at once on them and shows the hint in /readyz.
_CODE_HINTS: dict[int, str] = {
    1001: "check sink.dps.app_key (a repeated token request: is the app key shared with "
    "another client, or this host's clock wrong?)",
    1002: "check sink.dps.app_key (the API gateway does not know it)",
    1003: "check sink.dps.app_key and sink.dps.app_secret",
    1004: "check this host's clock and sink.dps.base_url (the gateway refused a parameter)",
    1202: "check sink.dps.app_key and sink.dps.app_secret (a parameter was empty)",
    1204: "check sink.dps.app_key and sink.dps.app_secret (the token refresh failed)",
    497: "check sink.dps.app_secret and this host's clock (the request signature was refused)",
}
_STATUS_HINTS: dict[int, str] = {
    401: "check sink.dps.app_key and sink.dps.app_secret",
    403: "check that the application (sink.dps.app_key) may call DPS in sink.org_id",
    404: "check sink.dps.base_url (no DPS API answers there)",
}
CONNECT_HINT = "check sink.dps.base_url and that the API gateway is reachable from here"
"""The hint for a connection refused, or a host that cannot be resolved or reached."""
TLS_HINT = "check sink.dps.ca_file (the CA that signed the API gateway's certificate)"
"""The hint for a gateway certificate that is not trusted."""


def hint(http_status: int, code: int | None) -> str | None:
    """What the operator should check, for an answer no retry will cure; else None.

    Covers the API gateway's authentication codes (1001-1004, 1202, 1204, legacy 497)
    and, when the body had no DPS envelope (``code`` None), HTTP 401, 403 and 404: a 404
    without an envelope is a wrong ``base_url``, not DPS judging a record. Server errors,
    throttling, 1005 and 1203 are cured by retrying and have none.

    Args:
        http_status: the HTTP status of the response.
        code: the ``code`` of the JSON envelope (or the token service's ``status``), or
            None when the body had none.
    """
    if code is not None and code in _CODE_HINTS:
        return _CODE_HINTS[code]
    if code is None or http_status in (401, 403):
        return _STATUS_HINTS.get(http_status)
    return None


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Args:
        value: the header value, if any.
        now: the current Unix time (for tests); ``time.time()`` by default.

    Returns:
        A finite number of seconds >= 0, or None when the header is absent or unreadable.
    """
    if not value or not value.strip():
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def cleartext_remote(base_url: str) -> bool:
    """True when ``base_url`` is plain ``http://`` to a host that is not this machine.

    The access token and every signed request would then cross the network unencrypted;
    fine for the emulator on loopback or a compose network's sidecar, worth a warning
    everywhere else.
    """
    url = urllib.parse.urlsplit(base_url)
    if url.scheme.lower() != "http":
        return False
    host = url.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: assume it is remote


# --------------------------------------------------------------------------------------
# Get and Search DPS Device


def is_allocated(device: PvsDevice) -> bool:
    """Whether DPS has allocated ``device`` (it then has a region and an OU).

    ``allocateStatus`` (``init`` or ``allocated``) says it when present; otherwise
    ``status.currentStatus``: ``allocated``, ``connected`` and ``finished`` all come
    after allocation, ``init`` and ``discarded`` do not.
    """
    if device.allocate_status is not None:
        return device.allocate_status == "allocated"
    status = device.status.current_status if device.status is not None else None
    return status in {"allocated", "connected", "finished"}


def _quoted(field: str, value: str) -> str:
    # The docs give no escape for a quote inside an FQL string: refuse rather than guess.
    if "'" in value:
        msg = f"{field} {value!r}: a search value cannot contain a single quote"
        raise ValueError(msg)
    return f"'{value}'"


def search_expression(
    *,
    group_id: str | None = None,
    sns: Iterable[str] | None = None,
    status: str | None = None,
) -> str:
    """The FQL ``expression`` of Search DPS Device for these criteria, joined by ``and``.

    Args:
        group_id: the registration group (``groupId = '...'``).
        sns: any of these sns (``sn in ('...', ...)``).
        status: the device's current status: ``init``, ``allocated``, ``connected``,
            ``finished`` or ``discarded`` (``status = '...'``).

    Raises:
        ValueError: no criterion (the expression is required), an empty ``sns``, or a
            value with a single quote in it.
    """
    terms = []
    if group_id is not None:
        terms.append(f"groupId = {_quoted('groupId', group_id)}")
    if sns is not None:
        listed = list(dict.fromkeys(sns))
        if not listed:
            msg = "sns: an empty list matches nothing"
            raise ValueError(msg)
        terms.append(f"sn in ({', '.join(_quoted('sn', sn) for sn in listed)})")
    if status is not None:
        terms.append(f"status = {_quoted('status', status)}")
    if not terms:
        msg = "a search needs at least one criterion (group_id, sns or status)"
        raise ValueError(msg)
    return " and ".join(terms)


class DevicePage(msgspec.Struct, frozen=True, kw_only=True):
    """One page of a Search DPS Device answer.

    Attributes:
        devices: the page's devices, in DPS's order.
        page_no: the page number (from 1).
        page_size: the size asked for; the last page may hold fewer.
        total_size: how many devices match in all, when DPS said so.
        request_id: DPS's requestId.
    """

    devices: list[PvsDevice]
    page_no: int
    page_size: int
    total_size: int | None
    request_id: str | None = None

    @property
    def next_page(self) -> int | None:
        """The number of the page after this one, or None when this one is the last.

        ``totalSize`` decides when DPS sent it; otherwise a page shorter than
        ``page_size`` is the last. An empty page is always the last.
        """
        if not self.devices:
            return None
        if self.total_size is not None:
            more = self.page_no * self.page_size < self.total_size
        else:
            more = len(self.devices) >= self.page_size
        return self.page_no + 1 if more else None


def device_page(
    devices: list[PvsDevice],
    pagination: Pagination | None,
    *,
    page_no: int,
    page_size: int,
    request_id: str | None = None,
) -> DevicePage:
    """A :class:`DevicePage` from a search answer, the request filling what DPS left out.

    A ``pagination`` whose page number or size is below 1 is ignored: paging by it would
    never end.
    """
    if pagination is None or pagination.page_no < 1 or pagination.page_size < 1:
        return DevicePage(
            devices=devices,
            page_no=page_no,
            page_size=page_size,
            total_size=None,
            request_id=request_id,
        )
    return DevicePage(
        devices=devices,
        page_no=pagination.page_no,
        page_size=pagination.page_size,
        total_size=pagination.total_size,
        request_id=request_id,
    )
