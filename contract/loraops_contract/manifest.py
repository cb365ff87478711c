"""An adapter's manifest.json: the trainer writes it last, next to the adapter's files
(lora_trainer.publish), and `kubectl lj adapter` checks every downloaded file against it
(lorajob_operator.kubectl_lj). Its presence means the adapter is complete; it lists
every file with its size and sha256.

The wire format is camelCase JSON, indented by two, keys in field order:

    {"version": 1, "createdAt": "...Z", "baseModel": "<model.uri>", "steps": N,
     "files": [{"path": "adapter_model.safetensors", "size": N, "sha256": "<hex>"}, ...]}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

__all__ = ["MANIFEST_VERSION", "Manifest", "ManifestFile", "file_sha256"]

MANIFEST_VERSION = 1
_READ_SIZE = 1 << 20


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces (adapters run to gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_READ_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


class ManifestFile(BaseModel):
    """One file of the adapter, relative to the output prefix."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    path: str
    size: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        # The trainer writes plain relative POSIX paths; a reader joins them under its
        # target directory, so anything that could leave it is not the trainer's manifest.
        if not path or {"", ".", ".."} & set(path.split("/")) or "\\" in path:
            raise ValueError(f"unsafe path {path!r}: not a plain relative path")
        return path

    @classmethod
    def of(cls, root: Path, path: Path) -> ManifestFile:
        """The entry of `path`, a file under `root`."""
        return cls(
            path=path.relative_to(root).as_posix(),
            size=path.stat().st_size,
            sha256=file_sha256(path),
        )


class Manifest(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    version: int = MANIFEST_VERSION
    created_at: str  # RFC 3339, UTC, "Z"
    base_model: str  # the job's model.uri
    steps: int = Field(ge=0)  # optimizer steps trained
    files: list[ManifestFile]

    @field_validator("files")
    @classmethod
    def _not_empty(cls, files: list[ManifestFile]) -> list[ManifestFile]:
        if not files:
            raise ValueError("the manifest lists no files")
        return files

    def to_json(self) -> str:
        """The bytes the trainer uploads (json.dumps, indent 2: ASCII, as it always was)."""
        return json.dumps(self.model_dump(by_alias=True), indent=2)
