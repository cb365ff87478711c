"""The trainer image: what it COPYs exists, and its entrypoint runs outside Docker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.packaging.dockerfile import parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "trainer_image" / "Dockerfile"


def test_trainer_image_copies_the_package_and_requirements() -> None:
    image = parse_dockerfile(DOCKERFILE)
    sources = [src for copy in image.copies for src in copy.sources]
    assert "trainer_image/lora_trainer" in sources
    assert "requirements/trainer.txt" in sources
    assert "contract" in sources  # pip-installed: the loraops-contract distribution
    for src in sources:
        assert (REPO / src).exists(), src
    assert image.entrypoint == ["python", "-m", "lora_trainer"]
    assert image.user is not None
    assert image.user.split(":")[0] == "1000"
    assert any("cuda" in b and "cudnn" in b for b in image.base_images)


def test_entrypoint_runs_from_the_image_layout(tmp_path: Path) -> None:
    """Rebuild the image's /app from the COPY lines and run the ENTRYPOINT from it."""
    image = parse_dockerfile(DOCKERFILE)
    image.materialize(REPO, tmp_path)
    app = tmp_path / image.env["PYTHONPATH"].lstrip("/")
    env = {**os.environ, "PYTHONPATH": str(app)}
    cmd = [sys.executable if image.entrypoint[0] == "python" else image.entrypoint[0]]
    out = subprocess.run(
        [*cmd, *image.entrypoint[1:], "--help"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--job MANIFEST" in out.stdout
    assert "INVALID_CONFIG" in out.stdout
