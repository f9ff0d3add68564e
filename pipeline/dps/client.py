"""The EnOS DPS client: one pooled HTTP session, one cached access token, typed failures.

:class:`DpsClient` only moves bytes; the rules it follows (paths, signing, what an
answer means) are the pure functions of :mod:`pipeline.dps.protocol`. Every failure is
translated at this boundary into :class:`~pipeline.errors.DpsRejected` (do not retry) or
:class:`~pipeline.errors.DpsTransient` (retry later).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Self

import aiohttp
import msgspec
import yarl

from pipeline.config import TlsConfig
from pipeline.dps.protocol import (
    CONNECT_HINT,
    DEVICE_PATH,
    TLS_HINT,
    TOKEN_EXPIRED,
    TOKEN_PATH,
    classify,
    cleartext_remote,
    hint,
    parse_retry_after,
    sign,
    throttled,
    token_encryption,
)
from pipeline.errors import DpsRejected, DpsTransient
from pipeline.schemas import AllocateRequest, DpsEnvelope, PvsDevice, TokenRequest, TokenResponse
from pipeline.tls import client_context

if TYPE_CHECKING:
    from types import TracebackType

    from pipeline.config import DpsConfig

__all__ = ["DpsClient"]

log = logging.getLogger(__name__)

_SNIPPET = 200
_NULL = msgspec.Raw(b"null")

_encode = msgspec.json.Encoder().encode
_envelope = msgspec.json.Decoder(DpsEnvelope)
_token_response = msgspec.json.Decoder(TokenResponse)
_pvs_device = msgspec.json.Decoder(PvsDevice)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _snippet(payload: bytes) -> str:
    text = payload[:_SNIPPET].decode("utf-8", errors="replace").strip()
    return " ".join(text.split()) or "empty body"


class _Answer(msgspec.Struct, frozen=True):
    status: int
    retry_after: str | None
    payload: bytes


class DpsClient:
    """An async EnOS DPS client with one pooled HTTP session and one cached access token.

    Use it as ``async with DpsClient(cfg) as dps: data, request_id = await
    dps.allocate(org_id, AllocateRequest(sn=...))``. It is safe to share between
    concurrent tasks: they share the connection pool and a single in-flight token refresh.

    Args:
        cfg: where the API gateway is and the application's credentials.
        pool_size: connections kept open to the gateway, at most.
    """

    def __init__(self, cfg: DpsConfig, *, pool_size: int = 100) -> None:
        self._cfg = cfg
        self._base = yarl.URL(cfg.base_url)
        self._device_url = self._base / DEVICE_PATH
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._refresh_at = 0.0
        self._token_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        if self._session is not None:
            msg = "DpsClient is already open"
            raise RuntimeError(msg)
        # Verification is always on: the configured CA bundle, or the system store.
        tls = client_context(TlsConfig(enabled=True, ca_file=self._cfg.ca_file), key="sink.dps")
        connector = aiohttp.TCPConnector(limit=self._pool_size, ssl=tls)
        if cleartext_remote(self._cfg.base_url):
            log.warning(
                "sink.dps.base_url %s is plain http:// to a remote host: the access token and "
                "signed requests travel unencrypted; use https://",
                self._cfg.base_url,
            )
        # aiohttp's deadline covers connecting, sending and reading the whole answer.
        timeout = aiohttp.ClientTimeout(total=self._cfg.timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool; the client cannot be used afterwards."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- API ---------------------------------------------------------------------------

    async def allocate(
        self, org_id: str, request: AllocateRequest
    ) -> tuple[msgspec.Raw, str | None]:
        """V2.5 Allocate: allocate and activate the device ``request.sn`` in ``org_id``.

        Returns:
            The PvsDevice exactly as DPS returned it (validated), and DPS's requestId.

        Raises:
            DpsRejected: DPS refused the device (35400, 35404, 35601, 99400, ...).
            DpsTransient: throttling, server or gateway errors, timeouts, connection
                errors, or the credentials were refused; retry later.
        """
        body = _encode(request)
        params = {"action": "allocate", "orgId": org_id}
        return await self._call(params, body, sn=request.sn)

    # -- Token -------------------------------------------------------------------------

    async def _access_token(self) -> str:
        token = self._token
        if token is not None and time.monotonic() < self._refresh_at:
            return token
        async with self._token_lock:
            # Whoever held the lock before us may have refreshed it already.
            if self._token is not None and time.monotonic() < self._refresh_at:
                return self._token
            return await self._fetch_token()

    def _invalidate(self, token: str) -> None:
        # Only the token that failed: a concurrent caller may already hold a fresh one.
        if self._token == token:
            self._token = None

    async def _fetch_token(self) -> str:
        timestamp = _now_ms()
        cfg = self._cfg
        request = TokenRequest(
            app_key=cfg.app_key,
            encryption=token_encryption(cfg.app_key, timestamp, cfg.app_secret.reveal()),
            timestamp=timestamp,
        )
        url = self._base / TOKEN_PATH
        started = time.monotonic()
        answer = await self._exchange(
            "POST",
            url,
            {"Content-Type": "application/json"},
            _encode(request),
            what="token request",
        )
        try:
            response = _token_response.decode(answer.payload)
        except msgspec.DecodeError as exc:
            msg = f"token service answered HTTP {answer.status}: {_snippet(answer.payload)}"
            raise DpsTransient(
                answer.status,
                msg,
                retry_after=parse_retry_after(answer.retry_after),
                hint=hint(answer.status, None),
                throttled=throttled(answer.status, None),
            ) from exc
        if response.status != 0:
            reason = response.msg or f"status {response.status}"
            msg = f"token request for app key {cfg.app_key} refused: {reason}"
            raise DpsTransient(
                response.status,
                msg,
                retry_after=parse_retry_after(answer.retry_after),
                hint=hint(answer.status, response.status),
                throttled=throttled(answer.status, response.status),
            )
        if response.data is None:
            msg = f"token service answered status 0 without a token (HTTP {answer.status})"
            raise DpsTransient(answer.status, msg)
        expire = max(0.0, float(response.data.expire))
        # Refresh token_refresh_margin seconds before expiry, but never sooner than half
        # the lifetime: a gateway that hands back the current token with its remaining
        # lifetime must not be asked again on every call near the end of it.
        self._refresh_at = started + max(expire - cfg.token_refresh_margin, expire / 2)
        self._token = response.data.access_token
        log.debug("fetched an access token valid for %.0f s", expire)
        return self._token

    # -- Transport ---------------------------------------------------------------------

    async def _call(
        self, params: dict[str, str], body: bytes, *, sn: str
    ) -> tuple[msgspec.Raw, str | None]:
        """POST ``body`` to the device endpoint, signed; a token DPS retired is renewed once."""
        url = self._device_url.with_query(params)
        action = params["action"]
        refreshed = False
        while True:
            token = await self._access_token()
            timestamp = _now_ms()
            headers = {
                "apim-accesstoken": token,
                "apim-timestamp": str(timestamp),
                "apim-signature": sign(
                    token, params, body, timestamp, self._cfg.app_secret.reveal()
                ),
                "Content-Type": "application/json",
            }
            started = time.monotonic()
            answer = await self._exchange("POST", url, headers, body, what=f"DPS {action}")
            try:
                envelope: DpsEnvelope | None = _envelope.decode(answer.payload)
            except msgspec.DecodeError:
                envelope = None
            code = envelope.code if envelope is not None else None
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "DPS %s sn=%s -> HTTP %d code %s requestId %s in %.1f ms",
                    action,
                    sn,
                    answer.status,
                    code,
                    envelope.request_id if envelope is not None else None,
                    (time.monotonic() - started) * 1000,
                )
            if code == TOKEN_EXPIRED and not refreshed:
                # The gateway may retire a token before the expiry it announced.
                self._invalidate(token)
                refreshed = True
                continue
            return self._result(answer, envelope, refreshed=refreshed)

    def _result(
        self, answer: _Answer, envelope: DpsEnvelope | None, *, refreshed: bool
    ) -> tuple[msgspec.Raw, str | None]:
        code = envelope.code if envelope is not None else None
        request_id = envelope.request_id if envelope is not None else None
        outcome = classify(answer.status, code)
        if outcome == "ok" and envelope is not None:
            if envelope.data == _NULL:
                msg = f"DPS answered code 0 without data (HTTP {answer.status})"
                raise DpsTransient(answer.status, msg, request_id=request_id)
            try:
                _pvs_device.decode(envelope.data)
            except msgspec.DecodeError as exc:
                msg = f"DPS answered code 0 with an unreadable PvsDevice: {exc}"
                raise DpsTransient(answer.status, msg, request_id=request_id) from exc
            return envelope.data, request_id
        if envelope is None:
            msg = f"HTTP {answer.status} without a DPS envelope: {_snippet(answer.payload)}"
        else:
            msg = envelope.msg or f"HTTP {answer.status}"
        if code == TOKEN_EXPIRED and refreshed:
            msg = f"{msg} (again, with a freshly fetched token)"
        status_or_code = code if code is not None else answer.status
        if outcome == "rejected":
            raise DpsRejected(status_or_code, msg, request_id=request_id)
        raise DpsTransient(
            status_or_code,
            msg,
            request_id=request_id,
            retry_after=parse_retry_after(answer.retry_after),
            hint=hint(answer.status, code),
            throttled=throttled(answer.status, code),
        )

    async def _exchange(
        self, method: str, url: yarl.URL, headers: dict[str, str], body: bytes, *, what: str
    ) -> _Answer:
        """One HTTP exchange under the configured deadline; transport failures translated."""
        if self._session is None:
            msg = "DpsClient is not open: use it as `async with DpsClient(cfg) as dps:`"
            raise RuntimeError(msg)
        try:
            async with self._session.request(
                method, url, data=body or None, headers=headers, allow_redirects=False
            ) as response:
                payload = await response.read()
                return _Answer(response.status, response.headers.get("Retry-After"), payload)
        except TimeoutError as exc:  # the session's deadline (aiohttp's are TimeoutErrors too)
            msg = f"{what} to {url.host}:{url.port} timed out after {self._cfg.timeout} s"
            raise DpsTransient(None, msg) from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            reason = exc.certificate_error
            msg = f"{what}: TLS certificate of {url.host}:{url.port} not trusted: {reason}"
            raise DpsTransient(None, msg, hint=TLS_HINT) from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                msg = f"{what}: connection refused by {url.host}:{url.port}"
            else:
                detail = exc.os_error.strerror or str(exc.os_error)
                msg = f"{what}: cannot connect to {url.host}:{url.port}: {detail}"
            raise DpsTransient(None, msg, hint=CONNECT_HINT) from exc
        except (aiohttp.ClientError, OSError) as exc:
            msg = f"{what} to {url.host}:{url.port} failed: {type(exc).__name__}: {exc}"
            raise DpsTransient(None, msg) from exc
