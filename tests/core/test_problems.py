"""The one reader of msgspec's error text; its format is pinned so an upgrade fails here."""

from __future__ import annotations

import msgspec
import pytest

from pipeline.core.problems import Malformed, Problem, explain, malformed


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    n: int


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    items: list[Inner]
    name: str = ""


def error_of(payload: bytes) -> msgspec.ValidationError:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(payload, type=Outer)
    return info.value


@pytest.mark.parametrize(
    ("payload", "text", "problem"),
    [
        (
            b"{}",
            "Object missing required field `items`",
            Problem("items", "missing", "missing required field"),
        ),
        (
            b'{"items": [{"n": 1}, {}]}',
            "Object missing required field `n` - at `$.items[1]`",
            Problem("items[1].n", "missing", "missing required field"),
        ),
        (
            b'{"items": [], "x": 1}',
            "Object contains unknown field `x`",
            Problem("x", "unknown", "unknown field"),
        ),
        (
            b'{"items": [{"n": "1"}]}',
            "Expected `int`, got `str` - at `$.items[0].n`",
            Problem("items[0].n", "invalid", "expected `int`, got `str`"),
        ),
        (
            b"[]",
            "Expected `object`, got `array`",
            Problem("", "invalid", "expected `object`, got `array`"),
        ),
        (
            b'{"items": [{"n": 1e400}]}',
            "Number out of range - at `$.items[0].n`",
            Problem("items[0].n", "invalid", "number out of range"),
        ),
    ],
)
def test_msgspec_error_text_is_read(payload: bytes, text: str, problem: Problem) -> None:
    exc = error_of(payload)
    assert str(exc) == text  # msgspec's own words: if this changes, the reader must too
    assert explain(exc) == problem


def test_prefix_and_got() -> None:
    exc = error_of(b'{"items": 3}')
    problem = explain(exc, ".services[0].paras")
    assert problem == Problem("services[0].paras.items", "invalid", "expected `array`, got `int`")
    assert problem.got == "a number"
    assert explain(error_of(b"null")).got == "null"


@pytest.mark.parametrize(
    ("payload", "text", "problem"),
    [
        (b'{"a": 1', "Input data was truncated", Malformed("truncated", None)),
        (
            b"<x>",
            "JSON is malformed: invalid character (byte 0)",
            Malformed("invalid character", 0),
        ),
        # msgspec points one past the first trailing byte (index 8 here); decode.py corrects it.
        (
            b'{"a": 1}x',
            "JSON is malformed: trailing characters (byte 9)",
            Malformed("trailing characters", 9),
        ),
        (
            b'{"a": 1,}',
            "JSON is malformed: trailing comma in object (byte 8)",
            Malformed("trailing comma in object", 8),
        ),
    ],
)
def test_msgspec_decode_error_text_is_read(payload: bytes, text: str, problem: Malformed) -> None:
    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.decode(payload)
    assert str(info.value) == text
    assert malformed(info.value) == problem
