"""Search DPS Device in the emulator: the subset of FQL it understands, sorting and paging.

The V2.5 Search DPS Device page lists the searchable fields and their operators; the
emulator implements the ones a provisioning pipeline needs and refuses the rest with
99400 rather than answering something DPS would not:

- ``sn``: ``=``, ``IN``, ``LIKE`` (``%`` any run of characters, ``_`` one character);
- ``groupId``, ``regionId``, ``productKey``, ``status``: ``=`` and ``IN``;
  ``status`` is the device's ``status.currentStatus`` (``init``, ``allocated``, ...);
- terms joined by ``AND``. Keywords are case-insensitive; values are quoted with ``'``
  or ``"`` (the page gives no escape for a quote inside a value, so there is none).

Not implemented (99400): ``OR``, parentheses around terms, ``batchOrder``,
``createTime`` and ``deviceData.*``.

Sorting: the page says the default is ``createTime`` descending; devices registered in
the same millisecond come newest registration first. ``sorters`` may name ``sn``,
``groupId``, ``createTime``, ``updateTime`` or ``batchOrder``, ``ASC`` or ``DESC``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from pipeline.dps.emulator.state import EmulatedDevice
    from pipeline.schemas import Sorter

    Predicate = Callable[[EmulatedDevice], bool]

__all__ = ["SearchError", "matcher", "sort_devices"]


class SearchError(ValueError):
    """The expression or the sorters are outside what the emulator implements."""


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>'[^']*'|"[^"]*")
      | (?P<op>!=|<=|>=|=|<|>|\(|\)|,)
      | (?P<number>-?[0-9]+(?:\.[0-9]+)?)
      | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
      | (?P<bad>\S)
    )""",
    re.VERBOSE,
)

_FIELDS: dict[str, Callable[[EmulatedDevice], str | None]] = {
    "sn": lambda device: device.sn,
    "groupid": lambda device: device.group_id,
    "regionid": lambda device: device.region_id,
    "productkey": lambda device: device.product_key,
    "status": lambda device: device.current_status,
}
_LIKE_FIELDS = frozenset({"sn"})
_SORT_KEYS: dict[str, Callable[[EmulatedDevice], Any]] = {
    "sn": lambda device: device.sn,
    "groupid": lambda device: device.group_id or "",
    "createtime": lambda device: device.create_time,
    "updatetime": lambda device: device.update_time,
    "batchorder": lambda device: device.batch_order,
}


def _tokens(expression: str) -> list[tuple[str, str]]:
    tokens = []
    for found in _TOKEN.finditer(expression):
        kind = found.lastgroup
        if kind is None:  # trailing blanks
            continue
        text = found.group(kind)
        if kind == "bad":
            msg = f"unexpected character {text!r}"
            raise SearchError(msg)
        tokens.append((kind, text))
    return tokens


def _like(pattern: str) -> re.Pattern[str]:
    parts = (".*" if ch == "%" else "." if ch == "_" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.DOTALL)


class _Parser:
    def __init__(self, expression: str) -> None:
        self.tokens = _tokens(expression)
        self.at = 0

    def _next(self, what: str) -> tuple[str, str]:
        if self.at >= len(self.tokens):
            msg = f"expected {what} at the end"
            raise SearchError(msg)
        token = self.tokens[self.at]
        self.at += 1
        return token

    def _value(self) -> str:
        kind, text = self._next("a quoted value")
        if kind != "string":
            msg = f"expected a quoted value, got {text!r}"
            raise SearchError(msg)
        return text[1:-1]

    def _term(self) -> Predicate:
        kind, name = self._next("a field")
        field = name.lower()
        if kind != "word" or field not in _FIELDS:
            msg = f"field {name!r} is not searchable here (sn, groupId, regionId, "
            msg += "productKey, status)"
            raise SearchError(msg)
        get = _FIELDS[field]
        kind, operator = self._next("an operator")
        match operator.lower():
            case "=":
                value = self._value()
                return lambda device: get(device) == value
            case "in":
                values = self._list()
                return lambda device: get(device) in values
            case "like" if field in _LIKE_FIELDS:
                pattern = _like(self._value())
                return lambda device: pattern.fullmatch(get(device) or "") is not None
            case _:
                msg = f"operator {operator!r} is not supported on {name}"
                raise SearchError(msg)

    def _list(self) -> frozenset[str]:
        if self._next("'('")[1] != "(":
            msg = "expected '(' after IN"
            raise SearchError(msg)
        values = {self._value()}
        while True:
            _, text = self._next("',' or ')'")
            if text == ")":
                return frozenset(values)
            if text != ",":
                msg = f"expected ',' or ')', got {text!r}"
                raise SearchError(msg)
            values.add(self._value())

    def parse(self) -> Predicate:
        terms = [self._term()]
        while self.at < len(self.tokens):
            kind, text = self._next("AND")
            if kind != "word" or text.lower() != "and":
                msg = f"expected AND between terms, got {text!r}"
                raise SearchError(msg)
            terms.append(self._term())
        return lambda device: all(term(device) for term in terms)


def matcher(expression: str) -> Predicate:
    """A predicate over devices for ``expression``.

    Raises:
        SearchError: the expression is empty, malformed, or outside the subset.
    """
    if not expression.strip():
        msg = "the expression is empty"
        raise SearchError(msg)
    return _Parser(expression).parse()


def sort_devices(
    devices: Sequence[EmulatedDevice], sorters: Sequence[Sorter] | None
) -> list[EmulatedDevice]:
    """``devices`` in the order DPS returns them: by ``sorters``, else newest first.

    Raises:
        SearchError: a sorter names a field or an order the emulator does not sort by.
    """
    if not sorters:
        return sorted(devices, key=lambda d: (d.create_time, d.batch_order), reverse=True)
    ordered = list(devices)
    for sorter in reversed(sorters):  # stable sorts, least significant key first
        key = _SORT_KEYS.get(sorter.field.lower())
        order = sorter.order.upper()
        if key is None:
            msg = f"cannot sort by {sorter.field!r} (sn, groupId, createTime, updateTime, "
            msg += "batchOrder)"
            raise SearchError(msg)
        if order not in {"ASC", "DESC"}:
            msg = f"sort order {sorter.order!r} is neither ASC nor DESC"
            raise SearchError(msg)
        ordered.sort(key=key, reverse=order == "DESC")
    return ordered
