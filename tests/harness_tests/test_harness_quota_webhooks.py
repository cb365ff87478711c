"""13-14. ResourceQuota enforcement and validating admission webhooks."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.harness.apiserver import ApiServer
from tests.harness.controlplane import free_port
from tests.harness.kube_resources import ResourceType
from tests.harness.kube_tls import make_tls
from tests.harness_tests.helpers import WIDGETS, Http, widget

PODS = "/api/v1/namespaces/default/pods"
MERGE = "application/merge-patch+json"


def _gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": "x:1",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ]
        },
    }


def test_quota_rejects_pods_over_the_limit(http: Http) -> None:
    http.ok(
        "POST",
        "/api/v1/namespaces/default/resourcequotas",
        {
            "metadata": {"name": "gpu-quota"},
            "spec": {"hard": {"requests.nvidia.com/gpu": "2", "pods": "10"}},
        },
    )
    http.ok("POST", PODS, _gpu_pod("a", 1))
    http.ok("POST", PODS, _gpu_pod("b", 1))
    status, body = http.post(PODS, _gpu_pod("c", 1))
    assert status == 403
    assert body["reason"] == "Forbidden"
    assert body["message"] == (
        'pods "c" is forbidden: exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1, '
        "used: requests.nvidia.com/gpu=2, limited: requests.nvidia.com/gpu=2"
    )
    quota = http.ok("GET", "/api/v1/namespaces/default/resourcequotas/gpu-quota")
    assert quota["status"]["used"] == {"requests.nvidia.com/gpu": "2", "pods": "2"}
    # terminal pods do not count
    http.ok("PATCH", f"{PODS}/a/status", {"status": {"phase": "Succeeded"}}, content_type=MERGE)
    http.ok("POST", PODS, _gpu_pod("c", 1))
    # CPU-only pods are not affected by a GPU-only quota
    http.ok(
        "POST",
        PODS,
        {"metadata": {"name": "cpu"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}},
    )


def test_limits_and_compute_quota_keys(http: Http) -> None:
    http.ok(
        "POST",
        "/api/v1/namespaces/default/resourcequotas",
        {
            "metadata": {"name": "q"},
            "spec": {"hard": {"limits.nvidia.com/gpu": "1", "cpu": "1500m"}},
        },
    )
    pod = _gpu_pod("a", 1)
    pod["spec"]["containers"][0]["resources"]["requests"] = {"cpu": "1"}
    http.ok("POST", PODS, pod)
    status, body = http.post(
        PODS,
        {
            "metadata": {"name": "b"},
            "spec": {
                "containers": [
                    {"name": "c", "image": "x:1", "resources": {"requests": {"cpu": "600m"}}}
                ]
            },
        },
    )
    assert status == 403
    assert "requested: cpu=600m, used: cpu=1, limited: cpu=1500m" in body["message"]


# ------------------------------------------------------------------- webhooks
class WebhookServer:
    """An HTTPS AdmissionReview endpoint that denies objects labelled deny=yes."""

    def __init__(self, directory: Path) -> None:
        self.tls = make_tls(directory)
        self.reviews: list[dict[str, Any]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None

    async def _review(self, request: web.Request) -> web.Response:
        review = await request.json()
        self.reviews.append(review)
        req = review["request"]
        obj = req["object"] or req["oldObject"]
        denied = (obj["metadata"].get("labels") or {}).get("deny") == "yes"
        response: dict[str, Any] = {"uid": req["uid"], "allowed": not denied}
        if denied:
            response["status"] = {
                "code": 422,
                "reason": "Invalid",
                "message": "spec.size: nope, labelled deny",
            }
        return web.json_response(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        )

    async def _mutate(self, request: web.Request) -> web.Response:
        review = await request.json()
        self.reviews.append(review)
        operations = [
            {"op": "add", "path": "/metadata/labels", "value": {"mutated": "yes"}},
            {"op": "add", "path": "/spec/note", "value": "set by the webhook"},
        ]
        response = {
            "uid": review["request"]["uid"],
            "allowed": True,
            "patchType": "JSONPatch",
            "patch": base64.b64encode(json.dumps(operations).encode()).decode(),
        }
        return web.json_response(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        )

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/validate", self._review)
        app.router.add_post("/mutate", self._mutate)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls.server_context())
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> WebhookServer:
        self._loop.run_until_complete(self._start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def configuration(
        self, failure_policy: str = "Fail", port: int | None = None
    ) -> dict[str, Any]:
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "widgets"},
            "webhooks": [
                {
                    "name": "validate.widgets.example.com",
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{port or self.port}/validate",
                        "caBundle": base64.b64encode(self.tls.ca_cert.read_bytes()).decode(),
                    },
                    "rules": [
                        {
                            "apiGroups": ["example.com"],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["widgets"],
                            "scope": "Namespaced",
                        }
                    ],
                    "failurePolicy": failure_policy,
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 5,
                }
            ],
        }


@pytest.fixture
def webhook(tmp_path: Path) -> Iterator[WebhookServer]:
    with WebhookServer(tmp_path / "webhook") as server:
        yield server


VWC = "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations"


def test_validating_webhook_denies_and_allows(
    http: Http, widget_crd: dict[str, Any], webhook: WebhookServer
) -> None:
    del widget_crd
    http.ok("POST", VWC, webhook.configuration())
    allowed = widget("ok")
    http.ok("POST", WIDGETS, allowed)
    review = webhook.reviews[-1]
    assert review["apiVersion"] == "admission.k8s.io/v1"
    assert review["request"]["operation"] == "CREATE"
    assert review["request"]["resource"] == {
        "group": "example.com",
        "version": "v1",
        "resource": "widgets",
    }
    assert review["request"]["object"]["spec"]["size"] == 1
    denied = widget("no")
    denied["metadata"]["labels"] = {"deny": "yes"}
    status, body = http.post(WIDGETS, denied)
    assert status == 422
    assert (
        body["message"]
        == 'admission webhook "validate.widgets.example.com" denied the request: spec.size: nope, labelled deny'
    )
    assert http.get(f"{WIDGETS}/no")[0] == 404
    # updates are reviewed too, with the old object
    status, _ = http.patch(
        f"{WIDGETS}/ok", {"metadata": {"labels": {"deny": "yes"}}}, content_type=MERGE
    )
    assert status == 422
    assert webhook.reviews[-1]["request"]["oldObject"]["metadata"]["name"] == "ok"
    # other resources are not sent to it
    count = len(webhook.reviews)
    http.ok("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "c"}})
    assert len(webhook.reviews) == count


def test_unreachable_webhook_failure_policy(
    http: Http, widget_crd: dict[str, Any], webhook: WebhookServer
) -> None:
    del widget_crd
    dead = free_port()
    http.ok("POST", VWC, webhook.configuration(failure_policy="Fail", port=dead))
    status, body = http.post(WIDGETS, widget("x"))
    assert status == 500
    assert 'failed calling webhook "validate.widgets.example.com"' in body["message"]
    http.ok("DELETE", f"{VWC}/widgets")
    http.ok("POST", VWC, webhook.configuration(failure_policy="Ignore", port=dead))
    http.ok("POST", WIDGETS, widget("x"))


def test_webhook_tls_is_verified(
    http: Http, widget_crd: dict[str, Any], webhook: WebhookServer, tmp_path: Path
) -> None:
    del widget_crd
    config = webhook.configuration()
    other_ca = make_tls(tmp_path / "other").ca_cert.read_bytes()
    config["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(other_ca).decode()
    http.ok("POST", VWC, config)
    status, body = http.post(WIDGETS, widget("x"))
    assert status == 500
    assert "certificate verify failed" in body["message"]


def test_patch_is_reapplied_when_a_write_lands_during_admission(
    api: ApiServer, http: Http, widget_crd: dict[str, Any], webhook: WebhookServer
) -> None:
    """A patch without resourceVersion never 409s because of a concurrent write that
    happened while the webhook was being called; a PUT with a stale one does."""
    del widget_crd
    http.ok("POST", WIDGETS, widget("busy"))
    http.ok("POST", VWC, webhook.configuration())
    store = api.store
    assert store is not None
    resource = store.resource("example.com", "v1", "widgets")

    writes: list[str] = []

    async def write_status_during_review(
        operation: str, kind: ResourceType, obj: dict[str, Any], old: Any, sub: str | None
    ) -> dict[str, Any]:
        # Runs on the server loop between admission and commit: a concurrent writer
        # that gets in once.
        del operation, kind, old, sub
        if writes:
            return obj
        current = store.find(resource, "default", "busy")
        assert current is not None
        updated = {**current, "status": {"phase": f"tick-{current['metadata']['resourceVersion']}"}}
        store.internal_update(resource, "default", "busy", updated)
        writes.append("done")
        return obj

    api.call(lambda: store.async_admission.append(write_status_during_review))
    patched = http.ok(
        "PATCH",
        f"{WIDGETS}/busy",
        {"spec": {"size": 3}},
        content_type="application/merge-patch+json",
    )
    assert patched["spec"]["size"] == 3
    assert patched["status"]["phase"].startswith("tick-")
    assert writes == ["done"]
    writes.clear()
    current = http.ok("GET", f"{WIDGETS}/busy")
    current["spec"]["size"] = 4
    status, body = http.put(f"{WIDGETS}/busy", current)
    assert status == 409, body


def test_object_count_quota(http: Http, widget_crd: dict[str, Any]) -> None:
    del widget_crd
    http.ok(
        "POST",
        "/api/v1/namespaces/default/resourcequotas",
        {
            "metadata": {"name": "counts"},
            "spec": {"hard": {"count/widgets.example.com": "1", "configmaps": "1"}},
        },
    )
    http.ok("POST", WIDGETS, widget("one"))
    status, body = http.post(WIDGETS, widget("two"))
    assert status == 403
    assert body["message"] == (
        'widgets.example.com "two" is forbidden: exceeded quota: counts, requested: '
        "count/widgets.example.com=1, used: count/widgets.example.com=1, limited: count/widgets.example.com=1"
    )
    http.ok("POST", "/api/v1/namespaces/default/configmaps", {"metadata": {"name": "c1"}})
    assert (
        http.post("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "c2"}})[0] == 403
    )
    quota = http.ok("GET", "/api/v1/namespaces/default/resourcequotas/counts")
    assert quota["status"]["used"] == {"count/widgets.example.com": "1", "configmaps": "1"}
    http.ok("DELETE", f"{WIDGETS}/one")
    quota = http.ok("GET", "/api/v1/namespaces/default/resourcequotas/counts")
    assert quota["status"]["used"]["count/widgets.example.com"] == "0"
    http.ok("POST", WIDGETS, widget("two"))


def test_mutating_webhook_patches_before_validation(
    http: Http, widget_crd: dict[str, Any], webhook: WebhookServer
) -> None:
    del widget_crd
    config = webhook.configuration()
    config["kind"] = "MutatingWebhookConfiguration"
    config["metadata"]["name"] = "widgets-mutate"
    config["webhooks"][0]["name"] = "mutate.widgets.example.com"
    config["webhooks"][0]["clientConfig"]["url"] = f"https://127.0.0.1:{webhook.port}/mutate"
    http.ok("POST", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", config)
    http.ok("POST", VWC, webhook.configuration())
    created = http.ok("POST", WIDGETS, widget("m"))
    assert created["metadata"]["labels"] == {"mutated": "yes"}
    assert created["spec"]["note"] == "set by the webhook"
    # The validating webhook saw the mutated object.
    assert webhook.reviews[-1]["request"]["object"]["metadata"]["labels"] == {"mutated": "yes"}
