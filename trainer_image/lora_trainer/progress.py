"""Live progress, served over HTTP so the operator needs no credentials in the pod.

`ProgressBoard` holds the latest `Progress` (thread-safe); `ProgressServer`
serves it as JSON at GET /progress and answers GET /healthz, from a daemon
thread using the standard library's HTTP server. The training loop updates the
board through `ProgressBoard.update`.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loraops_contract.protocol import HEALTH_PATH, PROGRESS_PATH, Progress

__all__ = ["ProgressBoard", "ProgressServer", "Throughput"]

log = logging.getLogger(__name__)


class ProgressBoard:
    """The latest progress snapshot; every update stamps `updatedAt`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress = Progress(updated_at=_now())

    def update(self, **fields: Any) -> Progress:
        with self._lock:
            data = self._progress.model_dump()
            data.update(fields)
            data["updated_at"] = _now()
            self._progress = Progress.model_validate(data)
            return self._progress

    def snapshot(self) -> Progress:
        with self._lock:
            return self._progress


class Throughput:
    """Tokens/s and ETA measured over this process's part of the run (resume-aware)."""

    def __init__(self) -> None:
        self._t0: float | None = None
        self._step0 = 0
        self._tokens0 = 0

    def start(self, step: int, tokens: int) -> None:
        self._t0, self._step0, self._tokens0 = time.monotonic(), step, tokens

    def measure(
        self, step: int, tokens: int, total_steps: int | None
    ) -> tuple[float | None, float | None]:
        """(tokens per second, seconds to go) or Nones before there is data."""
        if self._t0 is None:
            return None, None
        elapsed = time.monotonic() - self._t0
        steps = step - self._step0
        if elapsed <= 0 or steps <= 0:
            return None, None
        tps = (tokens - self._tokens0) / elapsed if tokens > self._tokens0 else None
        eta = (total_steps - step) * elapsed / steps if total_steps else None
        return tps, eta


class _Handler(BaseHTTPRequestHandler):
    board: ProgressBoard

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == PROGRESS_PATH:
            self._send(200, self.board.snapshot().to_json().encode(), "application/json")
        elif path == HEALTH_PATH:
            self._send(200, b"ok\n", "text/plain")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: ARG002 - stdlib signature
        # Probes hit this every few seconds; keep them out of the training log.
        return


class ProgressServer:
    """Serves a ProgressBoard on host:port from a daemon thread."""

    def __init__(self, board: ProgressBoard, host: str, port: int) -> None:
        handler = type("ProgressHandler", (_Handler,), {"board": board})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="progress-http", daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ProgressServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
