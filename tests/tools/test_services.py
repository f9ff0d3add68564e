"""The free ports the tools and the tests give their servers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline.tools import services


def test_free_ports_are_outside_the_ephemeral_range() -> None:
    """No outgoing connection can take a port a server is about to bind or re-bind."""
    low, high = services._ephemeral_range()
    ports = {services.free_port() for _ in range(50)}
    assert all(10_000 <= p < low or high < p <= 65_535 for p in ports), sorted(ports)
    assert len(ports) > 1
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """With one port left outside the range, and it taken, the caller is told so."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        monkeypatch.setattr(services, "_LOWEST", port)
        monkeypatch.setattr(services, "_ephemeral_range", lambda: (port + 1, 65_535))
        with pytest.raises(RuntimeError, match=f"outside the ephemeral range {port + 1}-65535"):
            services.free_port()


async def test_a_broker_whose_port_was_taken_starts_again_on_another(tmp_path: Path) -> None:
    """A free port can be taken before a broker binds it: the broker gets a fresh one."""
    ports: list[int] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def broker(attempt: int) -> services.LocalMosquitto:
            ports.append(port if attempt == 1 else services.free_port())
            made.append(services.LocalMosquitto(tmp_path / f"try-{attempt}", ports[-1]))
            return made[-1]

        made: list[services.LocalMosquitto] = []
        try:
            await services.start_bound(broker)
            assert await made[-1].answers()
        finally:
            for m in made:
                m.stop()
    assert len(made) == 2
    assert ports[0] == port != ports[1]


async def test_a_broker_that_cannot_bind_says_so_in_its_words(tmp_path: Path) -> None:
    """Every time taken: the error names the port and why, not a log file deleted since."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        made: list[services.LocalMosquitto] = []

        def broker(attempt: int) -> services.LocalMosquitto:
            made.append(services.LocalMosquitto(tmp_path / f"try-{attempt}", port))
            return made[-1]

        with pytest.raises(services.PortTakenError, match=f"127.0.0.1:{port}: taken after"):
            await services.start_bound(broker, tries=2)
    assert len(made) == 2
