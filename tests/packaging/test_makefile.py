"""The Makefile: every target documented, and a test run that runs nothing fails."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAKEFILE = REPO / "Makefile"


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    # VENV_STAMP= : use the venv as it is; never let a test start a pip install.
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "VENV_STAMP=", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_every_target_is_listed_by_make_help() -> None:
    text = MAKEFILE.read_text()
    phony = set(re.findall(r"^\.PHONY: (\S+)", text, flags=re.MULTILINE))
    out = _make("help")
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()}
    assert phony == listed, f"targets without a ## description: {sorted(phony - listed)}"
    for target in ("venv", "test", "test-fast", "lint", "typecheck", "demo", "images", "crds"):
        assert target in listed


def test_a_test_run_that_selects_nothing_fails() -> None:
    """pytest exits 5 when no test ran; `make test*` turns that into a failure."""
    out = _make("test-fast", "PYTEST_ARGS=-k no_test_has_this_name -q")
    assert out.returncode != 0
    assert "error: pytest collected no tests" in out.stderr


def test_ci_runs_every_check() -> None:
    """CI runs `make check`, which is lint, typecheck, helm-lint and the whole suite."""
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "set -euo pipefail" in ci
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert re.search(r"^make check$", ci, flags=re.MULTILINE), commands
    assert not [c for c in commands if "|| true" in c or (c.startswith("make") and "-k" in c)]
    check = re.search(r"^check: (.*?)(?:##|$)", MAKEFILE.read_text(), flags=re.MULTILINE)
    assert check is not None, "the Makefile has no check target"
    assert check.group(1).split() == ["lint", "typecheck", "helm-lint", "test"]
    first_block = readme.split("```", 2)[1]
    assert "make test" in first_block
    assert "make demo" in first_block
