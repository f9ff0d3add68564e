"""The brokers a test run owns, and what each test leaves behind: nothing.

- One Kafka for the run, started by the controlling pytest process (before the xdist
  workers exist) on free ports, with its state in a temporary directory; the workers
  find it through ``PIPELINE_TEST_KAFKA``. Set that variable yourself to run the suite
  on a broker of your own instead.
- One Mosquitto per xdist worker, with the project's settings (``deploy/local``), on a
  free port: tests subscribe to the real ``$oc/devices/+/sys/events/down`` filter, so
  workers running side by side must not share a broker.
- A run never connects to 127.0.0.1:1883 or :9092: they may be someone else's.
- After each test, the ``cfg`` fixture removes what the test created: the MQTT sessions
  it asked the broker to keep, and the Kafka topics and consumer groups named after its
  ``uid``. At the end, each worker checks its Mosquitto holds no session, and the
  controller that Kafka holds no topic and no group; either leftover fails the run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import io
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from pipeline.config import Config, KafkaConfig, MqttConfig, Topics, load_config
from pipeline.ops.logs import JsonFormatter, setup_logging
from pipeline.tools.services import Brokers, LocalKafka, LocalMosquitto, free_port, kafka_answers
from tests import harness

T = TypeVar("T")

KAFKA_ENV = "PIPELINE_TEST_KAFKA"
"""Bootstrap address of the run's Kafka; set by the controller, or by you."""
_KAFKA = pytest.StashKey[LocalKafka]()
_STATE = pytest.StashKey[Path]()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to the end in a loop of its own (from sync code, whatever loop is set)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


EVENT_LOOP_ENV = "PIPELINE_TEST_EVENT_LOOP"
"""``uvloop``: every in-process async test runs on uvloop, as the router and the sink do
(``[runtime] event_loop = "auto"``); unset, on asyncio's loop (``make test-uvloop``)."""

if os.environ.get(EVENT_LOOP_ENV) == "uvloop":

    def pytest_asyncio_loop_factories(
        config: pytest.Config,
        item: pytest.Item,
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        """pytest-asyncio's hook: the loop every async test of this run runs on."""
        import uvloop  # noqa: PLC0415  (only for this run)

        return {"uvloop": uvloop.new_event_loop}


def _controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, so that side by side (xdist) the run ends with short ones."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_configure(config: pytest.Config) -> None:
    """The controller starts the run's Kafka in the background (collection goes on)."""
    if not _controller(config) or os.environ.get(KAFKA_ENV):
        return
    if "not services" in (config.option.markexpr or ""):
        return
    state = Path(tempfile.mkdtemp(prefix="pipeline-test-run-"))
    broker = LocalKafka(state / "kafka")
    broker.start()  # from the main thread: it dies with this process, even by SIGKILL
    os.environ[KAFKA_ENV] = broker.bootstrap
    config.stash[_KAFKA] = broker
    config.stash[_STATE] = state


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """What the last test left is collected; the controller checks Kafka was left empty."""
    gc.collect()
    broker = session.config.stash.get(_KAFKA, None)
    if broker is None or not _controller(session.config):
        return
    if not run_sync(kafka_answers(broker.bootstrap)):
        return  # still starting: no test used it
    topics, groups = run_sync(_left_in(broker.bootstrap))
    if topics or groups:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = f"the run left in Kafka: topics {sorted(topics)}, consumer groups {sorted(groups)}"
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


async def _left_in(bootstrap: str, settle: float = 10) -> tuple[set[str], set[str]]:
    """What the cluster holds once the deletions the last tests asked for are done."""
    deadline = asyncio.get_running_loop().time() + settle
    while True:
        topics, groups = await harness.kafka_contents(bootstrap)
        if not (topics or groups) or asyncio.get_running_loop().time() > deadline:
            return topics, groups
        await asyncio.sleep(0.2)


def pytest_unconfigure(config: pytest.Config) -> None:
    broker = config.stash.get(_KAFKA, None)
    if broker is not None:
        broker.stop()
        shutil.rmtree(config.stash[_STATE], ignore_errors=True)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Services]:
    """The run's Kafka (waited for) and this worker's own Mosquitto."""
    bootstrap = os.environ.get(KAFKA_ENV)
    if bootstrap is None:
        pytest.fail(f"no Kafka for this run: {KAFKA_ENV} is not set (-m 'not services'?)")

    async def up() -> None:
        async with asyncio.timeout(90):
            while not await kafka_answers(bootstrap):
                await asyncio.sleep(0.1)
            await broker.ready()

    broker = LocalMosquitto(tmp_path_factory.mktemp("mosquitto"), free_port(), "sys_interval 1\n")
    broker.start()
    try:
        run_sync(up())
        found = harness.Services(Brokers(broker.port, bootstrap), broker)
        yield found
        found.finish_cleaning()
        run_sync(found.retry_deferred())
        held = harness.held_sessions(broker.port, broker.persistent_clients())
        assert not held, f"this worker's Mosquitto still keeps the sessions of {sorted(held)}"
    finally:
        broker.stop()


@pytest.fixture(autouse=True)
def reap_workers() -> Iterator[None]:
    """No worker a test started outlives it, even when the test fails half way.

    Then the test's cyclic garbage is collected here, where its finalizers run safely.
    Left to a later collection, one can land inside ``ast.parse`` (pytest rewriting a
    module it imports late, such as hypothesis's at the session's end); a finalizer that
    logs a traceback (an asyncio task's exception never retrieved) makes CPython 3.11
    parse again, for the caret marks, and the outer parse fails with "SystemError: AST
    constructor recursion depth mismatch" (cpython gh-106905: its AST state is shared,
    and 3.11.7 and Debian's 3.11.2 predate the fix), ending the whole run.
    """
    yield
    harness.reap()
    gc.collect()


@pytest.fixture
def uid() -> str:
    """A short id unique to this test, for topic names, client ids and group ids."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def cfg(services: harness.Services, uid: str) -> Iterator[Config]:
    """The default configuration on this run's brokers, with topics, groups and client ids
    unique to this test; what the test created there is removed after it."""
    base = services.brokers.configure(load_config(environ={}))
    topics = Topics(**{f: f"{getattr(Topics(), f)}.{uid}" for f in Topics.__struct_fields__})
    mark = services.mosquitto.log_size()
    yield msgspec.structs.replace(
        base,
        mqtt=msgspec.structs.replace(base.mqtt, client_id=f"ingest-{uid}"),
        # (the client id names the redrive tool's consumer groups too)
        kafka=msgspec.structs.replace(base.kafka, topics=topics, client_id=f"iot-pipeline-{uid}"),
        router=msgspec.structs.replace(
            base.router, group_id=f"router-{uid}", transactional_id=f"router-{uid}"
        ),
        sink=msgspec.structs.replace(base.sink, group_id=f"sink-{uid}"),
        metrics=msgspec.structs.replace(base.metrics, enabled=False),
    )
    harness.reap()  # first: a worker still running would make what is removed again
    services.clean_later(uid, since=mark)


@pytest.fixture
def mqtt_cfg(cfg: Config) -> MqttConfig:
    return cfg.mqtt


@pytest.fixture
def kafka_cfg(cfg: Config) -> KafkaConfig:
    return cfg.kafka


@pytest.fixture(autouse=True)
def logging_restored() -> Iterator[None]:
    """The logging setup as it was before the test: a CLI run in-process replaces it with
    its own (JSON lines at its level), and the next tests' captured logs would go missing.

    Only what ``setup_logging`` installs is removed: pytest adds and removes its capture
    handlers around each phase by itself.
    """
    root = logging.getLogger()
    names = ("aiokafka", "aiohttp.access")
    level, levels = root.level, [logging.getLogger(n).level for n in names]
    yield
    for handler in root.handlers[:]:
        if isinstance(handler.formatter, JsonFormatter):
            root.removeHandler(handler)
    root.setLevel(level)
    for name, saved in zip(names, levels, strict=True):
        logging.getLogger(name).setLevel(saved)


@pytest.fixture
def json_logs() -> Callable[[str], io.StringIO]:
    """``setup_logging(level)`` into a fresh buffer (``logging_restored`` undoes it)."""

    def setup(level: str) -> io.StringIO:
        stream = io.StringIO()
        setup_logging(level, stream)
        return stream

    return setup
