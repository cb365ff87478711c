"""kube.TokenBucket (the client-side rate limit) and Retry-After parsing, on an injected
clock: nothing here sleeps."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from lorajob_operator.kube import (
    RETRY_AFTER_DEFAULT,
    RETRY_AFTER_MAX,
    TokenBucket,
    _throttle_delay,
    retry_after_seconds,
)


class ManualClock:
    """Time moves only when the test says so; sleepers wake when it passes their time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.sleepers.append((self.now + seconds, future))
        await future

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for wake, future in list(self.sleepers):
            if wake <= self.now + 1e-9:
                self.sleepers.remove((wake, future))
                future.set_result(None)


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until `condition` holds (a bounded number of turns)."""
    for _ in range(100):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def bucket(qps: float, burst: int) -> tuple[TokenBucket, ManualClock]:
    clock = ManualClock()
    return TokenBucket(qps, burst, clock=clock, sleep=clock.sleep), clock


# --- the token bucket ----------------------------------------------------------------


def test_a_full_bucket_lets_burst_requests_through_then_one_per_interval() -> None:
    limiter, _ = bucket(qps=10, burst=3)
    delays = [limiter.reserve() for _ in range(6)]
    assert delays == pytest.approx([0, 0, 0, 0.1, 0.2, 0.3])


def test_tokens_come_back_at_qps_and_never_beyond_burst() -> None:
    limiter, clock = bucket(qps=10, burst=3)
    for _ in range(3):
        limiter.reserve()
    clock.advance(0.2)  # two tokens back
    assert [limiter.reserve() for _ in range(3)] == pytest.approx([0, 0, 0.1])
    clock.advance(3600)  # a quiet hour saves `burst` tokens, not 36000
    assert [limiter.reserve() for _ in range(4)] == pytest.approx([0, 0, 0, 0.1])


def test_a_token_at_hand_is_no_wait_on_the_real_clock() -> None:
    async def scenario() -> list[float]:
        limiter = TokenBucket(1000, 5)
        return [await limiter.acquire() for _ in range(5)]

    assert asyncio.run(scenario()) == [0.0] * 5


def test_no_limit_never_waits() -> None:
    limiter, _ = bucket(qps=math.inf, burst=1)
    assert all(limiter.reserve() == 0 for _ in range(1000))


@pytest.mark.parametrize(("qps", "burst"), [(0, 1), (-1, 1), (math.nan, 1), (1, 0)])
def test_a_limit_that_allows_nothing_is_refused(qps: float, burst: int) -> None:
    with pytest.raises(ValueError, match="qps > 0 and burst >= 1"):
        TokenBucket(qps, burst)


def test_a_pause_holds_every_request_and_resumes_at_qps_without_a_burst() -> None:
    limiter, clock = bucket(qps=10, burst=5)
    limiter.pause(2.0)
    # The tokens saved (a full bucket) and those due during the pause are gone:
    # after the pause, one request per interval.
    assert [limiter.reserve() for _ in range(3)] == pytest.approx([2.0, 2.1, 2.2])
    clock.advance(10)
    assert limiter.reserve() == 0  # the bucket fills again afterwards


def test_a_shorter_pause_never_shortens_a_running_one() -> None:
    limiter, clock = bucket(qps=math.inf, burst=1)
    limiter.pause(5.0)
    clock.advance(1.0)
    limiter.pause(1.0)
    assert limiter.reserve() == pytest.approx(4.0)
    limiter.pause(6.0)  # a later end extends it
    assert limiter.reserve() == pytest.approx(6.0)


def test_acquire_waits_for_its_token() -> None:
    async def scenario() -> None:
        limiter, clock = bucket(qps=10, burst=1)
        assert await limiter.acquire() == 0
        waiter = asyncio.create_task(limiter.acquire())
        await until(lambda: len(clock.sleepers) == 1)
        assert clock.sleepers[0][0] == pytest.approx(0.1)
        clock.advance(0.1)
        assert await waiter == pytest.approx(0.1)

    asyncio.run(scenario())


def test_a_pause_that_starts_while_requests_wait_holds_them_too() -> None:
    """A request already waiting for its token when the server says "retry after 3s"
    does not go at its token's time but at the end of the pause."""

    async def scenario() -> None:
        limiter, clock = bucket(qps=10, burst=1)
        await limiter.acquire()
        waiter = asyncio.create_task(limiter.acquire())
        await until(lambda: len(clock.sleepers) == 1)  # due at 0.1
        limiter.pause(3.0)
        clock.advance(0.1)
        await until(lambda: len(clock.sleepers) == 1 and clock.sleepers[0][0] > 0.1)
        assert not waiter.done()
        assert clock.sleepers[0][0] == pytest.approx(3.0)
        clock.advance(2.9)
        assert await waiter == pytest.approx(3.0)

    asyncio.run(scenario())


def test_waiters_go_in_arrival_order() -> None:
    async def scenario() -> None:
        limiter, clock = bucket(qps=1, burst=1)
        await limiter.acquire()
        done: list[int] = []

        async def request(n: int) -> None:
            await limiter.acquire()
            done.append(n)

        def finished(count: int) -> Callable[[], bool]:
            return lambda: len(done) == count

        tasks = [asyncio.create_task(request(n)) for n in range(3)]
        await until(lambda: len(clock.sleepers) == 3)
        for n in range(3):
            clock.advance(1.0)
            await until(finished(n + 1))
            assert done == list(range(n + 1))
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


# --- Retry-After ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("1", 1.0),
        ("7", 7.0),
        (" 2 ", 2.0),
        ("0", 0.0),
        ("0.5", 0.5),
        ("3600", RETRY_AFTER_MAX),  # capped
        (None, RETRY_AFTER_DEFAULT),  # missing
        ("", RETRY_AFTER_DEFAULT),
        ("soon", RETRY_AFTER_DEFAULT),
        ("-5", RETRY_AFTER_DEFAULT),
        ("nan", RETRY_AFTER_DEFAULT),
        ("inf", RETRY_AFTER_DEFAULT),
    ],
)
def test_retry_after_seconds(header: str | None, seconds: float) -> None:
    assert retry_after_seconds(header) == seconds


def test_retry_after_as_an_http_date() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert retry_after_seconds("Fri, 02 Jan 2026 03:04:15 GMT", now=now) == 10.0
    assert retry_after_seconds("Fri, 02 Jan 2026 03:04:00 GMT", now=now) == 0.0  # past
    assert retry_after_seconds("Sat, 03 Jan 2026 03:04:05 GMT", now=now) == RETRY_AFTER_MAX


@pytest.mark.parametrize(
    ("status", "headers", "delay"),
    [
        (429, {"Retry-After": "2"}, 2.0),
        (429, {}, RETRY_AFTER_DEFAULT),  # 429 is always "try again later"
        (503, {"Retry-After": "3"}, 3.0),
        (503, {"Retry-After": "x"}, RETRY_AFTER_DEFAULT),
        (503, {}, None),  # an unavailable API, not throttling: an answer
        (500, {"Retry-After": "1"}, None),
        (403, {"Retry-After": "1"}, None),  # never retry another 4xx
        (409, {}, None),
        (200, {"Retry-After": "1"}, None),
    ],
)
def test_which_answers_are_retried(
    status: int, headers: dict[str, str], delay: float | None
) -> None:
    assert _throttle_delay(status, headers) == delay
