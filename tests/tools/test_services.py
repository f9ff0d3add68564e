"""The free ports the tools and the tests give their servers."""

from __future__ import annotations

import socket

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
