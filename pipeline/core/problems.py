"""The one reader of msgspec's validation error text (pure).

msgspec reports a validation failure as one English sentence with an optional location,
``Expected `int`, got `str` - at `$.mqtt.port```. Config loading and the event decoder
both turn that into "which field, and what is wrong with it"; they do it here, and
``tests/core/test_problems.py`` pins the format so a msgspec upgrade that changes it
fails loudly instead of producing vague reasons.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

import msgspec

__all__ = ["Malformed", "Problem", "explain", "malformed"]

_LOCATED = re.compile(r"^(?P<reason>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD = re.compile(r"^Object (?P<what>missing required|contains unknown) field `(?P<name>[^`]+)`$")
_GOT = re.compile(r"got `(?P<type>\w+)`")
_MALFORMED = re.compile(r"^JSON is malformed: (?P<what>.*?)(?: \(byte (?P<byte>\d+)\))?$")
_JSON_TYPES = {"array": "an array", "str": "a string", "int": "a number", "float": "a number",
               "bool": "a boolean", "null": "null", "object": "an object"}  # fmt: skip


class Problem(NamedTuple):
    """What msgspec found wrong, and where."""

    path: str
    """Dotted path of the field at fault (``mqtt.port``, ``services[0].paras``); ``""`` at
    the root."""
    kind: Literal["missing", "unknown", "invalid"]
    """A required field is absent, a field is not allowed, or a value is wrong."""
    reason: str
    """What is wrong, lower case: ``expected `int`, got `str```; for ``missing`` and
    ``unknown`` the field name is already in ``path``."""

    @property
    def got(self) -> str | None:
        """The JSON type that was found, in words (``an array``), when msgspec said."""
        match = _GOT.search(self.reason)
        return _JSON_TYPES.get(match.group("type"), match.group("type")) if match else None


def explain(exc: msgspec.ValidationError, prefix: str = "") -> Problem:
    """Read one msgspec validation error.

    Args:
        exc: the error msgspec raised.
        prefix: the path of the value that was being decoded, prepended to the
            error's own location (``.services[0].paras``).
    """
    text = str(exc)
    located = _LOCATED.match(text)
    reason, path = (located["reason"], located["path"] or "") if located else (text, "")
    path = prefix + path
    if field := _FIELD.match(reason):
        path = f"{path}.{field['name']}"
        kind: Literal["missing", "unknown", "invalid"] = (
            "missing" if field["what"] == "missing required" else "unknown"
        )
        reason = "missing required field" if kind == "missing" else "unknown field"
    else:
        kind = "invalid"
        reason = reason[:1].lower() + reason[1:]
    return Problem(path.lstrip("."), kind, reason)


class Malformed(NamedTuple):
    """Why msgspec could not parse a JSON document, and where."""

    what: str
    """``invalid character``, ``trailing characters``, ``truncated``, ..."""
    byte: int | None
    """The offset msgspec points at, when it does."""


def malformed(exc: msgspec.DecodeError) -> Malformed:
    """Read one msgspec JSON decode (syntax) error."""
    text = str(exc)
    if text == "Input data was truncated":
        return Malformed("truncated", None)
    match = _MALFORMED.match(text)
    if match is None:
        return Malformed(text, None)
    return Malformed(match["what"], int(match["byte"]) if match["byte"] else None)
