"""Suite-wide pytest hooks: the `gpu` marker and a check that no process outlives the run.

Kept minimal on purpose; fixtures belong next to the tests that use them.
"""

from __future__ import annotations

import functools
import os

import psutil
import pytest

# Seconds a child process gets to exit after the last test before it counts as leaked.
_LEAK_GRACE_S = 10.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-gpu",
        action="store_true",
        default=False,
        help="run `gpu` tests and fail them when no CUDA GPU is present "
        "(by default they run only where a GPU is found and are skipped elsewhere)",
    )


@functools.cache
def _cuda_available() -> bool:
    # Imported lazily: torch takes seconds to import and most runs select no gpu test.
    import torch  # noqa: PLC0415

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or config.getoption("--run-gpu") or _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found); run on a GPU host")
    for item in gpu_items:
        item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test left a process behind (servers, operators, trainers).

    Every harness piece promises to stop what it starts; this is where that promise is
    checked, once, for the whole suite. Stragglers are killed so CI never hangs on them.
    """
    del exitstatus
    me = psutil.Process(os.getpid())
    children = me.children(recursive=True)
    if not children:
        return
    _, alive = psutil.wait_procs(children, timeout=_LEAK_GRACE_S)
    if not alive:
        return
    described = []
    for proc in alive:
        try:
            described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    if not described:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes left running after the test session (now killed):\n  " + "\n  ".join(
        described
    )
    if reporter is not None:
        reporter.write_line(f"ERROR: {message}", red=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
