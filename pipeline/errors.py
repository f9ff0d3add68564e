"""One exception hierarchy for the package; each class says whether a retry can help.

What the command line makes of them (:mod:`pipeline.cli`): :class:`ConfigError` and
:class:`InputError` exit 2 (the operator's fix, one line); :class:`ServiceUnreachable`,
:class:`StageFailed` and :class:`DpsError` exit 1 (a restart or the service's return
cures them); :class:`InternalError` and anything unexpected exit 70 with the traceback
(a bug).
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DecodeError",
    "DpsError",
    "DpsRejected",
    "DpsTransient",
    "DpsUnanswered",
    "InputError",
    "InternalError",
    "MappingError",
    "PipelineError",
    "ServiceUnreachable",
    "StageFailed",
]


class PipelineError(Exception):
    """Root of every error this package raises.

    Attributes:
        retriable: the same operation, tried again later, may succeed (a service that
            did not answer, DPS throttling); False when only a change of the input, the
            configuration or the code can help.
    """

    retriable: bool = False


class StageFailed(PipelineError):
    """A stage cannot go on safely; the process exits non-zero so the orchestrator restarts it.

    Raised, for example, when a rebalance callback failed: going on without the
    de-duplication window or the recorded outcomes would weaken the guarantees.
    """


class ConfigError(PipelineError):
    """The configuration is invalid; the message is one line naming the key.

    Attributes:
        key: the dotted key at fault (``sink.sn_from``), when one is.
        reason: what is wrong with it, without the key.
    """

    def __init__(self, message: str, *, key: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.reason = reason or message

    @classmethod
    def at(cls, key: str, reason: str) -> ConfigError:
        """``config key {key}: {reason}``."""
        return cls(f"config key {key}: {reason}", key=key, reason=reason)


class InputError(PipelineError):
    """What the operator gave a command is wrong: a fixture line, a devices file, an argument.

    The message is one line naming the file and line, or the argument, and what is wrong
    (``fixtures/day1.jsonl:17: qos must be 0 or 1, got 2``).
    """


class InternalError(PipelineError):
    """An invariant of the code itself broke: a bug, neither the input nor a service.

    The stage stops rather than go on with a broken invariant; the command line logs the
    traceback and exits 70 (``EX_SOFTWARE``).
    """


class ServiceUnreachable(PipelineError):
    """A service (Kafka, MQTT) did not answer, or refused us; the message says which.

    One line naming the service, its address and why:
    ``Kafka 127.0.0.1:9092 not reachable: connection refused``.

    Attributes:
        service: ``Kafka`` or ``MQTT``.
        address: where it was looked for (``127.0.0.1:9092``).
        reason: the last error, in words (``connection refused``).
    """

    retriable = True

    def __init__(
        self,
        service: str,
        address: str,
        reason: str,
        *,
        waited: float | None = None,
        refused: bool = False,
    ) -> None:
        within = f" within {waited:g} s" if waited else ""
        what = "refused the connection" if refused else f"not reachable{within}"
        super().__init__(f"{service} {address} {what}: {reason}")
        self.service = service
        self.address = address
        self.reason = reason


class DecodeError(PipelineError):
    """A payload could not be decoded; the message names the field at fault."""


class MappingError(PipelineError):
    """A child record cannot be mapped to a DPS request (sn, orgId or deviceData)."""


class DpsError(PipelineError):
    """DPS answered with an error, or could not be reached.

    Attributes:
        code: the DPS/API-gateway ``code`` (the token service's ``status``) when the
            answer carried one; None when it had no envelope (an HTML error page) or no
            answer came.
        msg: the message DPS gave, or a description of the transport failure.
        http_status: the HTTP status of the answer; None when none came (a timeout, a
            refused or cut connection).
        request_id: DPS's ``requestId`` when it sent one.
        retry_after: seconds the server asked us to wait (``Retry-After``), if any.
        hint: what the operator should check, when the failure is one only they can fix
            (credentials, ``base_url``, CA); None when retrying is all it takes.
        throttled: the server asked us to slow down (HTTP 429), not a failure of DPS.
    """

    def __init__(
        self,
        code: int | None,
        msg: str,
        *,
        request_id: str | None = None,
        retry_after: float | None = None,
        hint: str | None = None,
        throttled: bool = False,
        http_status: int | None = None,
    ) -> None:
        super().__init__(f"DPS error {code}: {msg}" if code is not None else f"DPS error: {msg}")
        self.code = code
        self.msg = msg
        self.http_status = http_status
        self.request_id = request_id
        self.retry_after = retry_after
        self.hint = hint
        self.throttled = throttled

    def diagnosis(self) -> str:
        """One line for an operator: the code, DPS's message, and the hint if there is one."""
        what = f"DPS code {self.code}" if self.code is not None else "DPS"
        return f"{what} ({self.msg}): {self.hint}" if self.hint else f"{what}: {self.msg}"


class DpsRejected(DpsError):
    """DPS said no for business reasons (35400, 35404, 35601, 99400, ...): do not retry."""

    retriable = False


class DpsTransient(DpsError):
    """Throttling, server errors, timeouts, connection errors, 1005 and 1203: retry later."""

    retriable = True


class DpsUnanswered(DpsTransient):
    """A DPS call that was sent and never answered: it timed out, or its connection broke.

    It may have taken effect: before an allocate is sent again, the sink asks DPS
    (Get DPS Device) whether the first one did.
    """
