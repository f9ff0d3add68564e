"""A small HTTP/1.1 client: one keep-alive connection pool per origin, answers parsed by httptools.

The DPS client makes one short signed call per allocation, thousands a second; aiohttp's
``ClientSession.request`` spends about two and a half times the CPU of this module on
each (timers, request and response objects, multidict headers, the cookie jar, the
connector's keys, a stream reader, tracing hooks). Here a call is one prebuilt ``bytes``
written on an idle connection and an answer parsed by llhttp (httptools, as uvicorn
uses it).

What it does: HTTP/1.1 with keep-alive to one origin, at most ``size`` connections, callers
waiting first come, first served for one; one deadline over waiting, connecting, sending
and reading the whole answer; TLS with a verifying context; bodies by Content-Length,
chunked (trailers dropped) or read until the server closes cleanly; 1xx interim answers
skipped; answers over ``max_answer`` bytes refused; gzip and deflate decoded should a
server send them (none is asked for; a stream cut short is refused). A connection is
reused only after an exchange that ended cleanly with keep-alive, and for at most
:data:`KEEPALIVE` seconds idle; after any other (timeout, cancellation, an unreadable or
oversize answer, ``Connection: close``, HTTP/1.0 without keep-alive, bytes beyond the
answer) it is closed.

What it deliberately does not do: proxies, redirects (a 3xx is an answer like any other),
cookies, HTTP/2, pipelining, ``Expect: 100-continue``, streaming bodies, HEAD requests.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
import urllib.parse
import zlib
from typing import TYPE_CHECKING, Self

import httptools

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

__all__ = [
    "MAX_ANSWER",
    "AnswerTooLarge",
    "CertificateFailed",
    "ConnectFailed",
    "ExchangeFailed",
    "HttpError",
    "HttpPool",
    "Response",
]

MAX_ANSWER = 16 * 1024 * 1024
"""Bytes of an answer's body, at most (after decoding): a hostile server cannot fill memory."""
MAX_HEAD = 64 * 1024
"""Bytes an answer may take beyond its body (status line, headers, chunk sizes, 1xx answers)."""

USER_AGENT = "iot-pipeline"
KEEPALIVE = 15.0
"""Seconds an idle connection is reused for, at most (aiohttp's default): a server closes
idle connections after a while of its own, and one closing just as a request goes out
loses that request's answer."""

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CLOSE_WAIT = 1.0
"""Seconds :meth:`HttpPool.close` waits for the connections to close before aborting them."""


class HttpError(PipelineError):
    """An HTTP exchange failed without an answer; the message says why (never a header value)."""

    retriable = True


class ConnectFailed(HttpError):
    """No connection could be made: nothing was sent.

    Attributes:
        os_error: why (``ConnectionRefusedError``, a ``socket.gaierror``, an ``ssl.SSLError``).
    """

    def __init__(self, os_error: OSError) -> None:
        super().__init__(os_error.strerror or str(os_error) or type(os_error).__name__)
        self.os_error = os_error


class CertificateFailed(ConnectFailed):
    """The server's TLS certificate was not trusted (``reason`` says why): nothing was sent."""

    def __init__(self, os_error: ssl.SSLCertVerificationError) -> None:
        super().__init__(os_error)
        self.reason = os_error.verify_message or str(os_error)


class ExchangeFailed(HttpError):
    """The connection broke or the answer was unreadable: the server may have acted on it."""


class AnswerTooLarge(ExchangeFailed):
    """The answer's body is larger than the pool accepts; the connection was dropped."""


class Response:
    """A complete answer: status, headers as received (raw bytes) and the whole body."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        """The value of the first header ``name`` (any case), or None."""
        key = name.lower().encode()
        for field, value in self.headers:
            if field.lower() == key:
                return value.decode("latin-1")
        return None


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one exchange at a time, the answer parsed as it arrives."""

    def __init__(self, max_answer: int, lost: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.usable = True
        """False once closed, lost, or after an exchange that did not end cleanly."""
        self.lost = lost
        self._max = max_answer
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._received = 0
        self._status = 0
        self._headers_done = False
        self._keep_alive = False
        self.idle_since = 0.0
        """When the last exchange ended (``time.monotonic()``)."""

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.usable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None and self._headers_done and self._close_delimited():
                self._finish()  # the body was "everything until the server closes" (cleanly)
            else:
                why = (
                    f"connection lost before the whole answer: {exc}"
                    if exc
                    else "the server closed the connection before the whole answer"
                )
                waiter.set_exception(ExchangeFailed(why))
        if not self.lost.done():
            self.lost.set_result(None)

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost settles the exchange

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self.abort()  # bytes nobody asked for: this connection cannot be trusted
            return
        self._received += len(data)
        if self._received > self._max + MAX_HEAD:  # headers without end, say
            self._fail(AnswerTooLarge(f"answer larger than {self._max + MAX_HEAD} bytes"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ExchangeFailed("the server switched protocols, which was not asked for"))
        except httptools.HttpParserError as exc:
            self._fail(ExchangeFailed(f"unreadable answer: {exc}"))

    # -- httptools callbacks -----------------------------------------------------------

    def on_message_begin(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():  # a second answer to one request
            self.abort()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._headers_done:  # after them: a chunked body's trailers, not headers
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max:
            self._fail(AnswerTooLarge(f"answer larger than {self._max} bytes"))
        elif self._waiter is not None and not self._waiter.done():
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:  # noqa: PLR2004  # 1xx: interim, the answer follows
            self._headers = []
            self._headers_done = False
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._finish()

    # -- the exchange ------------------------------------------------------------------

    async def exchange(self, request: bytes) -> Response:
        """Send ``request`` (head and body); the complete answer.

        Raises:
            ExchangeFailed: the connection broke, or the answer was unreadable or too large.
        """
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        self._headers, self._body, self._size, self._received = [], [], 0, 0
        self._headers_done = False
        self._keep_alive = False
        self.transport.write(request)  # type: ignore[union-attr]  # connected
        return await waiter

    def reusable(self) -> bool:
        """Whether the last exchange ended cleanly with keep-alive on an open connection."""
        return self.usable and self._keep_alive and not self.transport.is_closing()  # type: ignore[union-attr]

    def close(self) -> None:
        """Close politely (TLS close_notify) after what is buffered is sent.

        An exchange under way fails now: our own close must not end a body read until
        the server closes.
        """
        self.usable = False
        self._settle(ExchangeFailed("the HTTP pool was closed before the whole answer"))
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (no TLS close): it will not be used again."""
        self.usable = False
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: ExchangeFailed) -> None:
        self.abort()
        self._settle(exc)

    def _settle(self, exc: ExchangeFailed) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def _finish(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self._status, self._headers, b"".join(self._body)))
        # The answer owns its headers: whatever the parser reads next (a second answer in
        # the same packet, before the connection is dropped) goes elsewhere.
        self._headers = []

    def _close_delimited(self) -> bool:
        for name, _ in self._headers:
            if name.lower() in (b"content-length", b"transfer-encoding"):
                return False
        return True


class HttpPool:
    """HTTP/1.1 keep-alive connections to one origin, at most ``size`` of them.

    Use it as ``async with HttpPool("https://host", size=32, timeout=10, tls=ctx) as http:
    answer = await http.request("POST", "/path?q=1", headers, body)``. Safe to share
    between tasks: each exchange has a connection of its own.

    Args:
        origin: ``http://host[:port]`` or ``https://host[:port]``; a path is ignored.
        size: connections open at most; callers beyond wait first come, first served.
        timeout: seconds for one :meth:`request`, from its call to the answer's last byte.
        tls: the client context for ``https://`` (its verification is used as it is).
        max_answer: bytes of an answer's body at most.
        user_agent: the ``User-Agent`` header.
        keepalive: seconds an idle connection is reused for, at most.
    """

    def __init__(
        self,
        origin: str,
        *,
        size: int,
        timeout: float,
        tls: ssl.SSLContext | None = None,
        max_answer: int = MAX_ANSWER,
        user_agent: str = USER_AGENT,
        keepalive: float = KEEPALIVE,
    ) -> None:
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            msg = f"not an http:// or https:// URL: {origin!r}"
            raise ValueError(msg)
        self.host = parts.hostname
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self._ssl = (tls or _default_context()) if parts.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None and parts.port != _DEFAULT_PORTS[parts.scheme]:
            host = f"{host}:{parts.port}"
        self._fixed = f" HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\n"
        self._timeout = timeout
        self._max = max_answer
        self._slots = asyncio.Semaphore(size)
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self._closed = False
        self._keepalive = keepalive

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection (an exchange under way fails); the pool cannot be used after."""
        self._closed = True
        self._idle.clear()
        connections = list(self._open)
        for conn in connections:
            conn.close()
        if connections:
            await asyncio.wait([c.lost for c in connections], timeout=_CLOSE_WAIT)
            for conn in connections:
                if not conn.lost.done():
                    conn.abort()  # the peer never finished the TLS close

    async def request(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Response:
        """One exchange: ``method target`` with ``headers`` and ``body``; the whole answer.

        Args:
            method: ``GET``, ``POST``, ... (not ``HEAD``).
            target: the path and query, already percent-encoded (``/a/b?x=1``).
            headers: sent as given, after ``Host``, ``User-Agent`` and ``Content-Length``
                (which they must not repeat).
            body: the request body.

        Raises:
            TimeoutError: no whole answer within the pool's timeout (the exchange may
                have reached the server).
            CertificateFailed: the server's certificate was not trusted; nothing was sent.
            ConnectFailed: no connection could be made; nothing was sent.
            ExchangeFailed: the connection broke, or the answer was unreadable or larger
                than ``max_answer`` (the server may have acted on the request).
            ValueError: a header name or value holds a line break or a character beyond
                Latin-1 (nothing was sent; the message shows none of them).
        """
        if self._closed:
            msg = "the HTTP pool is closed"
            raise RuntimeError(msg)
        request = self._head(method, target, headers, body) + body
        async with asyncio.timeout(self._timeout), self._slots:
            if self._closed:  # closed while this caller waited for a slot: connect no more
                msg = "the HTTP pool is closed"
                raise RuntimeError(msg)
            conn = await self._connection()
            clean = False
            try:
                response = await conn.exchange(request)
                clean = conn.reusable()
            finally:
                if clean and not self._closed:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
                else:
                    conn.abort()  # the exchange did not end cleanly
        encoding = response.header("content-encoding") if response.body else None
        if encoding is not None and encoding.lower() != "identity":
            response.body = _decode(encoding, response.body, self._max)
        return response

    def _head(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> bytes:
        if method == "HEAD":
            msg = "HEAD requests are not supported"
            raise ValueError(msg)
        lines = [method, " ", target, self._fixed]
        ends = 4  # the request line, Host, User-Agent, the blank line
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}\r\n")
            ends += 1
        for name, value in headers.items():
            lines += (name, ": ", value, "\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        # As many line ends as lines: no header smuggled another in (values are secrets:
        # the message names none).
        ends += len(headers)
        if head.count("\n") != ends or head.count("\r") != ends:
            msg = "a header name or value, or the target, holds a line break"
            raise ValueError(msg)
        try:
            return head.encode("latin-1")
        except UnicodeEncodeError:
            pass  # raised below, outside this block: this error's repr holds the whole head
        msg = "a header name or value, or the target, is not Latin-1"
        raise ValueError(msg)

    async def _connection(self) -> _Connection:
        """An idle connection still open, else a new one (a slot is held: one may be opened)."""
        idle = self._idle
        if idle:
            expired = time.monotonic() - self._keepalive
            while idle:
                conn = idle.pop()  # the most recently used: the least likely to be closed
                if conn.idle_since <= expired:
                    # Dropped, not closed politely: a TLS peer that never answers our
                    # close_notify would keep it open (beyond ``size``) for 30 s.
                    conn.abort()
                elif conn.usable and not conn.transport.is_closing():  # type: ignore[union-attr]
                    return conn
        loop = asyncio.get_running_loop()
        lost = loop.create_future()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self._max, lost),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
            )
        except ssl.SSLCertVerificationError as exc:
            raise CertificateFailed(exc) from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS handshake
            raise ConnectFailed(exc) from exc
        self._open.add(conn)
        lost.add_done_callback(lambda _: self._open.discard(conn))
        if self._closed:
            conn.close()
            msg = "the HTTP pool is closed"
            raise RuntimeError(msg)
        return conn


def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _decode(encoding: str, body: bytes, limit: int) -> bytes:
    """``body`` decoded from ``gzip`` or ``deflate`` (at most ``limit`` bytes)."""
    match encoding.strip().lower():
        case "gzip" | "x-gzip":
            decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        case "deflate":  # zlib-wrapped as the RFC says; raw deflate as some servers send
            wbits = zlib.MAX_WBITS if body[:1] == b"\x78" else -zlib.MAX_WBITS
            decoder = zlib.decompressobj(wbits=wbits)
        case _:
            msg = f"answer in Content-Encoding {encoding!r}, which this client does not decode"
            raise ExchangeFailed(msg)
    try:
        out = decoder.decompress(body, limit + 1)
    except zlib.error as exc:
        msg = f"answer in Content-Encoding {encoding!r} does not decode: {exc}"
        raise ExchangeFailed(msg) from exc
    if len(out) > limit:
        msg = f"answer larger than {limit} bytes once decoded"
        raise AnswerTooLarge(msg)
    if not decoder.eof or decoder.unused_data:
        what = "is cut short" if not decoder.eof else "has bytes after its end"
        msg = f"answer in Content-Encoding {encoding!r} does not decode: the stream {what}"
        raise ExchangeFailed(msg)
    return out
