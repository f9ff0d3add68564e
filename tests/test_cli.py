"""The command line's contract: exit 0 ok, 2 bad configuration or input (one line naming the
key or file:line), 1 a service not reachable (one line naming it and its address), 70 a bug
(its traceback logged)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiomqtt
import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from pipeline.cli import _needs_selector, _parser, _report
from pipeline.config import Config, load_config
from pipeline.errors import (
    ConfigError,
    DpsTransient,
    InputError,
    InternalError,
    ServiceUnreachable,
    StageFailed,
)
from pipeline.stages.sink.offsets import OffsetTracker, OutOfOrder
from pipeline.tools.services import free_port
from tests.harness import FIXTURES


def _env(**values: str) -> dict[str, str]:
    """This environment without PIPELINE_ variables, plus ``values`` (keys without prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update({f"PIPELINE_{k}": v for k, v in values.items()})
    env["PIPELINE_METRICS__ENABLED"] = env.get("PIPELINE_METRICS__ENABLED", "false")
    return env


def _pipeline(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    return free_port()


# --------------------------------------------------------------------------------------
# Kafka not reachable


def test_route_waits_for_kafka_then_exits_1_naming_it(closed_port: int) -> None:
    env = _env(KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port}", KAFKA__STARTUP_TIMEOUT="1")
    proc = _pipeline("route", env=env)
    assert (proc.returncode, proc.stdout) == (1, "")
    *logs, line = proc.stderr.splitlines()
    assert (
        line
        == f"pipeline: Kafka 127.0.0.1:{closed_port} not reachable within 1 s: connection refused"
    )
    # While it waited, it said so in its own words, once (not more than every 5 s), and
    # the client library said nothing.
    assert [(r["level"], r["logger"], r["msg"]) for r in map(json.loads, logs)] == [
        (
            "warning",
            "pipeline.io.kafka",
            f"waiting for Kafka at 127.0.0.1:{closed_port}: connection refused",
        )
    ]


@pytest.mark.services
@pytest.mark.parametrize("stage", ["ingest", "route", "sink", "run"])
def test_every_stage_on_an_unreachable_kafka_says_it_twice_and_nothing_else(
    cfg: Config, closed_port: int, stage: str
) -> None:
    # At the default log level, as an operator runs it (MQTT is there, Kafka is not): the
    # wait in our words once (one line for `run`'s three stages), then the one-line error.
    env = _env(
        MQTT__PORT=str(cfg.mqtt.port),
        MQTT__CLIENT_ID=f"{cfg.mqtt.client_id}-{stage}",
        KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port}",
        KAFKA__STARTUP_TIMEOUT="1",
    )
    proc = _pipeline(stage, env=env)
    assert (proc.returncode, proc.stdout) == (1, "")
    where = f"127.0.0.1:{closed_port}"
    first, second = proc.stderr.splitlines()
    assert {k: v for k, v in json.loads(first).items() if k != "ts"} == {
        "level": "warning",
        "logger": "pipeline.io.kafka",
        "msg": f"waiting for Kafka at {where}: connection refused",
    }
    assert second == f"pipeline: Kafka {where} not reachable within 1 s: connection refused"


@pytest.mark.parametrize(
    "command", [["topics", "create"], ["status"], ["redrive", "allocations"], ["route"]]
)
def test_kafka_unreachable_one_line_exit_1(closed_port: int, command: list[str]) -> None:
    env = _env(KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port}", KAFKA__STARTUP_TIMEOUT="0")
    proc = _pipeline("--log-level", "error", *command, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1,
        "",
        f"pipeline: Kafka 127.0.0.1:{closed_port} not reachable: connection refused\n",
    )


def test_sigterm_while_waiting_for_kafka_exits_0(closed_port: int) -> None:
    env = _env(KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port}", KAFKA__STARTUP_TIMEOUT="60")
    with subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--log-level", "warning", "sink"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stderr is not None
        first = json.loads(proc.stderr.readline())  # it is waiting
        assert first["msg"] == f"waiting for Kafka at 127.0.0.1:{closed_port}: connection refused"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr.read() == ""


# --------------------------------------------------------------------------------------
# MQTT not reachable


def test_ingest_mqtt_unreachable_exit_1(closed_port: int) -> None:
    env = _env(MQTT__PORT=str(closed_port), MQTT__STARTUP_TIMEOUT="1")
    proc = _pipeline("--log-level", "error", "ingest", env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1,
        "",
        f"pipeline: MQTT 127.0.0.1:{closed_port} not reachable within 1 s: connection refused\n",
    )


def test_replay_mqtt_unreachable_exit_1(closed_port: int) -> None:
    env = _env(MQTT__PORT=str(closed_port))
    fixture = str(FIXTURES / "seed_example.jsonl")
    proc = _pipeline("--log-level", "warning", "replay", "--no-progress", fixture, env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1,
        "",
        f"pipeline: MQTT 127.0.0.1:{closed_port} not reachable: connection refused\n",
    )


# --------------------------------------------------------------------------------------
# Bad input


def test_missing_fixture_exit_2_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    proc = _pipeline("replay", str(missing), env=_env())
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        f"pipeline: {missing}: No such file or directory\n",
    )


def test_malformed_fixture_line_exit_2_naming_file_and_line(tmp_path: Path) -> None:
    fixture = tmp_path / "bad.jsonl"
    fixture.write_text(
        '{"topic": "t", "payload": 1}\n# a comment\n{"topic": "t", "payload": 1, "qos": 2}\n',
        encoding="utf-8",
    )
    proc = _pipeline("replay", str(fixture), env=_env())
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        f"pipeline: {fixture}:3: qos must be 0 or 1, got 2\n",
    )


def test_bad_mapping_fails_at_load_exit_2() -> None:
    proc = _pipeline("sink", env=_env(SINK__SN_FROM="{product_id}-{serial}"))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "pipeline: config key sink.sn_from (from PIPELINE_SINK__SN_FROM): 'serial' is neither "
        "a DeviceInfo field (description, device_id, fw_version, manufacturer_id, model, name, "
        "node_id, parent_device_id, product_id, status, sw_version) nor extension_info.<key>\n"
    )


def test_metrics_port_in_use_exit_2_naming_the_key() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(METRICS__ENABLED="true", METRICS__ROUTE_PORT=str(port))
        proc = _pipeline("route", env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        (
            f"pipeline: config key metrics.route_port: cannot listen on 127.0.0.1:{port}: "
            "Address already in use\n"
        ),
    )


# --------------------------------------------------------------------------------------
# The mapping itself: errors as the stages' TaskGroup delivers them


Report = Callable[[Exception], tuple[int, str, list[dict[str, str]]]]


@pytest.fixture
def default_cfg() -> Config:
    return load_config(environ={})


@pytest.fixture
def report(
    default_cfg: Config,
    capsys: pytest.CaptureFixture[str],
    json_logs: Callable[[str], io.StringIO],
) -> Report:
    """What the CLI does with an error: (exit code, stderr, JSON log records)."""

    def run(exc: Exception) -> tuple[int, str, list[dict[str, str]]]:
        logs = json_logs("info")
        code = _report(exc, default_cfg, "run")
        return (
            code,
            capsys.readouterr().err,
            [json.loads(line) for line in logs.getvalue().splitlines()],
        )

    return run


@pytest.mark.parametrize(
    ("error", "code", "line"),
    [
        (ExceptionGroup("g", [StageFailed("router stopped: a rebalance callback failed: x")]), 1,
         "pipeline: router stopped: a rebalance callback failed: x\n"),
        (
            ExceptionGroup("g", [ExceptionGroup("h", [
                # as pipeline.io.kafka's clients raise it when no bootstrap server answered
                KafkaConnectionError("no bootstrap server answered (aiokafka logs why at debug)")
            ])]),
            1,
            ("pipeline: Kafka 127.0.0.1:9092 not reachable: KafkaConnectionError: no bootstrap "
            "server answered (aiokafka logs why at debug)\n"),
        ),
        (ExceptionGroup("g", [aiomqtt.MqttError("Disconnected during message iteration")]), 1,
         "pipeline: MQTT 127.0.0.1:1883: Disconnected during message iteration\n"),
        (FileNotFoundError(2, "No such file or directory", "/data/devices.json"), 2,
         "pipeline: /data/devices.json: No such file or directory\n"),
        (InputError("devices.json:3: sn is missing"), 2, "pipeline: devices.json:3: sn is missing\n"),
        (ConnectionError("MQTT 127.0.0.1:1883 not reachable: start them"), 1,
         "pipeline: MQTT 127.0.0.1:1883 not reachable: start them\n"),
        (ExceptionGroup("g", [ServiceUnreachable("Kafka", "k:9092", "connection refused")]), 1,
         "pipeline: Kafka k:9092 not reachable: connection refused\n"),
        (DpsTransient(None, "DPS allocate: connection refused by 127.0.0.1:8085"), 1,
         ("pipeline: DPS http://127.0.0.1:8085: DPS error: DPS allocate: connection refused by "
          "127.0.0.1:8085\n")),
    ],
)  # fmt: skip
def test_errors_map_to_one_line(error: Exception, code: int, line: str, report: Report) -> None:
    assert report(error) == (code, line, [])


def test_bad_input_wins_and_the_others_are_logged(report: Report) -> None:
    group = ExceptionGroup(
        "g",
        [
            ServiceUnreachable("Kafka", "k:9092", "connection refused"),
            ConfigError.at("sink.sn_from", "the template names no field"),
            ServiceUnreachable("Kafka", "k:9092", "connection refused"),  # same: said once
        ],
    )
    code, err, logs = report(group)
    assert (code, err) == (2, "pipeline: config key sink.sn_from: the template names no field\n")
    assert [(r["level"], r["msg"]) for r in logs] == [
        ("error", "also: Kafka k:9092 not reachable: connection refused")
    ]


def _raise(exc: Exception) -> None:
    raise exc


def _raised(exc: Exception) -> Exception:
    """``exc`` with a traceback, as a stage's TaskGroup delivers it."""
    try:
        _raise(exc)
    except Exception as caught:
        return ExceptionGroup("g", [caught])
    raise AssertionError


def test_unexpected_error_is_a_bug_exit_70_with_its_traceback(report: Report) -> None:
    code, err, logs = report(_raised(RuntimeError("boom")))
    assert (code, err) == (70, "")
    assert [(r["level"], r["logger"], r["msg"]) for r in logs] == [
        ("error", "pipeline.cli", "pipeline run failed: RuntimeError('boom') (a bug)")
    ]
    assert "raise exc\nRuntimeError: boom" in logs[0]["exc"]


def test_a_broken_invariant_is_a_bug_exit_70_never_bad_input(report: Report) -> None:
    """The sink's offset tracker refusing an offset is the code's fault, not the input's."""
    tracker, tp = OffsetTracker(), TopicPartition("t", 0)
    tracker.start(tp, 5)
    try:
        tracker.start(tp, 5)
    except OutOfOrder as exc:
        group = ExceptionGroup("g", [exc])
    assert isinstance(group.exceptions[0], InternalError)
    code, err, logs = report(group)
    assert (code, err) == (70, "")
    assert [(r["level"], r["msg"]) for r in logs] == [
        ("error", "pipeline run failed: OutOfOrder('t/0: offset 5 started after offset 5') (a bug)")
    ]
    assert "OutOfOrder: t/0: offset 5 started after offset 5" in logs[0]["exc"]


def test_a_stray_value_error_is_a_bug_not_bad_input(report: Report) -> None:
    """Only the named types are bad input: any ValueError used to exit 2 as if it were."""
    code, err, logs = report(_raised(ValueError("devices.json:3: sn is missing")))
    assert (code, err) == (70, "")
    assert (
        logs[0]["msg"] == "pipeline run failed: ValueError('devices.json:3: sn is missing') (a bug)"
    )


def test_the_operators_fix_first_then_a_bug_then_a_service(report: Report) -> None:
    unreachable = ServiceUnreachable("Kafka", "k:9092", "connection refused")
    bug = OutOfOrder("t/0: offset 1 started after offset 2")
    code, err, logs = report(ExceptionGroup("g", [unreachable, bug]))
    assert (code, err) == (70, "pipeline: Kafka k:9092 not reachable: connection refused\n")
    assert [r["msg"] for r in logs] == [
        "pipeline run failed: OutOfOrder('t/0: offset 1 started after offset 2') (a bug)"
    ]
    bad = InputError("f.jsonl:1: qos must be 0 or 1, got 2")
    code, err, logs = report(ExceptionGroup("g", [unreachable, bug, bad]))
    assert (code, err) == (2, "pipeline: f.jsonl:1: qos must be 0 or 1, got 2\n")
    assert [r["msg"] for r in logs] == [
        "pipeline run failed: OutOfOrder('t/0: offset 1 started after offset 2') (a bug)",
        "also: Kafka k:9092 not reachable: connection refused",
    ]


def test_a_bug_in_a_command_exits_70_with_its_traceback() -> None:
    """Through main(): the traceback logged as one JSON line on stderr, nothing on stdout."""
    script = (
        "import pipeline.cli as cli\n"
        "from aiokafka import TopicPartition\n"
        "from pipeline.stages.sink.offsets import OffsetTracker\n"
        "async def broken(args, cfg):\n"
        "    tracker, tp = OffsetTracker(), TopicPartition('t', 0)\n"
        "    tracker.start(tp, 7)\n"
        "    tracker.start(tp, 3)\n"
        "cli._schemas_export = broken\n"
        "raise SystemExit(cli.main(['schemas', 'export', '--check']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (70, "")
    [line] = proc.stderr.splitlines()
    logged = json.loads(line)
    assert (logged["level"], logged["msg"]) == (
        "error",
        "pipeline schemas failed: OutOfOrder('t/0: offset 3 started after offset 7') (a bug)",
    )
    assert logged["exc"].startswith("Traceback (most recent call last):")


def test_bad_input_exits_2_naming_the_argument() -> None:
    args = ["bridge-config", "--gateways-file", "/dev/null", "--host", "h", "--ca-file", "ca"]
    proc = _pipeline(*args, "--timestamp", "2026-01-01", env=_env())
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        "pipeline: --timestamp '2026-01-01' is not a date and hour (YYYYMMDDHH)\n",
    )


def test_help_lists_the_exit_codes() -> None:
    proc = _pipeline("--help", env=_env())
    assert proc.returncode == 0
    codes = proc.stdout.split("exit codes:\n", 1)[1]
    assert [line.split()[0] for line in codes.splitlines() if line[:3].strip()] == [
        "0", "1", "2", "3", "4", "70", "130"
    ]  # fmt: skip


def test_connection_error_from_the_os_is_not_called_bad_input(report: Report) -> None:
    """An OSError that names no file is not the operator's input, so it does not exit 2."""
    code, err, logs = report(ConnectionResetError(104, "Connection reset by peer"))
    assert (code, err) == (1, "")
    assert (
        logs[0]["msg"]
        == "pipeline run failed: ConnectionResetError(104, 'Connection reset by peer')"
    )


def test_emulator_port_in_use_exit_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _pipeline("dps-emulator", "--port", str(port), env=_env())
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        2,
        "",
        f"pipeline dps-emulator: cannot listen on 127.0.0.1:{port}: Address already in use\n",
    )


def test_sigterm_while_a_worker_is_still_starting_stops_it_cleanly(closed_port: int) -> None:
    # Before its event loop exists (here: while the CLI is still to be imported), a
    # SIGTERM is kept, and the worker then stops as on any SIGTERM: exit 0, not -15.
    script = (
        "import os, signal\n"
        "from pipeline import _signals\n"
        "_signals.hold()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "from pipeline.cli import main\n"
        "raise SystemExit(main(['sink']))\n"
    )
    env = _env(KAFKA__BOOTSTRAP_SERVERS=f"127.0.0.1:{closed_port}", KAFKA__STARTUP_TIMEOUT="60")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (0, "")


def test_sigterm_ends_a_tool_that_does_not_stop_on_it() -> None:
    # Only the workers (and record) keep a SIGTERM for their clean stop; a tool ends.
    script = (
        "import os, signal\n"
        "from pipeline import _signals\n"
        "_signals.hold()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "from pipeline.cli import main\n"
        "raise SystemExit(main(['schemas', 'export', '--check']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=30, check=False
    )
    assert proc.returncode == -signal.SIGTERM


@pytest.mark.parametrize(
    ("argv", "keeps_asyncio"),
    [
        (["ingest"], True),
        (["run"], True),
        (["demo"], True),
        (["route"], False),
        (["sink"], False),
        (["dps-emulator"], False),
        (["status"], False),
    ],
)
def test_only_a_process_running_ingest_keeps_asyncios_loop(
    argv: list[str], keeps_asyncio: bool
) -> None:
    why = _needs_selector(_parser().parse_args(argv))
    if keeps_asyncio:
        assert why == "it runs ingest, whose MQTT intake limit needs asyncio's selector loop"
    else:
        assert why == ""
