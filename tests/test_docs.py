"""The README and the docs name only what exists: configuration keys, paths, tests, targets.

A fact is checked when it is written in one of these forms (outside fenced code blocks
unless said otherwise):

- a configuration key: a dotted name in backticks whose first part is a section
  (`sink.dps.timeout`, also `sink.retry_max = 2`), a table in backticks (`[sink.dps]`),
  a backticked name in the first column of a table under a heading that names its table
  (### `[sink.dps]`), a key of a fenced ``toml`` block, or an environment variable
  ``PIPELINE_SINK__DPS__TIMEOUT`` (in fenced blocks too);
- a repository path: a link's target, or a name in backticks with a slash whose first part
  is in the repository (or beside the document) or whose last part has a file extension;
  it must exist relative to the document or to the repository root (a glob must match);
  URLs, absolute paths, ``~`` and ``$`` are not repository paths;
- a link's ``#anchor``: a heading of the document it points to;
- a test: a backticked name starting with ``test_``, defined somewhere in tests/;
- a make target: ``make NAME`` in backticks, a rule of the Makefile.

Keys come from the configuration's Structs themselves (msgspec.inspect), so a key renamed
in ``pipeline/config.py`` fails here until the docs follow. No broker is needed.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec.inspect as mi

from pipeline.config import Config
from tests.harness import ROOT

DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "deploy").rglob("README.md")),
]
REFERENCE = ROOT / "docs" / "configuration.md"

NOT_KEYS = {"sink.kafka"}
"""Dotted names that look like keys and are not: the sink's Kafka readiness check."""

SECTIONS = tuple(Config.__struct_fields__)
_EXTENSIONS = {
    ".conf", ".in", ".json", ".jsonl", ".lock", ".md", ".png", ".properties", ".py",
    ".service", ".sh", ".toml", ".txt", ".xml", ".yaml", ".yml",
}  # fmt: skip

_FENCE = re.compile(r"^\s*(```|~~~)\s*(\w*)")
_SPAN = re.compile(r"`([^`\n]+)`")
_LINK = re.compile(r"\]\(([^()\s]+)\)")
_REFERENCE_LINK = re.compile(r"^\[[^\]]+\]:\s*(\S+)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_TABLE = re.compile(r"`\[([a-z_]+(?:\.[a-z_]+)*)\]`")
_ROW_KEY = re.compile(r"^\|\s*`([a-z_]+)`\s*\|")
_KEY = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)(?:\s*=.*)?$")
_ENV = re.compile(r"\bPIPELINE_[A-Z0-9_]*?__[A-Z0-9_]+")
_PATH = re.compile(r"^[A-Za-z0-9_.*-]+(?:/[A-Za-z0-9_.*-]*)+$")
_TEST = re.compile(r"^test_[a-z0-9_]+$")
_MAKE = re.compile(r"^make ([a-z][a-z0-9-]*)(?:\s|$)")


@dataclasses.dataclass(frozen=True)
class Mention:
    """One checkable fact in a document."""

    kind: str  # "key", "path", "link", "test" or "target"
    value: str
    line: int


def _walk(info: Any, prefix: str, out: dict[str, bool]) -> None:
    """Every key under a Struct, as name -> whether it is a table."""
    for field in info.fields:
        name = prefix + field.name
        kinds = field.type.types if isinstance(field.type, mi.UnionType) else (field.type,)
        table = next((t for t in kinds if isinstance(t, mi.StructType)), None)
        out[name] = table is not None
        if table is not None:
            _walk(table, name + ".", out)


@functools.cache
def config_keys() -> dict[str, bool]:
    """Every configuration key, tables included (``sink.dps``), as name -> is a table."""
    out: dict[str, bool] = {}
    _walk(mi.type_info(Config), "", out)
    return out


@functools.cache
def defined_tests() -> frozenset[str]:
    pattern = re.compile(r"^\s*(?:async\s+)?def (test_\w+)", re.MULTILINE)
    return frozenset(
        name
        for path in (ROOT / "tests").rglob("*.py")
        for name in pattern.findall(path.read_text())
    )


@functools.cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([a-z][a-z0-9-]*):", text, re.MULTILINE))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line)):
            found.add(slug(m[2]))
    return found


def _toml_keys(block: str) -> list[str]:
    """The dotted keys a TOML snippet sets (tables and leaves)."""
    keys: list[str] = []

    def walk(node: dict[str, Any], prefix: str) -> None:
        for name, value in node.items():
            keys.append(prefix + name)
            if isinstance(value, dict):
                walk(value, prefix + name + ".")

    walk(tomllib.loads(block), "")
    return keys


def _env_key(name: str) -> str:
    return ".".join(name.removeprefix("PIPELINE_").lower().split("__"))


def _span_mentions(span: str, number: int) -> list[Mention]:
    out: list[Mention] = []
    text = span.strip()
    key = _KEY.match(text) or _TABLE.fullmatch(text)
    if (
        key
        and key[1].split(".")[0] in SECTIONS
        and key[1] not in NOT_KEYS
        and Path(key[1]).suffix not in _EXTENSIONS  # router.py, sink.yaml: files
    ):
        out.append(Mention("key", key[1], number))
    elif _PATH.match(text):
        out.append(Mention("path", text, number))
    elif "::" in text and _PATH.match(text.split("::")[0]):
        out.append(Mention("path", text.split("::")[0], number))
        out.append(Mention("test", text.split("::")[1], number))
    elif _TEST.match(text):
        out.append(Mention("test", text, number))
    elif m := _MAKE.match(text):
        out.append(Mention("target", m[1], number))
    out += [Mention("key", _env_key(name), number) for name in _ENV.findall(text)]
    return out


def mentions(text: str) -> list[Mention]:
    """Every checkable fact of a Markdown document, with its line."""
    out: list[Mention] = []
    table: str | None = None  # the configuration table the current heading names
    fence: tuple[int, str, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if m := _FENCE.match(line):
            if fence is None:
                fence = (number, m[2], [])
            else:
                start, language, body = fence
                if language == "toml":
                    out += [Mention("key", key, start) for key in _toml_keys("\n".join(body))]
                fence = None
            continue
        if fence is not None:
            fence[2].append(line)
            out += [Mention("key", _env_key(name), number) for name in _ENV.findall(line)]
            continue
        if m := _HEADING.match(line):
            named = _TABLE.search(m[2])
            table = named[1] if named and named[1].split(".")[0] in SECTIONS else None
        if table is not None and (m := _ROW_KEY.match(line)):
            out.append(Mention("key", f"{table}.{m[1]}", number))
        for span in _SPAN.findall(line):
            out += _span_mentions(span, number)
        targets = _LINK.findall(line)
        if m := _REFERENCE_LINK.match(line):
            targets.append(m[1])
        out += [Mention("link", target, number) for target in targets]
    return out


def _resolve(value: str, doc: Path) -> list[Path]:
    """Where a path may be: beside the document, or from the repository root."""
    return [doc.parent / value, ROOT / value]


def _exists(path: Path) -> bool:
    if "*" in path.name:
        return any(path.parent.glob(path.name))
    return path.exists()


def _is_repository_path(value: str, doc: Path) -> bool:
    if "://" in value or value.startswith(("/", "~", "$", "mailto:")):
        return False
    first = value.split("/", maxsplit=1)[0]
    return (
        (ROOT / first).exists()
        or (doc.parent / first).exists()
        or first == ".."
        or Path(value.rstrip("/")).suffix in _EXTENSIONS
    )


def check(doc: Path, text: str) -> list[str]:
    """What ``text`` (the document at ``doc``) names that does not exist, one line each."""
    keys = config_keys()
    where = os.path.relpath(doc, ROOT)
    problems: list[str] = []
    for mention in mentions(text):
        at = f"{where}:{mention.line}"
        match mention.kind:
            case "key" if mention.value not in keys:
                problems.append(f"{at}: configuration key {mention.value} does not exist")
            case "path" if _is_repository_path(mention.value, doc):
                paths = _resolve(mention.value, doc)
                if not any(map(_exists, paths)):
                    problems.append(f"{at}: path {mention.value} does not exist")
            case "link":
                problems += _link_problems(mention.value, doc, text, at)
            case "test" if mention.value not in defined_tests():
                problems.append(f"{at}: test {mention.value} is not defined in tests/")
            case "target" if mention.value not in make_targets():
                problems.append(f"{at}: make {mention.value} is not a Makefile target")
    return problems


def _link_problems(target: str, doc: Path, text: str, at: str) -> list[str]:
    """A relative link must reach a file, and its #anchor a heading of that file."""
    path, _, anchor = target.partition("#")
    if "://" in path or path.startswith("mailto:"):
        return []
    file = doc.parent / path if path else doc
    if path and not file.exists():
        return [f"{at}: link {target} points to nothing"]
    if not anchor or file.suffix != ".md":
        return []
    if anchor not in anchors(file.read_text() if path else text):
        return [f"{at}: link {target}: no heading #{anchor} in {os.path.relpath(file, ROOT)}"]
    return []


def test_the_docs_name_only_keys_paths_tests_and_targets_that_exist() -> None:
    problems = [line for doc in DOCUMENTS for line in check(doc, doc.read_text())]
    assert not problems, "\n".join(problems)


def test_every_configuration_key_is_in_the_reference() -> None:
    documented = {m.value for m in mentions(REFERENCE.read_text()) if m.kind == "key"}
    leaves = {key for key, table in config_keys().items() if not table}
    assert sorted(leaves - documented) == []


def test_made_up_facts_are_reported() -> None:
    doc = ROOT / "docs" / "made-up.md"
    text = """\
# Made up
Set `sink.max_rate` and `PIPELINE_SINK__MAX_RATE`, or `sink.dps.timeout = 3`.
### `[sink.dps]`
| key | what |
|---|---|
| `timeout` | real |
| `deadline` | made up |
Read `deploy/nowhere/mosquitto.conf`, `tests/test_sink_e2e.py` and `benchmarks/x.py`.
See [it](operations.md#no-such-heading), [this](#made-up) and [gone](gone.md).
Proven by `test_nothing_at_all`; run `make nothing`, `make test` and `make bench`.
Not facts: `i/n`, `topic/partition/offset`, `/run/secrets/x`, `sink.kafka`.
```toml
[sink]
max_rate = 5
```
"""
    assert check(doc, text) == [
        "docs/made-up.md:2: configuration key sink.max_rate does not exist",
        "docs/made-up.md:2: configuration key sink.max_rate does not exist",
        "docs/made-up.md:7: configuration key sink.dps.deadline does not exist",
        "docs/made-up.md:8: path deploy/nowhere/mosquitto.conf does not exist",
        "docs/made-up.md:8: path tests/test_sink_e2e.py does not exist",
        "docs/made-up.md:8: path benchmarks/x.py does not exist",
        (
            "docs/made-up.md:9: link operations.md#no-such-heading: "
            "no heading #no-such-heading in docs/operations.md"
        ),
        "docs/made-up.md:9: link gone.md points to nothing",
        "docs/made-up.md:10: test test_nothing_at_all is not defined in tests/",
        "docs/made-up.md:10: make nothing is not a Makefile target",
        "docs/made-up.md:12: configuration key sink.max_rate does not exist",
    ]


def test_a_configuration_key_renamed_in_the_code_is_reported() -> None:
    keys = config_keys()
    assert keys["sink.dps"] is True
    assert keys["sink.dps.timeout"] is False
    assert keys["mqtt.iotda.device_id"] is False  # under a table that is unset by default
    assert "sink.rate_limit" in keys
    assert "sink.max_rate" not in keys


def test_slugs_are_githubs() -> None:
    assert slug("What a Mosquitto crash loses, and what saving costs") == (
        "what-a-mosquitto-crash-loses-and-what-saving-costs"
    )
    assert slug("`[mqtt]`: the source of the ingest stage") == "mqtt-the-source-of-the-ingest-stage"
