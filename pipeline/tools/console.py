"""The rich Console every command prints through, so that its tables come out whole."""

from __future__ import annotations

from typing import IO

from rich.console import Console

__all__ = ["PIPE_WIDTH", "make_console"]

PIPE_WIDTH = 10_000
"""Columns a Console assumes off a terminal: more than any table the commands draw."""


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """A Console on stdout, on stderr, or on ``file``.

    Off a terminal (a pipe, a log file, CI) rich assumes 80 columns, or ``$COLUMNS``, and
    squeezes a wider table into them, cutting its cells ("[5,109-5,71…"). Such a stream
    has no width to fit, so it gets :data:`PIPE_WIDTH`: a table takes only the columns it
    needs and no cell is cut. On a terminal rich keeps the terminal's width.

    Args:
        stderr: write to stderr instead of stdout.
        file: write to this stream instead (tests); it wins over ``stderr``.

    Returns:
        The Console.
    """
    console = Console(stderr=stderr, file=file)
    if not console.is_terminal:
        console.width = PIPE_WIDTH
    return console
