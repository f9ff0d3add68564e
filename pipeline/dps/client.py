"""The EnOS DPS client: one HTTP connection pool, one cached access token, typed failures.

:class:`DpsClient` only moves bytes; the rules it follows (paths, signing, what an
answer means) are the pure functions of :mod:`pipeline.dps.protocol`. Every failure is
translated at this boundary into :class:`~pipeline.errors.DpsRejected` (do not retry) or
:class:`~pipeline.errors.DpsTransient` (retry later).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Self

import msgspec
import yarl

from pipeline.config import TlsConfig
from pipeline.dps.protocol import (
    CONNECT_HINT,
    DEFAULT_PAGE_SIZE,
    DEVICE_PATH,
    SN_NOT_FOUND,
    TLS_HINT,
    TOKEN_EXPIRED,
    TOKEN_PATH,
    DevicePage,
    classify,
    cleartext_remote,
    device_page,
    hint,
    params_data,
    parse_retry_after,
    search_expression,
    signature,
    throttled,
    token_encryption,
)
from pipeline.errors import DpsRejected, DpsTransient, DpsUnanswered
from pipeline.io.http import CertificateFailed, ConnectFailed, HttpError, HttpPool
from pipeline.ops import tracing
from pipeline.schemas import (
    MAX_PAGE_SIZE,
    AllocateRequest,
    DeleteDevicesRequest,
    DpsEnvelope,
    DpsPageEnvelope,
    PaginationRequest,
    PvsDevice,
    ResetAllocationRequest,
    SearchRequest,
    TokenRequest,
    TokenResponse,
)
from pipeline.tls import client_context

if TYPE_CHECKING:
    from collections.abc import Iterable
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
_pvs_devices = msgspec.json.Decoder(list[PvsDevice])
_sn_list = msgspec.json.Decoder(list[str])
_page_envelope = msgspec.json.Decoder(DpsPageEnvelope)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _snippet(payload: bytes) -> str:
    text = payload[:_SNIPPET].decode("utf-8", errors="replace").strip()
    return " ".join(text.split()) or "empty body"


class _Target(msgspec.Struct, frozen=True):
    """Where a call goes: its URL (query included), its action, and its signed parameters."""

    url: yarl.URL
    action: str
    params: bytes
    """:func:`~pipeline.dps.protocol.params_data` of the query."""
    what: str
    """``DPS {action}``: what a failure says was tried."""


class _Answer(msgspec.Struct, frozen=True):
    status: int
    retry_after: str | None
    payload: bytes


class DpsClient:
    """An async EnOS DPS client with one HTTP connection pool and one cached access token.

    Use it as ``async with DpsClient(cfg) as dps: data, request_id = await
    dps.allocate(org_id, AllocateRequest(sn=...))``. It is safe to share between
    concurrent tasks: they share the connection pool and a single in-flight token refresh.

    Args:
        cfg: where the API gateway is and the application's credentials.
        pool_size: connections kept open to the gateway, at most.
        tracing: each HTTP call is a client span of it, inside the current hop.
    """

    def __init__(
        self, cfg: DpsConfig, *, pool_size: int = 100, tracing: tracing.Tracing = tracing.OFF
    ) -> None:
        self._cfg = cfg
        self._tracing = tracing
        self._base = yarl.URL(cfg.base_url)
        self._device_url = self._base / DEVICE_PATH
        # The allocate call's URL and signed parameters, per orgId (a few: the configured
        # org_id and its overrides): built once, not per call.
        self._allocate_targets: dict[str, _Target] = {}
        self._pool_size = pool_size
        self._http: HttpPool | None = None
        self._token: str | None = None
        self._refresh_at = 0.0
        self._token_lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        if self._http is not None:
            msg = "DpsClient is already open"
            raise RuntimeError(msg)
        # Verification is always on: the configured CA bundle, or the system store.
        tls = client_context(TlsConfig(enabled=True, ca_file=self._cfg.ca_file), key="sink.dps")
        if cleartext_remote(self._cfg.base_url):
            log.warning(
                "sink.dps.base_url %s is plain http:// to a remote host: the access token and "
                "signed requests travel unencrypted; use https://",
                self._cfg.base_url,
            )
        # The pool's deadline covers connecting, sending and reading the whole answer.
        self._http = HttpPool(
            self._cfg.base_url, size=self._pool_size, timeout=self._cfg.timeout, tls=tls
        )
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
        if self._http is not None:
            await self._http.close()
            self._http = None

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
        target = self._allocate_targets.get(org_id)
        if target is None:
            target = self._target({"action": "allocate", "orgId": org_id})
            self._allocate_targets[org_id] = target
        return await self._call("POST", target, _encode(request), sn=request.sn)

    async def get(self, org_id: str, sn: str) -> msgspec.Raw:
        """V2.5 Get: the PvsDevice ``sn`` as DPS currently has it.

        Raises:
            DpsRejected: DPS refused the request (35400, 35601, ...).
            DpsTransient: as for :meth:`allocate`.
        """
        target = self._target({"action": "get", "orgId": org_id, "sn": sn})
        data, _ = await self._call("GET", target, b"", sn=sn)
        return data

    async def get_device(self, org_id: str, sn: str) -> PvsDevice | None:
        """V2.5 Get DPS Device: the device ``sn`` as DPS has it now, allocated or not.

        Before retrying an allocate whose answer was lost, this tells whether it took
        effect (:func:`~pipeline.dps.protocol.is_allocated`).

        Returns:
            The PvsDevice, or None when DPS has no device ``sn`` (code 35601, "Verify
            not pass/sn not found").

        Raises:
            DpsRejected: DPS refused the request (35400: orgId or sn blank, ...).
            DpsTransient: as for :meth:`allocate`.
        """
        target = self._target({"action": "get", "orgId": org_id, "sn": sn})
        try:
            data, _ = await self._call("GET", target, b"", sn=sn)
        except DpsRejected as exc:
            if exc.code == SN_NOT_FOUND:
                return None
            raise
        return _pvs_device.decode(data)

    async def search_devices(
        self,
        org_id: str,
        *,
        group_id: str | None = None,
        sns: Iterable[str] | None = None,
        status: str | None = None,
        page: int = 1,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> DevicePage:
        """V2.5 Search DPS Device: one page of the devices matching every criterion given.

        Walk all of them with ``page = result.next_page`` until it is None.

        Args:
            org_id: the organisation (``orgId``).
            group_id: devices of this registration group.
            sns: devices with one of these sns.
            status: devices in this current status (``init``, ``allocated``, ...).
            page: the page number, from 1.
            page_size: devices a page, 1 to 1,000 (DPS's maximum).

        Raises:
            ValueError: no criterion, an empty ``sns``, a value with a single quote, or
                ``page``/``page_size`` out of range (nothing was sent).
            DpsRejected: DPS refused the search (99400, ...).
            DpsTransient: as for :meth:`allocate`.
        """
        expression = search_expression(group_id=group_id, sns=sns, status=status)
        if page < 1 or not 1 <= page_size <= MAX_PAGE_SIZE:
            msg = f"page {page}, page_size {page_size}: pages start at 1, hold 1 to 1000"
            raise ValueError(msg)
        request = SearchRequest(
            expression=expression,
            pagination=PaginationRequest(page_no=page, page_size=page_size),
        )
        target = self._target({"action": "search", "orgId": org_id})
        answer, envelope, refreshed = await self._send(
            "POST", target, _encode(request), subject=f"expression={expression!r} page={page}"
        )
        data, request_id = self._result(
            answer, envelope, refreshed=refreshed, decoder=_pvs_devices, what="PvsDevice list"
        )
        try:
            pagination = _page_envelope.decode(answer.payload).pagination
        except msgspec.DecodeError:
            pagination = None  # the page still reads: the next one is found by its size
        return device_page(
            _pvs_devices.decode(data),
            pagination,
            page_no=page,
            page_size=page_size,
            request_id=request_id,
        )

    async def reset_allocation(self, org_id: str, group_id: str, sns: Iterable[str]) -> list[str]:
        """V2.5 Reset Device Allocation Status of ``sns``, all of registration group ``group_id``.

        A reset device is unallocated again: the next allocate allocates it anew. No
        batch limit is documented; repeated sns are sent once, and none sends nothing.

        Returns:
            The sns DPS says it reset.

        Raises:
            DpsRejected: 35404 (the group, or one of the sns in it, does not exist),
                35603 (the application has no DPS role), 99400 (groupId missing), ...
            DpsTransient: as for :meth:`allocate`.
        """
        listed = list(dict.fromkeys(sns))
        if not listed:
            return []
        body = _encode(ResetAllocationRequest(group_id=group_id, sns=listed))
        return await self._sn_batch("resetAllocationStatus", org_id, group_id, body, len(listed))

    async def delete_devices(self, org_id: str, group_id: str, sns: Iterable[str]) -> list[str]:
        """V2.5 Delete DPS Device: remove ``sns`` of registration group ``group_id`` from DPS.

        Deleting is idempotent: DPS lists the sns "successfully deleted and do not
        exist". No batch limit is documented; repeated sns are sent once, and none sends
        nothing.

        Returns:
            The sns that are now gone (deleted, or absent already); an sn missing from
            it was not deleted (DPS does not say why).

        Raises:
            DpsRejected: DPS refused the request (no error code is documented).
            DpsTransient: as for :meth:`allocate`.
        """
        listed = list(dict.fromkeys(sns))
        if not listed:
            return []
        body = _encode(DeleteDevicesRequest(group_id=group_id, sn_list=listed))
        return await self._sn_batch("delete", org_id, group_id, body, len(listed))

    async def _sn_batch(
        self, action: str, org_id: str, group_id: str, body: bytes, count: int
    ) -> list[str]:
        """A batch call on sns of one group whose ``data`` is a list of sns."""
        target = self._target({"action": action, "orgId": org_id})
        answer, envelope, refreshed = await self._send(
            "POST", target, body, subject=f"groupId={group_id} sns={count}"
        )
        data, _ = self._result(
            answer, envelope, refreshed=refreshed, decoder=_sn_list, what="sn list"
        )
        return _sn_list.decode(data)

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
        with self._tracing.call("POST", url) as call:
            answer = await self._exchange(
                "POST",
                url,
                {"Content-Type": "application/json", **call.headers()},
                _encode(request),
                what="token request",
            )
            call.answered(answer.status)
        try:
            response = _token_response.decode(answer.payload)
        except msgspec.DecodeError as exc:
            msg = f"token service answered HTTP {answer.status}: {_snippet(answer.payload)}"
            raise DpsTransient(
                None,
                msg,
                http_status=answer.status,
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
                http_status=answer.status,
                retry_after=parse_retry_after(answer.retry_after),
                hint=hint(answer.status, response.status),
                throttled=throttled(answer.status, response.status),
            )
        if response.data is None:
            msg = f"token service answered status 0 without a token (HTTP {answer.status})"
            raise DpsTransient(response.status, msg, http_status=answer.status)
        expire = max(0.0, float(response.data.expire))
        # Refresh token_refresh_margin seconds before expiry, but never sooner than half
        # the lifetime: a gateway that hands back the current token with its remaining
        # lifetime must not be asked again on every call near the end of it.
        self._refresh_at = started + max(expire - cfg.token_refresh_margin, expire / 2)
        self._token = response.data.access_token
        log.debug("fetched an access token valid for %.0f s", expire)
        return self._token

    # -- Transport ---------------------------------------------------------------------

    def _target(self, params: dict[str, str]) -> _Target:
        """The device endpoint with ``params`` (``action`` among them)."""
        url = self._device_url.with_query(params)
        action = params["action"]
        return _Target(url, action, params_data(params), f"DPS {action}")

    async def _call(
        self, method: str, target: _Target, body: bytes, *, sn: str
    ) -> tuple[msgspec.Raw, str | None]:
        """A call whose ``data`` is a PvsDevice: the data as DPS sent it, and the requestId."""
        answer, envelope, refreshed = await self._send(method, target, body, subject=None, sn=sn)
        return self._result(answer, envelope, refreshed=refreshed)

    async def _send(
        self,
        method: str,
        target: _Target,
        body: bytes,
        *,
        subject: str | None,
        sn: str | None = None,
    ) -> tuple[_Answer, DpsEnvelope | None, bool]:
        """One signed DPS call, once more with a fresh token if DPS says the token expired.

        Returns:
            The answer, its envelope if it had one, and whether the token was refreshed.
        """
        url, action = target.url, target.action
        secret = self._cfg.app_secret.reveal().encode()
        refreshed = False
        while True:
            token = self._token
            if token is None or time.monotonic() >= self._refresh_at:
                token = await self._access_token()  # a coroutine only when it may fetch
            timestamp = _now_ms()
            headers = {
                "apim-accesstoken": token,
                "apim-timestamp": str(timestamp),
                "apim-signature": signature(token, target.params, body, timestamp, secret),
            }
            if method == "POST":
                headers["Content-Type"] = "application/json"
            started = time.monotonic()
            with self._tracing.call(method, url, sn=sn) as call:
                if self._tracing.enabled:
                    headers.update(call.headers())
                answer = await self._exchange(
                    method, url, headers, body, what=target.what, unanswered=DpsUnanswered
                )
                try:
                    envelope: DpsEnvelope | None = _envelope.decode(answer.payload)
                except msgspec.DecodeError:
                    envelope = None
                code = envelope.code if envelope is not None else None
                call.answered(answer.status, code)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "DPS %s %s -> HTTP %d code %s requestId %s in %.1f ms",
                    action,
                    subject or f"sn={sn}",
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
            return answer, envelope, refreshed

    def _result(
        self,
        answer: _Answer,
        envelope: DpsEnvelope | None,
        *,
        refreshed: bool,
        decoder: msgspec.json.Decoder[Any] = _pvs_device,
        what: str = "PvsDevice",
    ) -> tuple[msgspec.Raw, str | None]:
        """The ``data`` of a successful answer, checked with ``decoder``, and the requestId.

        Raises:
            DpsRejected: DPS refused the call.
            DpsTransient: any other failure, or a success whose data ``decoder`` cannot
                read (described as ``what``).
        """
        code = envelope.code if envelope is not None else None
        request_id = envelope.request_id if envelope is not None else None
        outcome = classify(answer.status, code)
        if outcome == "ok" and envelope is not None:
            if envelope.data == _NULL:
                msg = f"DPS answered code 0 without data (HTTP {answer.status})"
                raise DpsTransient(code, msg, request_id=request_id, http_status=answer.status)
            try:
                decoder.decode(envelope.data)
            except msgspec.DecodeError as exc:
                msg = f"DPS answered code 0 with an unreadable {what}: {exc}"
                raise DpsTransient(
                    code, msg, request_id=request_id, http_status=answer.status
                ) from exc
            return envelope.data, request_id
        if envelope is None:
            msg = f"HTTP {answer.status} without a DPS envelope: {_snippet(answer.payload)}"
        else:
            msg = envelope.msg or f"HTTP {answer.status}"
        if code == TOKEN_EXPIRED and refreshed:
            msg = f"{msg} (again, with a freshly fetched token)"
        if outcome == "rejected":
            raise DpsRejected(code, msg, request_id=request_id, http_status=answer.status)
        raise DpsTransient(
            code,
            msg,
            http_status=answer.status,
            request_id=request_id,
            retry_after=parse_retry_after(answer.retry_after),
            hint=hint(answer.status, code),
            throttled=throttled(answer.status, code),
        )

    async def _exchange(
        self,
        method: str,
        url: yarl.URL,
        headers: dict[str, str],
        body: bytes,
        *,
        what: str,
        unanswered: type[DpsTransient] = DpsTransient,
    ) -> _Answer:
        """One HTTP exchange under the configured deadline; transport failures translated.

        A call that may have reached the server and got no answer (a timeout, a broken
        connection after connecting) raises ``unanswered`` (DPS calls:
        :class:`~pipeline.errors.DpsUnanswered`, since it may have taken effect); one
        that never connected raises :class:`~pipeline.errors.DpsTransient`.
        """
        if self._http is None:
            msg = "DpsClient is not open: use it as `async with DpsClient(cfg) as dps:`"
            raise RuntimeError(msg)
        try:
            response = await self._http.request(method, url.raw_path_qs, headers, body)
        except TimeoutError as exc:  # the pool's deadline
            msg = f"{what} to {url.host}:{url.port} timed out after {self._cfg.timeout} s"
            raise unanswered(None, msg) from exc
        except CertificateFailed as exc:
            msg = f"{what}: TLS certificate of {url.host}:{url.port} not trusted: {exc.reason}"
            raise DpsTransient(None, msg, hint=TLS_HINT) from exc
        except ConnectFailed as exc:
            if isinstance(exc.os_error, ConnectionRefusedError):
                msg = f"{what}: connection refused by {url.host}:{url.port}"
            else:
                msg = f"{what}: cannot connect to {url.host}:{url.port}: {exc}"
            raise DpsTransient(None, msg, hint=CONNECT_HINT) from exc
        except HttpError as exc:
            msg = f"{what} to {url.host}:{url.port} failed: {type(exc).__name__}: {exc}"
            raise unanswered(None, msg) from exc
        return _Answer(response.status, response.header("Retry-After"), response.body)
