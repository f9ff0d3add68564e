"""Configuration: TOML + environment overrides, one-line errors naming the key, secrets hidden."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from pipeline.config import Config, IotdaAuthConfig, Secret, Topics, load_config, to_environ
from pipeline.errors import ConfigError
from tests.harness import ROOT, make_certs

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
        (
            "[mqtt]\ngateways = ['gw-1']\nshard = '2/2'\n",
            {},
            "config key mqtt.shard: expected i/n with 0 <= i < n, got '2/2'",
        ),
        (
            "[mqtt]\nshard = '0/2'\n",
            {},
            "config key mqtt.shard: needs mqtt.gateways or mqtt.gateways_file to split",
        ),
        (
            # gw-1 is in shard 0 of 2: shard 1 would hold no gateway, and ingest would
            # subscribe to every gateway's topic instead.
            "[mqtt]\ngateways = ['gw-1']\nshard = '1/2'\n",
            {},
            "config key mqtt.shard: 1/2 takes none of the 1 listed gateways",
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


FIELDS = (
    "description, device_id, fw_version, manufacturer_id, model, name, node_id, "
    "parent_device_id, product_id, status, sw_version"
)


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        # durations: negative, zero, NaN, infinite
        (
            "[sink]\nretry_initial = -1\n",
            {},
            "config key sink.retry_initial: expected `float` > 0.0",
        ),
        (
            "[kafka]\nrequest_timeout = 0\n",
            {},
            "config key kafka.request_timeout: expected `float` > 0.0",
        ),
        ("[sink]\nretry_max = nan\n", {}, "config key sink.retry_max: expected a number, got NaN"),
        (
            "",
            {"PIPELINE_SINK__DPS__TIMEOUT": "NaN"},
            "config key sink.dps.timeout (from PIPELINE_SINK__DPS__TIMEOUT): expected a number, got NaN",
        ),
        (
            "[router]\ndedup_window = inf\n",
            {},
            "config key router.dedup_window: expected `float` <= 31536000.0",
        ),
        (
            "[kafka]\nstartup_timeout = -1\n",
            {},
            "config key kafka.startup_timeout: expected `float` >= 0.0",
        ),
        (
            "[metrics]\nstall_after = -0.5\n",
            {},
            "config key metrics.stall_after: expected `float` > 0.0",
        ),
        # ports
        ("[mqtt]\nport = 99999\n", {}, "config key mqtt.port: expected `int` <= 65535"),
        ("[mqtt]\nport = 0\n", {}, "config key mqtt.port: expected `int` >= 1"),
        ("[metrics]\nsink_port = -1\n", {}, "config key metrics.sink_port: expected `int` >= 0"),
        (
            "[kafka]\nbootstrap_servers = 'a:9092,b:99999'\n",
            {},
            "config key kafka.bootstrap_servers: 'b:99999' is not host:port with a port from 1 to 65535",
        ),
        (
            "[sink.dps]\nbase_url = 'http://dps:99999'\n",
            {},
            "config key sink.dps.base_url: 'http://dps:99999' is not an http:// or https:// URL with a host",
        ),
        # counts
        ("[sink]\nconcurrency = 0\n", {}, "config key sink.concurrency: expected `int` >= 1"),
        (
            "",
            {"PIPELINE_SINK__CONCURRENCY": "-5"},
            "config key sink.concurrency (from PIPELINE_SINK__CONCURRENCY): expected `int` >= 1",
        ),
        ("[router]\nbatch_max = 0\n", {}, "config key router.batch_max: expected `int` >= 1"),
        ("[kafka]\npartitions = -3\n", {}, "config key kafka.partitions: expected `int` >= 1"),
        (
            "[mqtt]\nmax_inflight = 70000\n",
            {},
            "config key mqtt.max_inflight: expected `int` <= 65535",
        ),
        ("[sink]\nrate_limit = 0.0\n", {}, "config key sink.rate_limit: expected `float` > 0.0"),
        # secrets of the wrong type (the value is never shown)
        (
            "[sink.dps]\napp_secret = 5\n",
            {},
            "config key sink.dps.app_secret: expected `str`, got `int`",
        ),
        (
            "[mqtt]\npassword = { a = 1 }\n",
            {},
            "config key mqtt.password: expected `str`, got `object`",
        ),
        ("[sink.dps]\napp_secret = ''\n", {}, "config key sink.dps.app_secret: must not be empty"),
        # the sink's mapping, checked at load time
        (
            "[sink]\nsn_from = '{product_id'\n",
            {},
            "config key sink.sn_from: not a valid template (expected '}' before end of string)",
        ),
        (
            "",
            {"PIPELINE_SINK__DEVICE_DATA": '{ siteName = "site" }'},
            (
                "config key sink.device_data.siteName (from PIPELINE_SINK__DEVICE_DATA): "
                f"'site' is neither a DeviceInfo field ({FIELDS}) nor extension_info.<key>"
            ),
        ),
        ("[sink]\norg_id = ''\n", {}, "config key sink.org_id: expected `str` of length >= 1"),
        # names
        (
            "[kafka]\nclient_id = ''\n",
            {},
            "config key kafka.client_id: expected `str` of length >= 1",
        ),
        (
            "[kafka.topics]\nadded = 'my topic'\n",
            {},
            "config key kafka.topics.added: expected `str` matching regex '^[A-Za-z0-9._-]{1,249}$'",
        ),
        (
            "[mqtt]\nshared_group = 'a/b'\n",
            {},
            "config key mqtt.shared_group: expected `str` matching regex '^[^/+#]+$'",
        ),
        # rules between keys
        (
            "[sink]\nretry_initial = 40\n",
            {},
            "config key sink.retry_max: must be >= sink.retry_initial (40)",
        ),
        (
            "[mqtt]\nreconnect_min = 5\nreconnect_max = 1\n",
            {},
            "config key mqtt.reconnect_max: must be >= mqtt.reconnect_min (5)",
        ),
        (
            "[kafka.topics]\nallocations = 'iotda.subdevices.added'\n",
            {},
            (
                "config key kafka.topics.allocations: 'iotda.subdevices.added' is also "
                "kafka.topics.added; every topic needs its own"
            ),
        ),
        (
            "[kafka]\nsecurity_protocol = 'SASL_PLAINTEXT'\n",
            {},
            "config key kafka.sasl_mechanism: required with kafka.security_protocol SASL_PLAINTEXT",
        ),
        (
            "[kafka]\nsasl_mechanism = 'PLAIN'\n",
            {},
            "config key kafka.sasl_mechanism: set, but kafka.security_protocol is PLAINTEXT (not SASL_...)",
        ),
        (
            "[kafka]\nsecurity_protocol = 'SASL_SSL'\nsasl_mechanism = 'SCRAM-SHA-512'\n",
            {},
            "config key kafka.sasl_username: required with SASL SCRAM-SHA-512",
        ),
        (
            "[mqtt.iotda]\ndevice_id = 'gw'\nsecret = 'x'\ntimestamp = '2025133199'\n",
            {},
            "config key mqtt.iotda.timestamp: '2025133199' is not a date and hour (YYYYMMDDHH)",
        ),
        # files the configuration names
        (
            "[mqtt.tls]\nenabled = true\nca_file = '/nonexistent/ca.pem'\n",
            {},
            "config key mqtt.tls.ca_file: cannot read /nonexistent/ca.pem: No such file or directory",
        ),
        (
            "[kafka]\nsecurity_protocol = 'SSL'\n[kafka.tls]\nkey_file = 'k.pem'\n",
            {},
            "config key kafka.tls.key_file: set without kafka.tls.cert_file",
        ),
        # enum
        (
            "[kafka]\nsecurity_protocol = 'TLS'\n",
            {},
            "config key kafka.security_protocol: invalid enum value 'TLS'",
        ),
    ],
)
def test_bad_value_names_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, toml), env)
    assert str(info.value) == message


def test_tls_files_are_checked_when_tls_is_on(tmp_path: Path) -> None:
    """Readable, and loadable as the client will load them; not read while TLS is off."""
    cfg = load_config(write(tmp_path, "[mqtt.tls]\nca_file = '/nonexistent/ca.pem'\n"), {})
    assert cfg.mqtt.tls.ca_file == "/nonexistent/ca.pem"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[mqtt.tls]\nenabled = true\nca_file = '{junk}'\n"), {})
    assert str(info.value) == (
        "config key mqtt.tls.ca_file: not a PEM bundle of CA certificates "
        "(NO_CERTIFICATE_OR_CRL_FOUND)"
    )
    env = {"PIPELINE_KAFKA__SECURITY_PROTOCOL": "SSL", "PIPELINE_KAFKA__TLS__CERT_FILE": str(junk)}
    with pytest.raises(ConfigError) as info:
        load_config(environ=env)
    assert str(info.value).startswith(
        "config key kafka.tls.cert_file (from PIPELINE_KAFKA__TLS__CERT_FILE): "
        "no usable certificate and key ([SSL] PEM lib"
    )
    # The DPS client's CA bundle, loaded the same way (it is always in use when set).
    env = {"PIPELINE_SINK__DPS__CA_FILE": str(junk)}
    with pytest.raises(ConfigError) as info:
        load_config(environ=env)
    assert str(info.value) == (
        "config key sink.dps.ca_file (from PIPELINE_SINK__DPS__CA_FILE): not a PEM bundle of "
        "CA certificates (NO_CERTIFICATE_OR_CRL_FOUND)"
    )
    ca, cert, key = make_certs(tmp_path)
    toml = (
        f"[mqtt.tls]\nenabled = true\nca_file = '{ca}'\ncert_file = '{cert}'\nkey_file = '{key}'\n"
    )
    assert load_config(write(tmp_path, toml), {}).mqtt.tls.cert_file == str(cert)
    assert load_config(environ={"PIPELINE_SINK__DPS__CA_FILE": str(ca)}).sink.dps.ca_file == str(ca)


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


def _pythonpath() -> dict[str, str]:
    """Keep PYTHONPATH, so the subprocess runs this checkout's package."""
    return {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}


def test_cli_bad_config_one_line_exit_2(tmp_path: Path) -> None:
    path, env = _secret_config(tmp_path)
    text = path.read_text(encoding="utf-8") + "[kafka]\npartitions = 'x'\n"
    path.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(path), "topics", "create"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **_pythonpath(), **env},
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


def _keys(struct: type[msgspec.Struct], prefix: str) -> list[tuple[str, str]]:
    """(table, key) for every scalar key of ``struct``; tables are recursed into."""
    out = []
    for field in msgspec.structs.fields(struct):
        name, kind = field.name, field.type
        inner = next((t for t in getattr(kind, "__args__", (kind,)) if isinstance(t, type)), kind)
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            out += _keys(inner, f"{prefix}.{name}".lstrip("."))
        elif getattr(kind, "__origin__", None) is dict:
            out.append((f"{prefix}.{name}".lstrip("."), ""))  # a table of its own
        else:
            out.append((prefix, name))
    return out


def test_example_config_lists_every_key() -> None:
    """Each key appears in its table, set or commented out (`# key = ...`)."""
    text = (ROOT / "pipeline.example.toml").read_text(encoding="utf-8")
    tables: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^#?\s*\[([a-z_.]+)\]\s*$", line)
        if header:
            current = header[1]
            tables.setdefault(current, [])
        elif current is not None and (key := re.match(r"^#?\s*([a-z_]+)\s*=", line)):
            tables[current].append(key[1])
    missing = [
        f"{table}.{key}" if key else f"[{table}]"
        for table, key in _keys(Config, "")
        if table not in tables or (key and key not in tables[table])
    ]
    assert missing == []
    assert len(_keys(Config, "")) > 60  # the walk itself found the keys


def test_to_environ_gives_back_the_same_configuration() -> None:
    # The one conversion the tools and tests use to start a worker on a configuration.
    base = load_config(environ={})
    replace = msgspec.structs.replace
    changed = replace(
        base,
        mqtt=replace(
            base.mqtt,
            port=1234,
            password=Secret('p"w'),
            iotda=IotdaAuthConfig(device_id="gw", secret=Secret("s")),
        ),
        kafka=replace(base.kafka, topics=Topics(added="x.y"), liveness_interval=0.5),
        sink=replace(
            base.sink,
            device_data={"deviceName": "name", 'q"uote': "model"},
            org_overrides={"p1": "o1"},
            rate_limit=12.5,
        ),
        metrics=replace(base.metrics, enabled=False),
    )
    env = to_environ(changed)
    assert load_config(environ=env) == changed
    assert env["PIPELINE_MQTT__PASSWORD"] == 'p"w'  # revealed: the child needs it
    assert "PIPELINE_MQTT__HOST" not in env  # defaults are left to the defaults
    fleet = replace(base, mqtt=replace(base.mqtt, gateways=["a", "b"], shard="1/2"))
    assert load_config(environ=to_environ(fleet)) == fleet
    assert to_environ(base) == {}
