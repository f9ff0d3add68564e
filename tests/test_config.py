"""Configuration: TOML + environment overrides, one-line errors naming the key, secrets hidden."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config, Secret, load_config
from pipeline.errors import ConfigError
from tests.harness import ROOT

SECRET = "s3cr3t-do-not-print-1234"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_file() -> None:
    cfg = load_config(environ={})
    assert cfg.mqtt.topic == "$oc/devices/+/sys/events/down"
    assert cfg.mqtt.qos == 1
    assert cfg.kafka.topics.added == "iotda.subdevices.added"
    assert cfg.sink.sn_from == "node_id"


def test_file_and_environment_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[mqtt]\nport = 1884\nhost = "broker"\n[kafka.topics]\nadded = "from-file"\n'
        '[sink]\norg_overrides = { p1 = "o1" }\n',
    )
    env = {
        "PIPELINE_MQTT__PORT": "2883",
        "PIPELINE_KAFKA__TOPICS__FAILED": "from-env",
        "PIPELINE_SINK__CONCURRENCY": "7",
        "PIPELINE_SINK__RATE_LIMIT": "2.5",
        "PIPELINE_METRICS__ENABLED": "false",
        "PIPELINE_SINK__DEVICE_DATA": '{ deviceName = "name" }',
        "OTHER_VAR": "ignored",
    }
    cfg = load_config(path, env)
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker", 2883)
    assert (cfg.kafka.topics.added, cfg.kafka.topics.failed) == ("from-file", "from-env")
    assert cfg.sink.concurrency == 7
    assert cfg.sink.rate_limit == 2.5
    assert cfg.metrics.enabled is False
    assert cfg.sink.org_overrides == {"p1": "o1"}
    assert cfg.sink.device_data == {"deviceName": "name"}


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[mqtt]\nprot = 1\n", {}, "config key mqtt.prot: unknown key"),
        ("[mqtt]\nport = 'abc'\n", {}, "config key mqtt.port: expected `int`, got `str`"),
        ("[mqtt]\nqos = 2\n", {}, "config key mqtt.qos: invalid enum value 2"),
        ("[nosuch]\nx = 1\n", {}, "config key nosuch: unknown key"),
        (
            "[kafka.topics]\nadded = 5\n",
            {},
            "config key kafka.topics.added: expected `str`, got `int`",
        ),
        (
            "",
            {"PIPELINE_SINK__CONCURRENCY": "many"},
            (
                "config key sink.concurrency (from PIPELINE_SINK__CONCURRENCY): "
                "expected `int`, got `str`"
            ),
        ),
        (
            "[mqtt.iotda]\nsecret = 'x'\n",
            {},
            "config key mqtt.iotda.device_id: required key is missing (or list the gateways and their secrets in mqtt.gateways_file)",
        ),
    ],
)
def test_bad_config_names_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, toml), env)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config file .*nope.toml does not exist$"):
        load_config(tmp_path / "nope.toml", {})
    with pytest.raises(ConfigError, match=r"is not valid TOML"):
        load_config(write(tmp_path, "[mqtt\n"), {})


def test_secret_from_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "app_secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    cfg = load_config(environ={"PIPELINE_SINK__DPS__APP_SECRET": f"file:{secret_file}"})
    assert cfg.sink.dps.app_secret.reveal() == SECRET
    with pytest.raises(
        ConfigError, match=r"^config key sink.dps.app_secret .*cannot read secret file"
    ):
        load_config(environ={"PIPELINE_SINK__DPS__APP_SECRET": f"file:{tmp_path}/missing"})


def _secret_config(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    path = write(
        tmp_path,
        f'[mqtt]\npassword = "{SECRET}"\n[mqtt.iotda]\ndevice_id = "gw1"\nsecret = "{SECRET}"\n',
    )
    env = {
        "PIPELINE_SINK__DPS__APP_SECRET": SECRET,
        "PIPELINE_KAFKA__SASL_PASSWORD": SECRET,
    }
    return path, env


def test_secrets_never_printed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, env = _secret_config(tmp_path)
    cfg = load_config(path, env)
    assert isinstance(cfg.sink.dps.app_secret, Secret)
    assert cfg.sink.dps.app_secret.reveal() == SECRET
    assert cfg.mqtt.password is not None
    assert cfg.mqtt.password.reveal() == SECRET
    for text in (repr(cfg), str(cfg), f"{cfg}", repr(cfg.mqtt), str(cfg.sink.dps.app_secret)):
        assert SECRET not in text
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("config %s %r", cfg, cfg)
    assert SECRET not in caplog.text
    assert "***" in caplog.text


def test_secret_not_in_error_message(tmp_path: Path) -> None:
    path, env = _secret_config(tmp_path)
    env["PIPELINE_MQTT__PORT"] = "bad"
    with pytest.raises(ConfigError) as info:
        load_config(path, env)
    assert SECRET not in str(info.value)


def test_cli_bad_config_one_line_exit_2(tmp_path: Path) -> None:
    path, env = _secret_config(tmp_path)
    text = path.read_text(encoding="utf-8") + "[kafka]\npartitions = 'x'\n"
    path.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(path), "topics", "create"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == ("pipeline: config key kafka.partitions: expected `int`, got `str`\n")
    assert SECRET not in proc.stderr


def test_cli_help_lists_commands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in proc.stdout
    assert "topics" in proc.stdout


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.mqtt.port = 1  # type: ignore[misc]


def test_example_config_is_the_defaults() -> None:
    example = ROOT / "pipeline.example.toml"
    assert load_config(example, {}) == load_config(environ={})
