"""schemas/ is generated from the code, and the check notices when it is stale."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.tools.export import _normalise, documents, export
from tests.harness import ROOT

SCHEMAS = ROOT / "schemas"


def test_committed_schemas_are_current() -> None:
    assert export(SCHEMAS, check=True) == 0


def test_check_fails_when_stale(tmp_path: Path, capsys) -> None:
    target = tmp_path / "schemas"
    shutil.copytree(SCHEMAS, target)
    (target / "kafka.added-child.schema.json").write_text("{}\n", encoding="utf-8")
    (target / "leftover.schema.json").write_text("{}\n", encoding="utf-8")
    assert export(target, check=True) == 1
    err = capsys.readouterr().err
    assert "kafka.added-child.schema.json is out of date" in err
    assert "leftover.schema.json is not generated" in err
    assert export(target) == 0
    assert export(target, check=True) == 0
    assert not (target / "leftover.schema.json").exists()


def test_cli_check_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "schemas", "export", "--check", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "is stale" in proc.stderr


def test_every_record_shape_and_channel_is_documented() -> None:
    docs = documents()
    for name in (
        "kafka.down-event",
        "kafka.added-child",
        "kafka.failed-child",
        "kafka.allocation",
        "kafka.allocation-failure",
        "kafka.deleted-child",
        "kafka.child-state",
        "kafka.sync-request",
        "kafka.release",
        "iotda.down-event",
        "dps.allocate.request",
        "dps.response",
    ):
        assert f"{name}.schema.json" in docs
    added = json.loads(docs["kafka.added-child.schema.json"])
    assert added["$defs"]["AddedChild"]["properties"]["device"]["$ref"] == "#/$defs/DeviceInfo"
    assert set(added["$defs"]["DeviceInfo"]["required"]) == {"node_id", "device_id"}
    asyncapi = json.loads(docs["asyncapi.json"])
    assert asyncapi["asyncapi"] == "3.0.0"
    assert sorted(c["address"] for c in asyncapi["channels"].values()) == sorted(
        [
            "$oc/devices/{gateway_id}/sys/events/down",
            "iotda.down-events",
            "iotda.down-events.dlq",
            "iotda.subdevices.added",
            "iotda.subdevices.failed",
            "iotda.subdevices.deleted",
            "iotda.subdevices.lifecycle",
            "iotda.sync-requests",
            "dps.allocations",
            "dps.releases",
            "dps.allocations.dlq",
        ]
    )


def test_normalise_undoes_what_msgspec_versions_write_differently() -> None:
    # As msgspec 0.22 on Python < 3.13 writes a Struct docstring, and pre-0.22 a union.
    schema = {
        "description": "Summary.\n\n    More, indented.\n    ",
        "properties": {
            "description": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/X"}], "default": None},
            "other": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
        },
        "required": ["description"],
    }
    assert _normalise(schema) == {
        "description": "Summary.\n\nMore, indented.",
        "properties": {
            "description": {"anyOf": [{"$ref": "#/$defs/X"}, {"type": "null"}], "default": None},
            "other": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
        },
        "required": ["description"],
    }


def _walk(node: object, key: str) -> list[object]:
    if isinstance(node, dict):
        found = [node[key]] if key in node else []
        return found + [v for child in node.values() for v in _walk(child, key)]
    if isinstance(node, list):
        return [v for child in node for v in _walk(child, key)]
    return []


def test_generated_descriptions_and_unions_are_normalised() -> None:
    # Holds on every msgspec and Python: the committed files cannot depend on either.
    for name, content in documents().items():
        doc = json.loads(content)
        for text in _walk(doc, "description"):
            if isinstance(text, str):
                assert text == inspect.cleandoc(text), (name, text)
        for alternatives in _walk(doc, "anyOf"):
            assert isinstance(alternatives, list)
            assert {"type": "null"} not in alternatives[:-1], (name, alternatives)
