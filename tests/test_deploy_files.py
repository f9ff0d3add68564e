"""The deploy/ files agree with the code: configuration, image names, lock files, rules."""

from __future__ import annotations

import re
import runpy
import tomllib

from packaging.requirements import Requirement

from pipeline.config import load_config
from tests.harness import ROOT

DEPLOY = ROOT / "deploy"


def test_kubernetes_configmap_loads_with_production_topic_settings(tmp_path) -> None:
    text = (DEPLOY / "kubernetes" / "configmap.yaml").read_text()
    body = text[text.index("pipeline.toml: |") :].splitlines()[1:]
    toml = tmp_path / "pipeline.toml"
    toml.write_text("\n".join(line.removeprefix("    ") for line in body))
    cfg = load_config(toml, {})
    assert cfg.kafka.create_topics is False
    assert (cfg.kafka.replication_factor, cfg.kafka.min_insync_replicas) == (3, 2)


def test_compose_takes_every_image_from_a_variable_with_the_upstream_default() -> None:
    images = re.findall(
        r"^\s*image: (.*)$", (DEPLOY / "compose" / "compose.yaml").read_text(), re.MULTILINE
    )
    assert sorted(images) == [
        "${KAFKA_IMAGE:-apache/kafka:4.1.1}",
        "${MOSQUITTO_IMAGE:-eclipse-mosquitto:2}",
        "${PIPELINE_IMAGE:-iot-pipeline:local}",
    ]
    assert "${PYTHON_IMAGE:-python:3.11-slim}" in (DEPLOY / "compose" / "compose.yaml").read_text()


def test_compose_workers_do_not_create_topics() -> None:
    text = (DEPLOY / "compose" / "compose.yaml").read_text()
    assert 'PIPELINE_KAFKA__CREATE_TOPICS: "false"' in text
    assert 'command: ["topics", "create"]' in text


def test_lock_files_pin_every_dependency_within_pyproject_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for lock, deps in (
        ("requirements.lock", project["dependencies"]),
        (
            "requirements-dev.lock",
            project["dependencies"] + project["optional-dependencies"]["dev"],
        ),
    ):
        text = (ROOT / lock).read_text()
        pins = {
            name.lower().replace("_", "-"): version
            for name, version in re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.MULTILINE)
        }
        assert "--hash=sha256:" in text
        for dep in map(Requirement, deps):
            name = dep.name.lower().replace("_", "-")
            assert name in pins, f"{lock} lacks {name}: run deploy/local/lock.sh"
            assert dep.specifier.contains(pins[name]), (
                f"{lock}: {name}=={pins[name]} not {dep.specifier}"
            )


def test_kubernetes_monitoring_is_generated_from_the_rules_file() -> None:
    generate = runpy.run_path(str(DEPLOY / "monitoring" / "generate.py"))
    assert (DEPLOY / "kubernetes" / "monitoring.yaml").read_text() == generate["render"]()
