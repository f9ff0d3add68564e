"""Running the emulator: on a port in-process (tests, demo) or as ``pipeline dps-emulator``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, Any, Self

import yarl
from aiohttp import web

from pipeline.dps.emulator.app import build_app
from pipeline.dps.emulator.state import EmulatorState, load_devices
from pipeline.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from types import TracebackType

__all__ = ["RunningEmulator", "serve", "start_emulator"]

log = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT = 2.0


class RunningEmulator:
    """An emulator serving on a port: its base URL, its state, and how to stop it."""

    def __init__(self, runner: web.AppRunner, state: EmulatorState, url: str) -> None:
        self._runner = runner
        self.state = state
        self.url = url
        """The base URL, e.g. ``http://127.0.0.1:54321``: use it as ``dps.base_url``."""

    async def close(self) -> None:
        """Stop serving; calls in flight get a short grace period."""
        await self._runner.cleanup()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def start_emulator(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    app_key: str = "demo-app-key",
    app_secret: str = "demo-app-secret",  # noqa: S107  (the documented demo credential)
    devices: Iterable[Mapping[str, Any]] | None = None,
    accept_any_sn: bool = False,
    token_ttl: int = 7200,
) -> RunningEmulator:
    """Start an emulator on ``host:port`` (0 picks a free port) and return once it listens.

    Raises:
        ValueError: an entry of ``devices`` is not a valid :class:`DeviceSpec`.
        OSError: the address cannot be bound.
    """
    state = EmulatorState(
        app_key=app_key,
        app_secret=app_secret,
        token_ttl=token_ttl,
        devices=devices,
        accept_any_sn=accept_any_sn,
    )
    # handler_cancellation: a caller that closes its connection cancels the request's
    # handler, which is how the ledger learns it left (a hung call then ends).
    runner = web.AppRunner(
        build_app(state),
        access_log=None,
        shutdown_timeout=_SHUTDOWN_TIMEOUT,
        handler_cancellation=True,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1]
    url = str(yarl.URL.build(scheme="http", host=host, port=bound))
    return RunningEmulator(runner, state, url)


async def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8085,
    devices_file: str | None = None,
    accept_any_sn: bool = False,
    app_key: str = "demo-app-key",
    app_secret: str = "demo-app-secret",  # noqa: S107  (the documented demo credential)
    token_ttl: int = 7200,
) -> int:
    """Serve the emulator until cancelled or sent SIGTERM/SIGINT (``pipeline dps-emulator``).

    Returns:
        0 after a clean stop; 2 when the devices file is unusable (logged as an error).
    """
    devices = None
    if devices_file is not None:
        try:
            devices = load_devices(devices_file)
        except InputError as exc:
            log.error("%s", exc)  # noqa: TRY400  (one line for the operator, no traceback)
            return 2
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
            installed.append(signum)
    try:
        async with await start_emulator(
            host=host,
            port=port,
            app_key=app_key,
            app_secret=app_secret,
            devices=devices,
            accept_any_sn=accept_any_sn,
            token_ttl=token_ttl,
        ) as emulator:
            log.info("emulator listening on %s", emulator.url)
            log.info(
                "%d devices registered%s",
                len(emulator.state.devices),
                "; unknown sns are registered on first sight" if accept_any_sn else "",
            )
            await stop.wait()
            log.info("emulator stopping")
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return 0
