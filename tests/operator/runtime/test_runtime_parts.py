"""Progress rate limiting and reading, metrics, Events and the admission review."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from lorajob_operator import api
from lorajob_operator.events import build_event
from lorajob_operator.metrics import Metrics
from lorajob_operator.policy import Policy
from lorajob_operator.reconcile import Tally
from lorajob_operator.settings import load_settings
from lorajob_operator.trainer_progress import ProgressError, ProgressReader, status_progress
from lorajob_operator.webhook import change_warnings, review
from loraops_contract.protocol import Progress
from prometheus_client import generate_latest

from tests.operator.runtime.kubefakes import SPEC, at, job, stamp

# --------------------------------------------------------------------------- progress


def test_status_progress_first_write_and_fields() -> None:
    p = Progress(stage="training", step=5, total_steps=20, loss=1.23456, eval_loss=float("nan"))
    out = status_progress(p, None, at(0), 5)
    assert out is not None
    # The wire form: only the fields the trainer reported are written.
    assert out.model_dump(by_alias=True, exclude_unset=True) == {
        "stage": "training",
        "step": 5,
        "totalSteps": 20,
        "percent": 25.0,
        "loss": 1.2346,
        "lastUpdated": stamp(at(0)),
    }


def test_status_progress_states_how_the_run_is_spread() -> None:
    p = Progress(stage="loading", strategy="ddp", ranks=8, global_batch_size=128)
    out = status_progress(p, None, at(0), 5)
    assert out is not None
    wire = out.model_dump(by_alias=True, exclude_unset=True)
    assert (wire["strategy"], wire["ranks"], wire["globalBatchSize"]) == ("ddp", 8, 128)


def test_status_progress_only_when_changed() -> None:
    p = Progress(stage="training", step=5, total_steps=20, tokens_per_second=100.0)
    first = status_progress(p, None, at(0), 5)
    assert first is not None
    jitter = p.model_copy(update={"tokens_per_second": 120.0, "eta_seconds": 3.0})
    assert status_progress(jitter, first, at(60), 5) is None


def test_status_progress_is_rate_limited() -> None:
    first = status_progress(Progress(step=1, total_steps=10), None, at(0), 5)
    nxt = Progress(step=2, total_steps=10)
    assert status_progress(nxt, first, at(4), 5) is None
    later = status_progress(nxt, first, at(5), 5)
    assert later is not None
    assert later.step == 2


def test_status_progress_caps_what_a_trainer_says() -> None:
    out = status_progress(Progress(stage="x" * 10_000, step=-3), None, at(0), 0)
    assert out is not None
    assert out.stage is not None
    assert len(out.stage) == 32
    assert out.step == 0


def test_status_progress_without_total_has_no_percent() -> None:
    out = status_progress(Progress(step=3), None, at(0), 0)
    assert out is not None
    assert out.percent is None
    assert "percent" not in out.model_dump(by_alias=True, exclude_unset=True)


@pytest.fixture
def trainer_http() -> Iterator[tuple[int, dict[str, Any]]]:
    state: dict[str, Any] = {"status": 200, "body": Progress(step=7, total_steps=9).to_json()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = str(state["body"]).encode()
            self.send_response(int(state["status"]))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def test_progress_reader(trainer_http: tuple[int, dict[str, Any]]) -> None:
    port, state = trainer_http

    async def scenario() -> None:
        reader = ProgressReader(port, timeout=2)
        try:
            progress = await reader.read("127.0.0.1")
            assert progress.step == 7
            state["status"] = 503
            with pytest.raises(ProgressError, match="503"):
                await reader.read("127.0.0.1")
            state["status"], state["body"] = 200, "{not json"
            with pytest.raises(ProgressError, match="malformed"):
                await reader.read("127.0.0.1")
        finally:
            await reader.close()

    asyncio.run(scenario())


def test_progress_reader_unreachable() -> None:
    async def scenario() -> None:
        reader = ProgressReader(1, timeout=1)
        try:
            with pytest.raises(ProgressError):
                await reader.read("127.0.0.1")
        finally:
            await reader.close()

    asyncio.run(scenario())


def test_progress_url_ipv6() -> None:
    assert ProgressReader(8080).url("fd00::5") == "http://[fd00::5]:8080/progress"


# --------------------------------------------------------------------------- metrics


def test_metrics_record_tallies_and_phases() -> None:
    m = Metrics()
    m.set_phase("ns", "a", "Running")
    m.set_phase("ns", "b", "Running")
    m.set_phase("ns", "c", "Failed")
    m.forget("ns", "b")
    m.record(
        [
            Tally("attempt", "PodCreated"),
            Tally("disruption", "Evicted"),
            Tally("attempt_failure", "StorageError"),
            Tally("failure", "BackoffLimitExceeded"),
            Tally("finished", "Failed", 3600.0),
            Tally("skipped_records", "invalid", 3),
        ]
    )
    m.progress_poll_errors.inc()
    text = generate_latest(m.registry).decode()
    assert 'lorajob_jobs{phase="Running"} 1.0' in text
    assert 'lorajob_jobs{phase="Failed"} 1.0' in text
    assert 'lorajob_jobs{phase="Succeeded"} 0.0' in text
    assert 'lorajob_attempts_total{kind="PodCreated"} 1.0' in text
    assert 'lorajob_disruptions_total{reason="Evicted"} 1.0' in text
    assert 'lorajob_attempt_failures_total{reason="StorageError"} 1.0' in text
    assert 'lorajob_failures_total{reason="BackoffLimitExceeded"} 1.0' in text
    assert 'lorajob_job_duration_seconds_count{phase="Failed"} 1.0' in text
    assert "lorajob_progress_poll_errors_total 1.0" in text
    assert "lorajob_skipped_records_total 3.0" in text


# --------------------------------------------------------------------------- events


def test_event_names_the_job_and_scrubs_secrets() -> None:
    body = build_event(
        job(), "Warning", "CredentialsError", "denied for AKIAABCDEFGHIJKLMNOP secret=xyz", at(1)
    )
    assert body["involvedObject"]["kind"] == api.KIND
    assert body["involvedObject"]["uid"] == job()["metadata"]["uid"]
    assert body["type"] == "Warning"
    assert body["reason"] == "CredentialsError"
    assert "AKIAABCDEFGHIJKLMNOP" not in body["message"]
    assert "xyz" not in body["message"]
    assert body["metadata"]["generateName"] == "tune."
    assert len(build_event(job(), "Normal", "X", "m" * 5000, at(1))["message"]) <= 1024


# --------------------------------------------------------------------------- webhook

SETTINGS = load_settings()


def test_review_accepts_valid_create() -> None:
    assert review("CREATE", job(), None, "team-a", SETTINGS) is None


def test_review_rejects_invalid_spec_naming_the_field() -> None:
    bad = job(spec={**SPEC, "training": {"learningRate": -1}})
    problem = review("CREATE", bad, None, "team-a", SETTINGS)
    assert problem is not None
    assert "spec.training.learningRate" in problem


def test_review_rejects_policy_violation() -> None:
    settings = load_settings(policy=Policy(max_gpus_per_job=0))
    problem = review("CREATE", job(), None, "team-a", settings)
    assert problem is not None
    assert "policy" in problem


def _running(spec: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = spec or SPEC
    return job(
        spec=spec,
        status={
            "phase": "Running",
            "podName": "tune-1",
            "specHash": api.spec_hash(api.parse_spec(spec)),
        },
    )


def _changed(**training: Any) -> dict[str, Any]:
    return job(spec={**SPEC, "training": {**SPEC["training"], **training}})


def test_review_admits_every_valid_change_whatever_the_phase() -> None:
    """The declared spec is what eventually runs: no valid change is refused, whether
    the job runs, waits, is suspended or has finished (the operator applies it)."""
    for phase in ("Pending", "Running", "Suspended", "Succeeded", "Failed"):
        old = _running()
        old["status"]["phase"] = phase
        for new in (_changed(maxSteps=99), _changed(learningRate=1e-3)):
            assert review("UPDATE", new, old, "a", SETTINGS) is None, phase


def test_review_still_refuses_an_invalid_change() -> None:
    problem = review("UPDATE", _changed(learningRate=-1), _running(), "a", SETTINGS)
    assert problem is not None
    assert "spec.training.learningRate" in problem


def test_change_warnings_say_what_an_update_does() -> None:
    # Running: restarted, resuming for a resumable change ...
    (warning,) = change_warnings(_changed(maxSteps=99), _running())
    assert "stopped (a running trainer saves a checkpoint first)" in warning
    assert "spec.training.maxSteps changed; the job resumes from its last checkpoint" in warning
    # ... or as a new run for a run-defining one, naming the fields.
    (warning,) = change_warnings(_changed(learningRate=1e-3, maxSteps=99), _running())
    assert "spec.training.learningRate define the training run" in warning
    assert "new run from step 0" in warning
    # Finished: it runs again.
    finished = _running()
    finished["status"]["phase"] = "Succeeded"
    (warning,) = change_warnings(_changed(maxSteps=99), finished)
    assert warning.startswith("the LoRAJob has finished (Succeeded) and runs again")
    # Suspended: the next attempt applies it.
    suspended = _running({**SPEC, "suspend": True})
    new = job(spec={**SPEC, "suspend": True, "lora": {"r": 8}})
    (warning,) = change_warnings(new, suspended)
    assert warning.startswith("the next attempt applies this change: spec.lora.r define")
    # Nothing to say: control fields only, or a job that never started.
    assert change_warnings(job(spec={**SPEC, "backoffLimit": 9}), _running()) == []
    assert change_warnings(_changed(maxSteps=99), job()) == []


def test_review_ignores_metadata_only_updates_and_deletes() -> None:
    old = _running()
    assert review("UPDATE", json.loads(json.dumps(old)), old, "a", SETTINGS) is None
    assert review("DELETE", old, old, "a", SETTINGS) is None
