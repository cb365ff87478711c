"""The adapter manifest's wire format (loraops_contract.manifest): a manifest.json as
the trainer has always written it reads back and writes out byte for byte, and the
one sha256 helper hashes a file's bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from loraops_contract.manifest import MANIFEST_VERSION, Manifest, ManifestFile, file_sha256
from pydantic import ValidationError

# In the bytes lora_trainer.publish wrote before the schema moved into the contract
# (commit 1a0ef03: json.dumps of a dict, indent 2); the hashes are made up.
EXISTING = """{
  "version": 1,
  "createdAt": "2026-12-03T11:58:41Z",
  "baseModel": "s3://models/llama-tiny",
  "steps": 6,
  "files": [
    {
      "path": "README.md",
      "size": 2113,
      "sha256": "5f0e4ad3c1b7d6f0d3b1f8a0c2e4b6a8d0f2e4c6b8a0d2f4e6c8b0a2d4f6e8c0"
    },
    {
      "path": "adapter_config.json",
      "size": 801,
      "sha256": "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
    },
    {
      "path": "adapter_model.safetensors",
      "size": 140360,
      "sha256": "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0"
    },
    {
      "path": "plots/loss.png",
      "size": 30512,
      "sha256": "1234567890abcdef1234567890abcdef1234567890abcdef1234567890abcdef"
    }
  ]
}"""


def test_an_existing_manifest_round_trips_byte_for_byte() -> None:
    assert json.dumps(json.loads(EXISTING), indent=2) == EXISTING  # the old writer's bytes
    manifest = Manifest.model_validate_json(EXISTING)
    assert manifest.version == MANIFEST_VERSION
    assert manifest.base_model == "s3://models/llama-tiny"
    assert [f.path for f in manifest.files][-1] == "plots/loss.png"
    assert manifest.to_json() == EXISTING


def test_a_base_model_uri_outside_ascii_is_written_escaped_as_before() -> None:
    manifest = Manifest(
        created_at="2026-12-03T11:58:41Z",
        base_model="s3://modèles/llama",
        steps=1,
        files=[ManifestFile(path="a", size=0, sha256="e3b0")],
    )
    assert '"baseModel": "s3://mod\\u00e8les/llama"' in manifest.to_json()
    assert Manifest.model_validate_json(manifest.to_json()) == manifest


def test_entries_hash_the_file_and_name_it_relative_to_the_root(tmp_path: Path) -> None:
    data = b"x" * (3 * (1 << 20) + 5)  # more than one read
    (tmp_path / "plots").mkdir()
    path = tmp_path / "plots" / "loss.png"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    entry = ManifestFile.of(tmp_path, path)
    assert (entry.path, entry.size, entry.sha256) == (
        "plots/loss.png",
        len(data),
        file_sha256(path),
    )


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/./b", "a\\b", ""])
def test_a_path_that_could_leave_the_target_is_refused(bad: str) -> None:
    with pytest.raises(ValidationError, match="unsafe path"):
        ManifestFile(path=bad, size=1, sha256="0")
