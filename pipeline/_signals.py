"""SIGTERM from the first moment a worker runs, before its event loop exists.

Python's default for SIGTERM ends the process at once, with no shutdown code and exit
status -15. An orchestrator may stop a worker at any moment, even while it is still
starting: :func:`hold` keeps the signal until the event loop takes over (the CLI's
``_stop_on_signals``), which then stops the worker the ordinary way (exit 0).
Importing this module does nothing; ``python -m pipeline`` calls :func:`hold` before
anything else is imported.
"""

from __future__ import annotations

import signal
import types

__all__ = ["hold", "received", "release"]

_RECEIVED: list[int] = []


def _keep(signum: int, _frame: types.FrameType | None) -> None:
    _RECEIVED.append(signum)


def hold() -> None:
    """From now until the event loop handles it, a SIGTERM is kept instead of fatal."""
    signal.signal(signal.SIGTERM, _keep)


def received() -> bool:
    """Whether a SIGTERM came while it was held."""
    return bool(_RECEIVED)


def release() -> None:
    """SIGTERM does what it does by default again; one that came meanwhile does it now."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _RECEIVED:
        signal.raise_signal(signal.SIGTERM)
