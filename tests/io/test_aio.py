"""The one backoff: capped exponential with jitter, honouring a floor."""

from __future__ import annotations

from pipeline.io.aio import Backoff


def test_backoff_is_capped_jittered_and_honours_a_floor() -> None:
    backoff = Backoff(0.5, 30)
    assert 0.25 <= backoff.next() <= 0.5
    assert backoff.next(7.0) == 7.0  # a Retry-After above the schedule wins
    for _ in range(18):
        backoff.next()
    assert 15 <= backoff.next() <= 30  # capped
    assert backoff.attempts == 21
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


def test_backoff_without_jitter_doubles() -> None:
    backoff = Backoff(1, 10, jitter=0)
    assert [backoff.next() for _ in range(6)] == [1, 2, 4, 8, 10, 10]
