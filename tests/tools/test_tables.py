"""Tables printed off a terminal (a pipe, a log, CI) come out whole: no cell is cut."""

from __future__ import annotations

import io
from typing import Any

from rich.table import Table

from pipeline.tools import status
from pipeline.tools.console import PIPE_WIDTH, make_console

# Wider than rich's 80-column fallback, in cells that have no space to wrap at.
RANGES = [f"[{n:,}-{n + 601:,}]" for n in range(5_109, 5_109 + 9 * 1_000, 1_000)]
LONG = "x" * 150


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _render(*renderables: Any) -> str:
    out = io.StringIO()
    console = make_console(file=out)
    for renderable in renderables:
        console.print(renderable)
    return out.getvalue()


def test_a_wide_table_is_whole_off_a_terminal() -> None:
    table = Table(title="wide")
    for i in range(len(RANGES)):
        table.add_column(f"round {i}")
    table.add_column("note")
    table.add_row(*RANGES, LONG)
    text = _render(table)
    assert "…" not in text
    for value in [*RANGES, LONG]:
        assert value in text
    assert max(map(len, text.splitlines())) > 80
    # A table takes only the columns it needs, however wide the Console.
    assert max(map(len, text.splitlines())) < 400


def test_stderr_and_stdout_consoles_are_wide_off_a_terminal() -> None:
    # pytest captures both streams, so neither is a terminal here.
    assert make_console().width == PIPE_WIDTH
    assert make_console(stderr=True).width == PIPE_WIDTH


def test_a_terminal_keeps_its_width() -> None:
    console = make_console(file=_Tty())
    assert console.is_terminal
    assert console.width != PIPE_WIDTH


def test_a_workers_own_words_are_printed_as_they_are() -> None:
    # A /readyz detail (a worker's, DPS's words) with brackets is text, not rich markup.
    detail = "DPS code 1003 [signature] (check [bold]sink.dps.app_secret[/bold])"
    table = status._health_table(
        {"http://127.0.0.1:9103": {"ready": False, "checks": {"sink.dps": False},
                                   "details": {"sink.dps": detail}}}
    )  # fmt: skip
    assert detail in _render(table)
