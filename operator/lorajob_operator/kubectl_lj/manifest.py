"""An adapter's manifest.json (written last by the trainer): which files, their sizes and
sha256, and the check of a downloaded file against it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorajob_operator.kubectl_lj.errors import PluginError

__all__ = ["FileCheck", "manifest_files", "verify_file"]


@dataclass(frozen=True)
class FileCheck:
    path: str
    size: int
    sha256: str


def manifest_files(manifest: Mapping[str, Any]) -> list[FileCheck]:
    """The files a manifest lists, refusing paths that would leave the target directory."""
    files = manifest.get("files")
    if not isinstance(files, list) or not files:
        raise PluginError("the manifest lists no files")
    out = []
    for entry in files:
        path = str(entry.get("path", ""))
        # The trainer writes plain relative paths; anything else is not its manifest.
        if not path or {"", ".", ".."} & set(path.split("/")) or "\\" in path:
            raise PluginError(f"the manifest names an unsafe path {path!r}; refusing it")
        out.append(FileCheck(path, int(entry["size"]), str(entry["sha256"])))
    return out


def verify_file(local: Path, expected: FileCheck) -> str | None:
    """None when `local` matches the manifest entry, else what differs."""
    size = local.stat().st_size
    if size != expected.size:
        return f"{expected.path}: {size} bytes, the manifest says {expected.size}"
    digest = hashlib.sha256()
    with local.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.sha256:
        return f"{expected.path}: sha256 {digest.hexdigest()}, the manifest says {expected.sha256}"
    return None
