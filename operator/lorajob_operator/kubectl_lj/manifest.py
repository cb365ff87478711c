"""An adapter's manifest.json (written last by the trainer; the schema is
loraops_contract.manifest): reading it, and checking a downloaded file against it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loraops_contract.manifest import Manifest, ManifestFile, file_sha256
from pydantic import ValidationError

from lorajob_operator.kubectl_lj.errors import PluginError

__all__ = ["manifest_files", "verify_file"]


def manifest_files(manifest: Mapping[str, Any]) -> list[ManifestFile]:
    """The files a manifest lists; a manifest that is not the trainer's (no files, a path
    that would leave the target directory, a field missing) is refused, naming why."""
    try:
        return Manifest.model_validate(manifest).files
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise PluginError(
            f"manifest.json is not one the trainer writes ({problems}); refusing it"
        ) from None


def verify_file(local: Path, expected: ManifestFile) -> str | None:
    """None when `local` matches the manifest entry, else what differs."""
    size = local.stat().st_size
    if size != expected.size:
        return f"{expected.path}: {size} bytes, the manifest says {expected.size}"
    digest = file_sha256(local)
    if digest != expected.sha256:
        return f"{expected.path}: sha256 {digest}, the manifest says {expected.sha256}"
    return None
