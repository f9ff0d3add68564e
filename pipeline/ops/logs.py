"""JSON-lines logging on stderr: one object per line, easy to ship and to grep.

The Kafka client library logs its own retries: every failed reconnect, metadata refresh
and coordinator lookup, at warning or error, hundreds of lines a minute during an outage
and a few at every start while the group coordinator loads. Those are conditions the
library retries by design (the pipeline reports what matters to an operator in its own
words), so :class:`LibraryNoise` keeps them at debug, and shows any other aiokafka
warning or error that repeats at most once a minute.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, ClassVar, TextIO

import orjson
from aiokafka.errors import KafkaError

from pipeline.ops.tracing import log_ids

__all__ = ["LibraryNoise", "setup_logging"]


class JsonFormatter(logging.Formatter):
    """Format a record as ``{"ts", "level", "logger", "msg", ...extra}``.

    A line written while a message or record is handled carries its ``trace_id`` and
    ``span_id`` (:mod:`pipeline.ops.tracing`).
    """

    _RESERVED: ClassVar[frozenset[str]] = frozenset(
        logging.LogRecord("", 0, "", 0, "", (), None).__dict__
    ) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(
            (k, v)
            for k, v in record.__dict__.items()
            if k not in self._RESERVED and not k.startswith("_")
        )
        if (ids := log_ids()) is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=repr).decode()


# aiokafka messages that are retries by design even when no exception is attached to
# them (the others carry the error they retry, which says so: see _retried).
_RETRY_MESSAGES = frozenset(
    {
        "Unable to update metadata from %s",
        "Marking the coordinator dead (node %s)for group %s.",
        "Heartbeat failed for group %s: coordinator (node %s) is either not started or not valid",
        "Heartbeat failed for group %s because it is rebalancing",
        "Heartbeat session expired - marking coordinator dead",
        "No broker metadata found in MetadataResponse -- ignoring.",
        "Topic %s is not available during auto-create initialization",
        "Topic %s not found in cluster metadata",  # just created: metadata still spreading
        "Got error produce response on topic-partition %s, retrying. Error: %s",
    }
)


def _retried(error: object) -> bool:
    """An error (instance or class) the client library retries by itself."""
    kind = error if isinstance(error, type) else type(error)
    if not issubclass(kind, BaseException):
        return False
    if issubclass(kind, OSError | TimeoutError):
        return True  # connection refused / reset / timed out
    # aiokafka's own flag: connection and node errors, coordinator not available or
    # loading, not coordinator, leader not available / not leader, stale metadata,
    # unknown topic (metadata still spreading), not enough replicas, request timed out.
    return issubclass(kind, KafkaError) and bool(getattr(kind, "retriable", False))


class LibraryNoise(logging.Filter):
    """Handler filter for a client library's loggers (``aiokafka`` and below).

    - Transient conditions the library retries by itself (connection errors, coordinator
      not available or loading, metadata and leader changes, produce retries) become
      debug records: dropped unless ``level`` is debug, then shown at debug.
    - Any other warning or error of the library is shown, and then not again for
      ``every`` seconds; the next one shown carries ``suppressed``: how many were not.

    Records of other loggers pass untouched. (A filter on the ``aiokafka`` logger itself
    would not see its children's records, which only propagate to handlers.)

    Args:
        level: the configured level (``logging.INFO``...).
        library: the logger name prefix to act on.
        every: seconds between two records with the same message template, at least.
    """

    def __init__(self, level: int, library: str = "aiokafka", every: float = 60.0) -> None:
        super().__init__()
        self._level = level
        self._library = library
        self._every = every
        self._shown: dict[tuple[str, object], float] = {}
        self._suppressed: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep, demote (in place) or drop ``record``."""
        name = record.name
        if record.levelno < logging.WARNING or not (
            name == self._library or name.startswith(self._library + ".")
        ):
            return True
        if self.transient(record):
            if self._level > logging.DEBUG:
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return True
        key = (name, record.msg)
        now = time.monotonic()
        last = self._shown.get(key)
        if last is not None and now - last < self._every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._shown[key] = now
        if suppressed := self._suppressed.pop(key, 0):
            record.suppressed = suppressed
        return True

    @staticmethod
    def transient(record: logging.LogRecord) -> bool:
        """A condition the library retries by itself (see the class)."""
        if record.msg in _RETRY_MESSAGES:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        return any(_retried(arg) for arg in args)


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record to stderr as JSON lines, at ``level`` and above."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    numeric = logging.getLevelName(level.upper())
    handler.addFilter(LibraryNoise(numeric))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Library chatter at info is per-connection noise; keep warnings (LibraryNoise then
    # demotes aiokafka's retries to debug).
    for noisy in ("aiokafka", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
