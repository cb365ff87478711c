"""handlers.py: the kopf wiring, registered with a registry at startup, not at import."""

from __future__ import annotations

import asyncio
import gc

import kopf
import pytest
from lorajob_operator import handlers
from lorajob_operator.settings import load_settings


def test_startup_keeps_kopf_state_out_of_status_and_runs_standalone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    served: list[int] = []
    monkeypatch.setattr(handlers, "load_config", lambda: None)
    monkeypatch.setattr(gc, "freeze", lambda: None)  # not the test process's heap
    registry = kopf.OperatorRegistry()
    op = handlers.register(load_settings(), registry)
    monkeypatch.setattr(op.metrics, "serve", served.append)
    settings = kopf.OperatorSettings()

    async def start_and_stop() -> None:
        await op.startup(settings=settings, logger=handlers.log)
        assert op.controller is not None
        assert [t.get_name() for t in op.controller.pod_watches] == ["pod-watch"]
        await op.cleanup()
        assert all(t.done() for t in op.controller.pod_watches)

    asyncio.run(start_and_stop())
    progress = settings.persistence.progress_storage
    diffbase = settings.persistence.diffbase_storage
    assert isinstance(progress, kopf.AnnotationsProgressStorage)
    assert progress.prefix == "kopf.finetune.loraops.dev"
    # No "last handled" snapshot anywhere: kopf sees no changes and writes none.
    assert isinstance(diffbase, handlers.NoDiffBase)
    body = kopf.Body({"metadata": {"name": "j"}, "spec": {"a": 1}, "status": {"phase": "x"}})
    assert diffbase.fetch(body=body) == diffbase.build(body=body) == {}
    patch = kopf.Patch()
    diffbase.store(body=body, patch=patch, essence=kopf.BodyEssence({"spec": {"a": 2}}))
    assert not patch
    assert settings.persistence.finalizer == "finetune.loraops.dev/finalizer"
    assert settings.peering.standalone is True
    assert settings.admission.server is None  # webhook disabled by default
    assert served == [op.settings.metrics_port]


def test_handlers_are_registered_with_the_given_registry_only() -> None:
    """Nothing is registered at import: register() fills the registry it is given,
    with the handler ids kopf keys its annotations by."""
    registry = kopf.OperatorRegistry()
    handlers.register(load_settings(), registry)
    ids = {h.id for h in registry._activities.get_all_handlers()}
    assert {"configure", "cleanup", "jobs"} <= ids
    assert {h.id for h in registry._changing.get_all_handlers()} == {"job_deleted"}
    assert {h.id for h in registry._watching.get_all_handlers()} == {"job_event"}
    assert not registry._webhooks.get_all_handlers()  # the webhook is disabled by default
    assert not kopf.get_default_registry()._watching.get_all_handlers()
