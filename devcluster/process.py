"""Child processes of the local cluster: started in their own process group with
their output in a log file, stopped (SIGTERM, then SIGKILL) as a group, and killed
at interpreter exit as a net. Also the helpers every component needs: a free
loopback port, a loopback address block of its own, and a condition wait."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")
_LIVE_GROUPS: set[int] = set()


def _kill_leftovers() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


atexit.register(_kill_leftovers)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def claim_loopback_block() -> tuple[int, IO[str]]:
    """A 127.<block>.0.0/16 no other user on this machine holds: the block and the
    claim (close it to release the block).

    Several control planes may run at once (parallel test sessions), and what gets
    an address from a block (pod IPs, the cluster DNS) binds fixed ports on it (the
    trainer's 8080, DNS's 53), so blocks must be unique machine-wide. An flock()ed
    file per block is the claim; it dies with the process.
    """
    directory = Path(tempfile.gettempdir()) / "loraops-harness-pod-ip-blocks"
    directory.mkdir(parents=True, exist_ok=True)
    for block in random.sample(range(1, 255), 254):
        handle = (directory / f"127.{block}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return block, handle
    raise RuntimeError("every 127.x.0.0/16 loopback block is claimed by another user")


class WaitTimeoutError(AssertionError):
    """A wait_for condition never became true."""


def wait_for(
    predicate: Callable[[], T | bool | None],
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll `predicate` until it returns something truthy (returned); exceptions
    count as "not yet". Raises WaitTimeoutError naming `message` and the last error."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result  # type: ignore[return-value]
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            suffix = (
                f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            )
            raise WaitTimeoutError(f"timed out after {timeout:.0f}s waiting for {text}{suffix}")
        time.sleep(interval)


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"<no log at {log}>"


class Process:
    """One long-running child. `log` receives its stdout and stderr."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            out.write(f"\n===== {self.name} start {time.strftime('%H:%M:%S')} =====\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own group: killpg reaches every child
            )
        _LIVE_GROUPS.add(self.popen.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_running(self) -> None:
        """Raise with the log's tail if the process has exited."""
        if self.popen is not None and self.popen.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.popen.returncode}:\n{log_tail(self.log)}"
            )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the group, SIGKILL after `timeout`; the exit code (None if never run)."""
        popen, self.popen = self.popen, None
        if popen is None:
            return None
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10)
        # Anything it left in its group goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        _LIVE_GROUPS.discard(popen.pid)
        return popen.returncode

    def kill(self) -> None:
        """SIGKILL at once (a crash, as a test wants it)."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.stop(timeout=5)
