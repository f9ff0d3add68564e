"""The DPS client's HTTP pool against real local asyncio servers (no mock of a socket)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import struct
import threading
from typing import TYPE_CHECKING

import pytest

from pipeline.config import DpsConfig
from pipeline.dps.client import DpsClient
from pipeline.dps.protocol import TLS_HINT
from pipeline.errors import DpsTransient
from pipeline.io.http import (
    MAX_HEAD,
    AnswerTooLarge,
    CertificateFailed,
    ConnectFailed,
    ExchangeFailed,
    HttpPool,
)
from pipeline.schemas import AllocateRequest
from tests.harness import make_certs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable
    from pathlib import Path

pytestmark = pytest.mark.timeout(30)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Request:
    def __init__(self, line: str, headers: dict[str, str], body: bytes) -> None:
        self.line = line
        self.headers = headers
        self.body = body


class Connection:
    """One accepted connection: its number and whether the client has closed it."""

    def __init__(self, number: int, reader: asyncio.StreamReader) -> None:
        self.number = number
        self.reader = reader
        self.closed = asyncio.Event()

    async def until_closed(self) -> bool:
        """Wait for the client to close the connection (never answering)."""
        await self.reader.read()
        return False


class Server:
    """A local HTTP/1.1 server whose answers the test writes byte for byte.

    ``answer(request, writer, connection)`` writes the answer and returns whether to keep
    the connection open for another request.
    """

    def __init__(self, answer: Callable[..., Awaitable[bool]]) -> None:
        self.answer = answer
        self.connections: list[Connection] = []
        self.requests: list[Request] = []
        self.open = 0
        self.max_open = 0
        self.received = asyncio.Condition()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, tls: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def wait_requests(self, count: int) -> None:
        async with self.received:
            await self.received.wait_for(lambda: len(self.requests) >= count)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(len(self.connections), reader)
        self._writers.add(writer)
        self.connections.append(conn)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                line, *fields = head.decode("latin-1").split("\r\n")[:-2]
                headers = dict(f.split(": ", 1) for f in fields)
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                request = Request(line, headers, body)
                async with self.received:
                    self.requests.append(request)
                    self.received.notify_all()
                if not await self.answer(request, writer, conn):
                    break
        finally:
            self.open -= 1
            conn.closed.set()
            writer.close()
            self._writers.discard(writer)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(answer, tls: ssl.SSLContext | None = None) -> Server:
        server = Server(answer)
        await server.start(tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def canned(data: bytes, *, keep: bool = True):
    async def answer(_request, writer, _conn) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return answer


def pool(server: Server, **kwargs) -> HttpPool:
    return HttpPool(f"http://127.0.0.1:{server.port}", **({"size": 4, "timeout": 5} | kwargs))


async def test_the_request_carries_host_length_agent_and_the_callers_headers(serve):
    server = await serve(canned(OK))
    async with pool(server) as http:
        await http.request("POST", "/a/b?c=%20d", {"X-Token": "secret"}, b'{"sn":"1"}')
        await http.request("GET", "/g", {})
    post, get = server.requests
    assert post.line == "POST /a/b?c=%20d HTTP/1.1"
    assert post.headers == {
        "Host": f"127.0.0.1:{server.port}",
        "User-Agent": "iot-pipeline",
        "Content-Length": "10",
        "X-Token": "secret",
    }
    assert post.body == b'{"sn":"1"}'
    # A GET without a body says nothing of its length; no encoding is offered.
    assert get.headers == {"Host": f"127.0.0.1:{server.port}", "User-Agent": "iot-pipeline"}


def test_the_host_header_names_a_port_only_when_not_the_default():
    assert HttpPool("https://gw.example", size=1, timeout=1)._fixed == (
        " HTTP/1.1\r\nHost: gw.example\r\nUser-Agent: iot-pipeline\r\n"
    )
    assert (
        "Host: gw.example:8443\r\n" in HttpPool("https://gw.example:8443", size=1, timeout=1)._fixed
    )
    assert "Host: [::1]:8080\r\n" in HttpPool("http://[::1]:8080", size=1, timeout=1)._fixed
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        HttpPool("ftp://gw.example", size=1, timeout=1)


@pytest.mark.parametrize(
    ("value", "says"),
    [("s3cret\r\nX-Evil: 1", "holds a line break"), ("s3cret\u0100", "not Latin-1")],
)
async def test_a_header_that_cannot_be_sent_is_refused_and_not_shown(serve, value, says):
    # The sink dead-letters an unexpected error with its repr: a UnicodeEncodeError's
    # repr holds the whole request head, the signature and access token among it.
    server = await serve(canned(OK))
    async with pool(server) as http:
        with pytest.raises(ValueError, match=says) as caught:
            await http.request("GET", "/", {"apim-signature": value})
        assert "s3cret" not in repr(caught.value)
        assert "s3cret" not in repr(caught.value.__cause__)
        assert "s3cret" not in repr(caught.value.__context__)
        await http.request("GET", "/", {})
    assert len(server.requests) == 1


async def test_an_idle_connection_the_server_closed_is_not_used(serve):
    server = await serve(canned(OK, keep=False))  # answers, then closes without saying so
    async with pool(server) as http:
        await http.request("GET", "/1", {})
        await server.connections[0].closed.wait()
        (idle,) = http._idle  # kept: the answer did not say the connection would close
        await idle.lost  # the client noticed the server's close
        answer = await http.request("GET", "/2", {})
    assert answer.body == b"ok"
    assert len(server.connections) == 2


async def test_a_connection_idle_longer_than_keepalive_is_closed_not_reused(serve):
    server = await serve(canned(OK))
    async with pool(server, keepalive=0) as http:
        await http.request("GET", "/1", {})
        await http.request("GET", "/2", {})
        await server.connections[0].closed.wait()
    assert len(server.connections) == 2


async def test_connection_close_and_http_1_0_answers_are_not_reused(serve):
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            OK,
        ]
    )

    async def answer(_request, writer, _conn) -> bool:
        writer.write(next(answers))
        return True  # the server would go on: the client must close on its own

    server = await serve(answer)
    async with pool(server) as http:
        for _ in range(3):
            assert (await http.request("GET", "/", {})).body == b"ok"
        await server.connections[0].closed.wait()
        await server.connections[1].closed.wait()
    assert len(server.connections) == 3


async def test_the_pool_limit_holds_at_the_server_and_callers_wait_in_turn(serve):
    release = asyncio.Event()

    async def answer(_request, writer, _conn) -> bool:
        await release.wait()
        writer.write(OK)
        return True

    server = await serve(answer)
    async with pool(server, size=2) as http:
        calls = [asyncio.create_task(http.request("GET", f"/{i}", {})) for i in range(6)]
        await server.wait_requests(2)
        release.set()
        answers = await asyncio.gather(*calls)
    assert [a.body for a in answers] == [b"ok"] * 6
    assert (len(server.connections), server.max_open) == (2, 2)
    lines = [r.line for r in server.requests]
    # The first two open a connection each, side by side: which request arrives first is
    # the connects' race (uvloop's and asyncio's differ). The four that waited for a slot
    # go out in the order they asked.
    assert set(lines[:2]) == {"GET /0 HTTP/1.1", "GET /1 HTTP/1.1"}
    assert lines[2:] == [f"GET /{i} HTTP/1.1" for i in range(2, 6)]


async def test_closing_the_pool_fails_an_exchange_under_way_and_says_so(serve):
    async def answer(_request, writer, conn: Connection) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart of a body read until the server closes")
        return await conn.until_closed()

    server = await serve(answer)
    http = pool(server)
    call = asyncio.create_task(http.request("GET", "/", {}))
    await server.wait_requests(1)
    await http.close()
    with pytest.raises(ExchangeFailed, match="the HTTP pool was closed before the whole answer"):
        await call
    await server.connections[0].closed.wait()


async def test_a_caller_waiting_for_a_slot_when_the_pool_closes_opens_no_connection(serve):
    async def answer(_request, _writer, conn: Connection) -> bool:
        return await conn.until_closed()

    server = await serve(answer)
    http = pool(server, size=1)
    first = asyncio.create_task(http.request("GET", "/1", {}))
    await server.wait_requests(1)
    second = asyncio.create_task(http.request("GET", "/2", {}))
    await asyncio.sleep(0)  # the second caller now waits for the one slot
    await http.close()
    with pytest.raises(ExchangeFailed):
        await first
    with pytest.raises(RuntimeError, match="the HTTP pool is closed"):
        await second
    assert len(server.connections) == 1


async def test_a_timeout_closes_the_connection(serve):
    async def answer(request, writer, conn: Connection) -> bool:
        if request.line.startswith("GET /hang"):
            return await conn.until_closed()
        writer.write(OK)
        return True

    server = await serve(answer)
    async with pool(server, timeout=0.2) as http:
        with pytest.raises(TimeoutError):
            await http.request("GET", "/hang", {})
        await server.connections[0].closed.wait()  # dropped, not kept for the late answer
        assert (await http.request("GET", "/next", {})).body == b"ok"
    assert len(server.connections) == 2


async def test_a_cancelled_caller_leaves_no_connection_nor_task(serve):
    async def answer(_request, _writer, conn: Connection) -> bool:
        return await conn.until_closed()

    server = await serve(answer)
    async with pool(server) as http:
        call = asyncio.create_task(http.request("GET", "/", {}))
        await server.wait_requests(1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await server.connections[0].closed.wait()
        assert (list(http._idle), http._slots._value) == ([], 4)
        assert asyncio.all_tasks() == {asyncio.current_task()}


@pytest.mark.parametrize(
    ("data", "body"),
    [
        (OK, b"ok"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
            b"abcdefg",
        ),
        (
            (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nabcdefg"
            ),
            b"abcdefg",
        ),
    ],
    ids=["content-length", "chunked", "interim answers"],
)
async def test_a_connection_is_kept_alive_and_reused(serve, data, body):
    """Whatever frames the answer, the connection is kept for the next request."""
    server = await serve(canned(data))
    async with pool(server) as http:
        for _ in range(3):
            answer = await http.request("GET", "/x", {})
            assert (answer.status, answer.body) == (200, body)
    assert len(server.connections) == 1


async def test_a_body_read_until_the_server_closes(serve):
    server = await serve(
        canned(b"HTTP/1.1 200 OK\r\nRetry-After: 7\r\n\r\nuntil the end", keep=False)
    )
    async with pool(server) as http:
        answer = await http.request("GET", "/", {})
        assert (answer.body, answer.header("retry-after")) == (b"until the end", "7")
        assert list(http._idle) == []


async def test_a_body_read_until_the_server_closes_fails_if_the_connection_is_reset(serve):
    # Only a clean close ends such a body: a reset may have cut it anywhere.
    async def answer(_request, writer, _conn) -> bool:
        writer.write(b'HTTP/1.1 200 OK\r\n\r\n{"code":0,"da')
        await writer.drain()
        linger = struct.pack("ii", 1, 0)  # close with a reset (RST), not a FIN
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.transport.abort()
        return False

    server = await serve(answer)
    async with pool(server) as http:
        with pytest.raises(ExchangeFailed, match="connection lost before the whole answer"):
            await http.request("GET", "/", {})


async def test_an_answer_cut_short_fails(serve):
    server = await serve(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", keep=False))
    async with pool(server) as http:
        with pytest.raises(ExchangeFailed, match="closed the connection before the whole answer"):
            await http.request("GET", "/", {})


async def test_an_oversize_answer_is_refused_and_its_connection_dropped(serve):
    server = await serve(canned(b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000))
    async with pool(server, max_answer=1000) as http:
        with pytest.raises(AnswerTooLarge, match="answer larger than 1000 bytes"):
            await http.request("GET", "/", {})
        await server.connections[0].closed.wait()
        assert list(http._idle) == []


async def test_endless_headers_are_refused_and_their_connection_dropped(serve):
    async def answer(_request, writer, _conn) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Junk: ")
        try:
            while True:  # until the client drops the connection
                writer.write(b"j" * 65536)
                await writer.drain()
        except ConnectionError:
            return False

    server = await serve(answer)
    async with pool(server, max_answer=1000) as http:
        with pytest.raises(AnswerTooLarge, match=f"answer larger than {1000 + MAX_HEAD} bytes"):
            await http.request("GET", "/", {})
        await server.connections[0].closed.wait()


async def test_gzip_is_decoded_and_an_unknown_encoding_refused(serve):
    packed = gzip.compress(b"hello " * 100)
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(packed), packed),
            b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(packed), packed),
        ]
    )

    async def answer(_request, writer, _conn) -> bool:
        writer.write(next(answers))
        return True

    server = await serve(answer)
    async with pool(server, max_answer=600) as http:
        assert (await http.request("GET", "/", {})).body == b"hello " * 100
        with pytest.raises(ExchangeFailed, match="Content-Encoding 'br', which this client"):
            await http.request("GET", "/", {})
    async with pool(server, max_answer=599) as http:
        with pytest.raises(AnswerTooLarge, match="larger than 599 bytes once decoded"):
            await http.request("GET", "/", {})


@pytest.mark.parametrize(
    "packed",
    [gzip.compress(b"hello " * 100)[:-12], gzip.compress(b"hello") + b"junk"],
    ids=["cut short", "followed by junk"],
)
async def test_a_gzip_body_that_is_not_exactly_one_whole_stream_fails(serve, packed):
    server = await serve(
        canned(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
            % (len(packed), packed)
        )
    )
    async with pool(server) as http:
        with pytest.raises(ExchangeFailed, match="Content-Encoding 'gzip' does not decode"):
            await http.request("GET", "/", {})


async def test_an_empty_body_in_gzip_is_empty(serve):
    server = await serve(canned(b"HTTP/1.1 204 No Content\r\nContent-Encoding: gzip\r\n\r\n"))
    async with pool(server) as http:
        answer = await http.request("GET", "/", {})
        assert (answer.status, answer.body) == (204, b"")


async def test_bytes_nobody_asked_for_drop_the_connection(serve):
    async def answer(_request, writer, _conn) -> bool:
        writer.write(OK + b"HTTP/1.1 200 OK\r\n")  # a second answer to no request
        return True

    server = await serve(answer)
    async with pool(server) as http:
        await http.request("GET", "/", {})
        await server.connections[0].closed.wait()
        await http.request("GET", "/", {})
    assert len(server.connections) == 2


async def test_a_second_answer_in_the_same_packet_adds_nothing_to_the_first(serve):
    second = b"HTTP/1.1 503 No\r\nContent-Encoding: gzip\r\nRetry-After: 9\r\nContent-Length: 2\r\n\r\nno"
    server = await serve(canned(OK + second))
    async with pool(server) as http:
        answer = await http.request("GET", "/", {})
        assert (answer.status, answer.headers, answer.body) == (
            200,
            [(b"Content-Length", b"2")],
            b"ok",
        )
        await server.connections[0].closed.wait()


async def test_chunked_trailers_are_not_taken_for_headers(serve):
    server = await serve(
        canned(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\nContent-Encoding: gzip\r\n\r\n"
        )
    )
    async with pool(server) as http:
        answer = await http.request("GET", "/", {})
        assert (answer.headers, answer.body) == ([(b"Transfer-Encoding", b"chunked")], b"ok")


async def test_an_unreadable_answer_fails_and_drops_the_connection(serve):
    server = await serve(canned(b"SPDY/3 200 OK\r\n\r\n"))
    async with pool(server) as http:
        with pytest.raises(ExchangeFailed, match="unreadable answer"):
            await http.request("GET", "/", {})
        await server.connections[0].closed.wait()


async def test_connection_refused():
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with HttpPool(f"http://127.0.0.1:{port}", size=1, timeout=5) as http:
        with pytest.raises(ConnectFailed) as caught:
            await http.request("GET", "/", {})
    assert isinstance(caught.value.os_error, ConnectionRefusedError)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


def server_tls(certs) -> ssl.SSLContext:
    _, cert, key = certs
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def test_tls_with_the_trusted_ca(serve, certs):
    server = await serve(canned(OK), tls=server_tls(certs))
    trusted = ssl.create_default_context(cafile=certs[0])
    async with HttpPool(f"https://127.0.0.1:{server.port}", size=1, timeout=5, tls=trusted) as http:
        for _ in range(2):
            assert (await http.request("GET", "/", {})).body == b"ok"
    assert len(server.connections) == 1


async def test_an_expired_idle_tls_connection_is_dropped_at_once(certs):
    # Closed politely, a TLS connection stays open until the peer answers close_notify,
    # up to asyncio's 30 s TLS shutdown timeout: beyond the pool's size meanwhile.
    listener = socket.create_server(("127.0.0.1", 0))
    tls, stop = server_tls(certs), threading.Event()
    accepted: list[ssl.SSLSocket] = []

    def serve_without_reading_close_notify() -> None:
        for _ in range(2):
            conn = tls.wrap_socket(listener.accept()[0], server_side=True)
            accepted.append(conn)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += conn.recv(1)
            conn.sendall(OK)  # and never reads again
        stop.wait()

    thread = threading.Thread(target=serve_without_reading_close_notify)
    thread.start()
    trusted = ssl.create_default_context(cafile=certs[0])
    origin = f"https://127.0.0.1:{listener.getsockname()[1]}"
    try:
        async with HttpPool(origin, size=1, timeout=5, tls=trusted, keepalive=0) as http:
            await http.request("GET", "/1", {})
            (first,) = http._open
            await http.request("GET", "/2", {})  # the first has expired: a second is opened
            async with asyncio.timeout(10):
                await first.lost
            assert len(http._open) == 1
    finally:
        stop.set()
        await asyncio.to_thread(thread.join)
        for conn in accepted:
            conn.close()
        listener.close()


async def test_an_untrusted_certificate_fails_before_anything_is_sent(serve, certs):
    server = await serve(canned(OK), tls=server_tls(certs))
    async with HttpPool(
        f"https://127.0.0.1:{server.port}", size=1, timeout=5, tls=ssl.create_default_context()
    ) as http:
        with pytest.raises(CertificateFailed) as caught:
            await http.request("GET", "/", {})
    assert caught.value.reason == "unable to get local issuer certificate"
    assert server.requests == []


async def test_the_dps_client_says_to_check_the_ca_of_an_untrusted_gateway(serve, certs):
    server = await serve(canned(OK), tls=server_tls(certs))
    cfg = DpsConfig(base_url=f"https://127.0.0.1:{server.port}", timeout=5.0)
    async with DpsClient(cfg) as dps:
        with pytest.raises(DpsTransient) as caught:
            await dps.allocate("o1", AllocateRequest(sn="SN-1"))
    assert caught.value.msg == (
        f"token request: TLS certificate of 127.0.0.1:{server.port} not trusted: "
        "unable to get local issuer certificate"
    )
    assert caught.value.hint == TLS_HINT
