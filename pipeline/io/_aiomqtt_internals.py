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
    from collections.abc import Callable

    import aiomqtt
    import paho.mqtt.client as paho

__all__ = ["Reader", "os_error_behind", "paho_client", "pausable", "put_reader", "take_reader"]


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


def put_reader(loop: asyncio.AbstractEventLoop, fd: int, reader: Reader) -> None:
    """Register again a reader :func:`take_reader` took (public asyncio: ``add_reader``)."""
    callback, args = reader
    loop.add_reader(fd, callback, *args)
