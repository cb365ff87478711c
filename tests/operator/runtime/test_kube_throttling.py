"""kube.Kube against a tiny local HTTP server that throttles like API Priority and Fairness:
429 with Retry-After, then the answer. Time is a fake clock the limiter's sleep moves
on, so a "Retry-After: 30" costs nothing."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client
from lorajob_operator import kube as kube_module
from lorajob_operator.kube import Kube, KubeError, PodRejected, TokenBucket
from lorajob_operator.metrics import Metrics

NS = "default"
JOB_PATH = "/apis/finetune.loraops.dev/v1alpha1/namespaces/default/lorajobs/j"
PODS_PATH = "/api/v1/namespaces/default/pods"


@dataclass
class Hit:
    method: str
    path: str
    at: float  # the fake clock when the request arrived
    body: bytes


class FakeTime:
    """A clock that moves only when the limiter sleeps: to the sleeper's wake time
    (sleeps that overlap do not add up)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.wakes: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        wake = self.now + seconds
        self.wakes.append(wake)
        self.now = max(self.now, wake)
        await asyncio.sleep(0)


Answer = tuple[int, dict[str, str], Any]  # status, headers, JSON body (or bytes)


@dataclass
class Server:
    """Answers each request with the next scripted answer (the last one repeats)."""

    answers: list[Answer]
    time: FakeTime
    hits: list[Hit] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(Hit(request.method, request.path, self.time.now, await request.read()))
        status, headers, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(body, bytes):
            return web.Response(status=status, headers=headers, body=body)
        return web.json_response(body, status=status, headers=headers)


def throttled(retry_after: str | None = "1", status: int = 429) -> Answer:
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    return (
        status,
        headers,
        {"kind": "Status", "message": "Too many requests, please try again later."},
    )


OK_JOB: Answer = (200, {}, {"metadata": {"name": "j"}})


@asynccontextmanager
async def serving(
    answers: list[Answer], qps: float = math.inf, burst: int = 1, real_time: bool = False
) -> AsyncIterator[tuple[Kube, Server, Metrics]]:
    time = FakeTime()
    server = Server(answers, time)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    metrics = Metrics()
    kube = Kube(
        client.ApiClient(client.Configuration(host=f"http://{host}:{port}")),
        limiter=None if real_time else TokenBucket(qps, burst, clock=time, sleep=time.sleep),
        metrics=metrics,
    )
    try:
        yield kube, server, metrics
    finally:
        await kube.close()
        await runner.cleanup()


def run(
    answers: list[Answer],
    scenario: Callable[[Kube, Server, Metrics], Awaitable[None]],
    **limit: Any,
) -> None:
    async def main() -> None:
        async with serving(answers, **limit) as (kube, server, metrics):
            await scenario(kube, server, metrics)

    asyncio.run(main())


def count(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("lorajob_api_throttled_total", {"reason": reason})
    return float(value or 0)


def test_a_throttled_request_is_sent_again_after_retry_after() -> None:
    async def scenario(kube: Kube, server: Server, metrics: Metrics) -> None:
        assert await kube.get_job(NS, "j") == {"metadata": {"name": "j"}}
        assert [(h.method, h.path) for h in server.hits] == [("GET", JOB_PATH)] * 3
        assert [h.at for h in server.hits] == [0.0, 2.0, 3.0]  # Retry-After 2, then 1
        assert count(metrics, "server") == 2
        # Both retries waited in the limiter for the server's pause.
        assert count(metrics, "client") == 2
        seconds = metrics.registry.get_sample_value("lorajob_api_throttle_wait_seconds_total")
        assert seconds == pytest.approx(3.0)

    run([throttled("2"), throttled("1"), OK_JOB], scenario)


def test_missing_or_bad_retry_after_waits_a_second_and_a_long_one_is_capped() -> None:
    async def scenario(kube: Kube, server: Server, _: Metrics) -> None:
        assert await kube.get_job(NS, "j") is not None
        assert [h.at for h in server.hits] == [0.0, 1.0, 2.0]

    run([throttled(None), throttled("later"), OK_JOB], scenario)

    async def capped(kube: Kube, server: Server, _: Metrics) -> None:
        assert await kube.get_job(NS, "j") is not None
        assert [h.at for h in server.hits] == [0.0, kube_module.RETRY_AFTER_MAX]

    run([throttled("86400"), OK_JOB], capped)


def test_the_server_is_asked_a_bounded_number_of_times() -> None:
    async def scenario(kube: Kube, server: Server, metrics: Metrics) -> None:
        with pytest.raises(KubeError, match="Too many requests"):
            await kube.get_job(NS, "j")
        assert len(server.hits) == kube_module.THROTTLE_MAX_TRIES
        assert count(metrics, "server") == kube_module.THROTTLE_MAX_TRIES

    run([throttled("1")], scenario)


def test_no_retry_is_started_past_the_deadline() -> None:
    async def scenario(kube: Kube, server: Server, _: Metrics) -> None:
        with pytest.raises(KubeError, match="Too many requests"):
            await kube.get_job(NS, "j")
        # 0 and 30 and 60 fit THROTTLE_DEADLINE (60 s), a try at 90 would not.
        assert [h.at for h in server.hits] == [0.0, 30.0, 60.0]

    run([throttled("30")], scenario)


def test_503_is_retried_only_with_retry_after() -> None:
    async def with_header(kube: Kube, server: Server, metrics: Metrics) -> None:
        assert await kube.get_job(NS, "j") is not None
        assert len(server.hits) == 2
        assert count(metrics, "server") == 1

    run([throttled("1", status=503), OK_JOB], with_header)

    async def without(kube: Kube, server: Server, metrics: Metrics) -> None:
        with pytest.raises(KubeError):
            await kube.get_job(NS, "j")
        assert len(server.hits) == 1
        assert count(metrics, "server") == 0

    run([throttled(None, status=503), OK_JOB], without)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422, 500])
def test_other_errors_are_never_retried(status: int) -> None:
    async def scenario(kube: Kube, server: Server, metrics: Metrics) -> None:
        with pytest.raises(KubeError):
            await kube.list_trainer_pods(NS)
        assert len(server.hits) == 1
        assert count(metrics, "server") == count(metrics, "client") == 0

    run([(status, {"Retry-After": "1"}, {"message": "no"}), (200, {}, {"items": []})], scenario)


def test_a_create_refused_by_throttling_is_sent_again_unchanged() -> None:
    pod = {"metadata": {"name": "p", "labels": {}}, "spec": {"containers": []}}

    async def scenario(kube: Kube, server: Server, _: Metrics) -> None:
        assert await kube.create_pod(NS, pod) == {"metadata": {"name": "p"}}
        assert [(h.method, h.path) for h in server.hits] == [("POST", PODS_PATH)] * 2
        assert [json.loads(h.body) for h in server.hits] == [pod, pod]

    run([throttled("1"), (201, {}, {"metadata": {"name": "p"}})], scenario)


def test_a_refused_create_is_still_a_refusal() -> None:
    async def scenario(kube: Kube, server: Server, _: Metrics) -> None:
        with pytest.raises(PodRejected, match="forbidden"):
            await kube.create_pod(NS, {"metadata": {"name": "p"}})
        assert len(server.hits) == 2

    run([throttled("1"), (403, {}, {"message": "forbidden by policy"})], scenario)


def test_opening_a_watch_is_throttled_and_retried() -> None:
    stream = b'{"type": "ADDED", "object": {"metadata": {"name": "p"}}}\n'

    async def scenario(kube: Kube, server: Server, metrics: Metrics) -> None:
        events = [event async for event in kube.watch_trainer_pods(NS, "5")]
        assert events == [("ADDED", {"metadata": {"name": "p"}})]
        assert [h.at for h in server.hits] == [0.0, 1.0]
        assert count(metrics, "server") == 1

    run([throttled("1"), (200, {}, stream)], scenario)


def test_the_client_side_limit_spaces_requests() -> None:
    async def scenario(kube: Kube, server: Server, metrics: Metrics) -> None:
        await asyncio.gather(*(kube.get_job(NS, "j") for _ in range(5)))
        # Two at once (burst), then one per 0.1 s.
        assert len(server.hits) == 5
        assert count(metrics, "client") == 3
        assert count(metrics, "server") == 0
        assert sorted(server.time.wakes) == pytest.approx([0.1, 0.2, 0.3])

    run([OK_JOB], scenario, qps=10, burst=2)


def test_without_a_limiter_only_the_server_throttles() -> None:
    """Kube's default (no client-side limit, the real clock): a plain request counts as
    nothing, a 429 is still honoured."""

    async def scenario(kube: Kube, server: Server, metrics: Metrics) -> None:
        assert await kube.get_job(NS, "j") is not None
        assert await kube.get_job(NS, "j") is not None
        assert len(server.hits) == 3
        assert count(metrics, "server") == 1
        assert count(metrics, "client") == 0

    run([throttled("0"), OK_JOB], scenario, real_time=True)
