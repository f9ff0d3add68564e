"""The deploy/ files agree with the code and with each other.

Configuration, image names, lock files, rules, and one persistence policy for every
broker the deployments run.
"""

from __future__ import annotations

import collections
import re
import runpy
import tomllib

from packaging.requirements import Requirement

from pipeline.config import MqttConfig, load_config
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
        "${JAEGER_IMAGE:-jaegertracing/jaeger:2.12.0}",
        "${KAFKA_IMAGE:-apache/kafka:4.1.1}",
        "${MOSQUITTO_IMAGE:-eclipse-mosquitto:2}",
        "${PIPELINE_IMAGE:-iot-pipeline:local}",
    ]
    assert "${PYTHON_IMAGE:-python:3.11-slim}" in (DEPLOY / "compose" / "compose.yaml").read_text()


def test_jaeger_config_binds_every_listener_to_the_chosen_host_and_ports() -> None:
    # deploy/local/jaeger.yaml, the tests' and compose's Jaeger: every listener it opens binds
    # JAEGER_LISTEN_HOST (127.0.0.1 unless set) on a port the caller names, one variable
    # each, the ones its header documents; no listener of the all-in-one defaults is left.
    text = (DEPLOY / "local" / "jaeger.yaml").read_text()
    endpoints = re.findall(r"^\s*endpoint: (.*)$", text, re.MULTILINE)
    bound = r'"\$\{env:JAEGER_LISTEN_HOST:-127\.0\.0\.1\}:\$\{env:(JAEGER_\w+_PORT)\}"'
    ports = [m[1] for e in endpoints if (m := re.fullmatch(bound, e))]
    assert len(ports) == len(endpoints) == len(set(ports)) == 5, endpoints
    documented = re.findall(r"^#   (JAEGER_\w+_PORT) ", text, re.MULTILINE)
    assert sorted(ports) == sorted(documented)
    assert re.search(r"^    metrics:\n      level: none\n      readers: \[\]$", text, re.MULTILINE)
    assert re.search(r"^      receivers: \[otlp\]$", text, re.MULTILINE)


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


# The broker persistence policy (deploy/README.md, "Broker persistence"). ------------------

MOSQUITTO_POLICY = DEPLOY / "mosquitto" / "persistence.conf"
MOSQUITTO_CONFIGS = {
    "deploy/local/mosquitto.conf.in",
    "deploy/compose/mosquitto.conf",
    "deploy/edge/mosquitto.conf",
}
"""Every Mosquitto configuration a deployment of this project runs with."""
_BEGIN, _END = "# >>> persistence policy", "# <<< persistence policy"
_DURATION = {"h": 3600, "d": 86400, "w": 7 * 86400, "m": 30 * 86400, "y": 365 * 86400}


def _policy_block(text: str) -> str:
    """The lines from the policy's begin marker to its end marker, both included."""
    start, end = text.find(_BEGIN), text.find(_END)
    if start < 0:
        msg = f"no line starting {_BEGIN!r}"
        raise ValueError(msg)
    if end < start:
        msg = f"no line starting {_END!r} after the begin marker"
        raise ValueError(msg)
    return text[start : text.index("\n", end) + 1]


def _options(text: str) -> list[tuple[str, str]]:
    """A Mosquitto configuration's (option, value) lines, in order, comments left out."""
    lines = (line.strip() for line in text.splitlines())
    return [
        (name, value.strip())
        for name, _, value in (line.partition(" ") for line in lines if line and line[0] != "#")
    ]


def policy_differences(config: str, policy: str) -> list[str]:
    """What keeps ``config`` from holding ``policy``: a changed block, or an option set twice."""
    block = _policy_block(policy)
    try:
        held = _policy_block(config)
    except ValueError as exc:
        return [str(exc)]
    problems = [] if held == block else ["its policy block differs from the policy's"]
    names = {name for name, _ in _options(block)}
    seen = collections.Counter(name for name, _ in _options(config) if name in names)
    problems += [f"{name} is set {n} times" for name, n in sorted(seen.items()) if n > 1]
    return problems


def test_every_mosquitto_configuration_holds_the_persistence_policy() -> None:
    found = {
        str(path.relative_to(ROOT))
        for path in DEPLOY.rglob("mosquitto.conf*")
        if path != MOSQUITTO_POLICY
    }
    assert found == MOSQUITTO_CONFIGS, "a new Mosquitto configuration: give it the policy block"
    policy = MOSQUITTO_POLICY.read_text()
    for name in sorted(MOSQUITTO_CONFIGS):
        problems = policy_differences((ROOT / name).read_text(), policy)
        assert not problems, f"{name}: {'; '.join(problems)} (copy {MOSQUITTO_POLICY.name})"


def test_a_configuration_that_strays_from_the_policy_is_reported() -> None:
    policy = MOSQUITTO_POLICY.read_text()
    config = "listener 1883\n" + _policy_block(policy)
    assert policy_differences(config, policy) == []
    assert policy_differences(config + "autosave_interval 30\n", policy) == [
        "autosave_interval is set 2 times"
    ]
    changed = config.replace("autosave_interval 1\n", "autosave_interval 1000\n")
    assert policy_differences(changed, policy) == ["its policy block differs from the policy's"]
    assert policy_differences("listener 1883\npersistence true\n", policy) == [
        f"no line starting {_BEGIN!r}"
    ]


def test_the_policy_saves_after_every_change_and_outlives_ingest_sessions() -> None:
    options = dict(_options(MOSQUITTO_POLICY.read_text()))
    # autosave_interval counts changes, and 1 is the least: a save per loop pass with any.
    assert options["persistence"] == "true"
    assert options["autosave_on_changes"] == "true"
    assert options["autosave_interval"] == "1"
    # Mosquitto ends a session at the earlier of the client's expiry and its own ceiling.
    ceiling = options["persistent_client_expiration"]
    seconds = int(ceiling[:-1]) * _DURATION[ceiling[-1]]
    configmap = (DEPLOY / "kubernetes" / "configmap.yaml").read_text()
    k8s = re.search(r"^\s*session_expiry = (\d+)$", configmap, re.MULTILINE)
    assert k8s is not None
    k8s_expiry = int(k8s[1])
    assert seconds >= max(MqttConfig().session_expiry, k8s_expiry)
    assert int(options["max_inflight_messages"]) >= MqttConfig().max_inflight


def test_the_brokers_run_the_configurations_that_hold_the_policy() -> None:
    # The image's own default configuration is never what compose's broker runs.
    compose = (DEPLOY / "compose" / "compose.yaml").read_text()
    assert "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in compose
    edge = (DEPLOY / "edge" / "compose.yaml").read_text()
    assert "./mosquitto.conf:/edge/mosquitto.conf:ro" in edge
    assert "mosquitto -c /tmp/edge.conf" in edge
    unit = (DEPLOY / "edge" / "iot-edge-broker.service").read_text()
    assert "install -m 0644 deploy/edge/mosquitto.conf /etc/mosquitto/edge.conf" in unit
    assert "ExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/edge.conf" in unit


def _kafka_settings() -> dict[str, dict[str, str]]:
    """Each Kafka broker configuration in deploy/, as property -> value."""

    def properties(text: str) -> dict[str, str]:
        pairs = (line.partition("=") for line in text.splitlines())
        return {k.strip(): v.strip() for k, eq, v in pairs if eq and not k.startswith("#")}

    compose = (DEPLOY / "compose" / "compose.yaml").read_text()
    env = dict(re.findall(r"^\s+KAFKA_([A-Z_]+): (.*)$", compose, re.MULTILINE))
    return {
        "deploy/local/kafka/server.properties.in": properties(
            (DEPLOY / "local" / "kafka" / "server.properties.in").read_text()
        ),
        "deploy/container/kafka/server.properties": properties(
            (DEPLOY / "container" / "kafka" / "server.properties").read_text()
        ),
        "deploy/compose/compose.yaml": {
            k.lower().replace("_", "."): v.strip('"') for k, v in env.items()
        },
    }


def test_kafka_keeps_records_by_replication_never_by_weakened_defaults() -> None:
    for name, settings in _kafka_settings().items():
        # Durability comes from replication with acks=all, not from fsync per record
        # (Kafka's advice); a single node keeps what the OS has (a process crash loses
        # nothing, a machine crash can lose what was not written back).
        flush = [k for k in settings if k.startswith(("log.flush.", "flush."))]
        assert not flush, f"{name}: {flush}"
        assert settings.get("unclean.leader.election.enable", "false") == "false", name
        # One node: one replica, and writes need only that one in sync.
        for key in ("default.replication.factor", "min.insync.replicas"):
            assert settings.get(key, "1") == "1", f"{name}: {key}"
