"""Where the pipeline reaches into aiomqtt (and the event loop under it): here and only here.

aiomqtt 2.x wraps a paho-mqtt client and reads its socket with an event-loop reader;
paho's client has what the pipeline needs and aiomqtt does not pass on (manual
acknowledgement, DISCONNECT with properties, its message callback, its socket). Each
function is one reach-in: what the public API lacks, what would remove it, and the
versions it was checked against. ``tests/io/test_internals.py`` asserts each of them
without a broker, so an upgrade that moves one fails there, naming the reach-in,
instead of misbehaving at run time.

Checked against aiomqtt 2.5.1, paho-mqtt 2.2.0 and CPython 3.11's asyncio. (aiomqtt's
main branch is a 3.0 rewrite without paho: pyproject pins 2.x.)
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable

    import aiomqtt
    import paho.mqtt.client as paho

__all__ = [
    "BufferedSocket",
    "Reader",
    "buffer_reads",
    "os_error_behind",
    "paho_client",
    "pausable",
    "put_reader",
    "queue_packets",
    "take_reader",
]


def paho_client(client: aiomqtt.Client) -> paho.Client:
    """The paho-mqtt client an aiomqtt client wraps (``aiomqtt.Client._client``).

    Why: aiomqtt 2.x passes on neither paho's manual acknowledgement
    (``manual_ack_set``, ``ack``: PUBACK once a message is safe, not on receipt) nor
    DISCONNECT with properties (MQTT 5 session expiry 0: the broker drops the session),
    nor a hook on each message received, nor the socket; only paho's public API is used
    on the client returned.

    What would remove it: application-controlled acknowledgements in aiomqtt
    (empicano/aiomqtt#345, draft PR #346), and a ``disconnect(properties=...)``; the
    intake limit also needs a pause in aiomqtt (see :func:`take_reader`).
    """
    return client._client  # noqa: SLF001


def queue_packets(paho: paho.Client, command: int, data: bytes) -> None:
    """Queue ``data``, whole MQTT packets of type ``command``, to be written as one.

    Why: paho writes each packet it queues with a socket ``send`` of its own
    (``Client._packet_write``), so acknowledging a run of messages one ``ack`` at a time
    costs a system call (and a wake-up of the broker) per PUBACK, and paho's own Python
    per packet (a log call, a dict, a write registration). ``Client._packet_queue`` takes
    any bytes as one packet, in order with everything else paho queues (PINGREQ,
    SUBSCRIBE), and writes a partial write's rest later; only the command's type is read
    back (on-publish callbacks for QoS 0 PUBLISH, DISCONNECT): a run of PUBACKs is neither.

    What would remove it: paho writing what it has queued with one ``send`` (or a
    ``sendmsg`` of all of it), or an ``ack`` of many messages.
    """
    paho._packet_queue(command, data, 0, 1)  # noqa: SLF001


def os_error_behind(exc: aiomqtt.MqttError) -> OSError | None:
    """The socket error behind aiomqtt's failure to connect, if that is what it was.

    Why: aiomqtt's ``__aenter__`` turns the OSError of paho's ``connect()`` (connection
    refused, host not found) into ``MqttError(str(exc)) from None``: the error is kept
    only as the implicit ``__context__``, and as text. Deciding on that text ("Errno",
    "Connection refused") breaks with a new wording; this reads the type.

    What would remove it: aiomqtt raising ``from exc`` (or an ``MqttError`` subclass for
    connection failures).
    """
    context = exc.__context__
    return context if isinstance(context, OSError) else None


Reader = tuple["Callable[..., object]", tuple[object, ...]]
"""An event-loop reader: its callback and arguments, for ``loop.add_reader(fd, cb, *args)``."""


def pausable(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether :func:`take_reader` can work on ``loop`` (a selector loop; not uvloop)."""
    return getattr(loop, "_selector", None) is not None


def take_reader(loop: asyncio.AbstractEventLoop, fd: int) -> Reader | None:
    """Remove the reader registered on ``fd`` and return it, to be put back later.

    Why: aiomqtt reads paho's socket with ``loop.add_reader(fd, callback)`` (its
    ``_on_socket_open``) and has no way to stop reading while messages wait; the intake
    limit removes that reader and restores it. asyncio has no public way to ask which
    callback a reader has: the selector loop's ``_selector`` maps the descriptor to its
    ``(reader, writer)`` handles, and a handle keeps ``_callback`` and ``_args``.

    What would remove it: a pause in aiomqtt (flow control on the socket, or a bounded
    queue that stops reading when full instead of dropping).

    Returns:
        The reader, or None when ``fd`` has none (closing) or ``loop`` is not
        :func:`pausable`.
    """
    selector: Any = getattr(loop, "_selector", None)
    if selector is None:
        return None
    try:
        handle = selector.get_key(fd).data[0]
    except (KeyError, ValueError):  # not registered (closing): nothing to take
        return None
    if handle is None:
        return None
    reader: Reader = (handle._callback, handle._args)  # noqa: SLF001  (removing cancels it)
    loop.remove_reader(fd)
    return reader


def put_reader(
    loop: asyncio.AbstractEventLoop, fd: int, reader: Reader, *, pending: int = 0
) -> None:
    """Register again a reader :func:`take_reader` took (public asyncio: ``add_reader``).

    ``pending``: bytes already read from the socket and not yet parsed
    (:meth:`BufferedSocket.pending`); the socket may have nothing more to say for a while,
    so the reader is also called now, to parse them.
    """
    callback, args = reader
    loop.add_reader(fd, callback, *args)
    if pending:
        loop.call_soon(callback, *args)


_CHUNK = 65536
"""Bytes read from the socket at once by :class:`BufferedSocket`."""


class BufferedSocket:
    """paho's socket, read a chunk at a time: paho's reads are served from the chunk.

    Everything but ``recv`` and ``pending`` is the socket's own (``__getattr__``).
    ``pending()`` counts the bytes read but not yet handed to paho, so aiomqtt's reader
    callback, which reads packets while the socket has ``pending`` bytes (its loop for
    TLS sockets), hands paho every whole packet of a chunk in one call. While ``held``
    (the intake limit paused), ``pending()`` says 0, so that loop stops.
    """

    __slots__ = ("_buffer", "_position", "_sock", "held")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""
        self._position = 0
        self.held = False

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes, from the chunk, or from the socket (its errors as its own)."""
        position = self._position
        if position >= len(self._buffer):
            data: bytes = self._sock.recv(max(size, _CHUNK))
            if len(data) <= size:
                return data
            self._buffer, position = data, 0
        end = position + size
        self._position = end
        return self._buffer[position:end]

    def pending(self) -> int:
        """Bytes read and not yet taken (0 while held), plus what TLS has decrypted."""
        if self.held:
            return 0
        inner = getattr(self._sock, "pending", None)
        return len(self._buffer) - self._position + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def buffer_reads(paho: paho.Client) -> BufferedSocket | None:
    """Have paho read its connected socket through a :class:`BufferedSocket`.

    Why: paho reads each packet with two or three ``recv`` calls (its type byte, its length
    bytes one by one, its body), and aiomqtt's reader callback has it read one packet per
    turn of the event loop (``loop_read()``'s ``max_packets`` is 1 for a subscriber), so
    every message costs three system calls and a turn of the loop. Read a chunk at a
    time, the packets of a chunk are parsed in one callback. ``Client._sock`` is where
    paho keeps the socket it reads and writes; ``_sock_recv`` only calls its ``recv``,
    the TLS ``pending`` check aiomqtt makes (``Client._on_socket_open``) drains the
    chunk, and the rest (``send``, ``fileno``, ``close``) passes through.

    What would remove it: paho reading into a buffer of its own (or ``loop_read`` reading
    until the socket would block).

    Returns:
        The wrapper, or None when paho has no socket (not connected).
    """
    sock = paho._sock  # noqa: SLF001
    if sock is None:
        return None
    if isinstance(sock, BufferedSocket):
        return sock
    buffered = BufferedSocket(sock)  # type: ignore[arg-type]
    paho._sock = buffered  # noqa: SLF001
    return buffered
