"""The final output: the manifest, and the upload order that keeps it honest.

Upload order: any previous `manifest.json` is deleted first, then every file,
then the new manifest (sizes + sha256 of every file) last. A reader that waits
for the manifest and checks the hashes never takes a partial or mixed adapter
for a complete one.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

from loraops_contract.config import TrainerConfig, parse_uri
from loraops_contract.manifest import Manifest, ManifestFile
from loraops_contract.protocol import MANIFEST_NAME, AdapterInfo

from lora_trainer.storage import Storage, join_uri

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "build_manifest",
    "name_base_model",
    "upload_output",
]

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def name_base_model(adapter_dir: Path, model_uri: str) -> None:
    """Point adapter_config.json's base_model_name_or_path at where the base model comes
    from (the Hub repository id, or model.uri) instead of the pod's download cache, so
    `AutoPeftModelForCausalLM.from_pretrained(<adapter>)` finds it anywhere. A Hub
    revision other than main goes into `revision`."""
    path = adapter_dir / ADAPTER_CONFIG
    config = json.loads(path.read_text())
    scheme, location, revision = parse_uri(model_uri)
    if scheme == "hf":
        config["base_model_name_or_path"] = location
        if revision != "main":
            config["revision"] = revision
    else:
        config["base_model_name_or_path"] = model_uri
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def file_entries(root: Path) -> list[ManifestFile]:
    return [ManifestFile.of(root, p) for p in sorted(root.rglob("*")) if p.is_file()]


def build_manifest(entries: list[ManifestFile], cfg: TrainerConfig, steps: int) -> Manifest:
    return Manifest(
        created_at=datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        base_model=cfg.model.uri,
        steps=steps,
        files=entries,
    )


def upload_output(
    storage: Storage, local_dir: Path, output_uri: str, cfg: TrainerConfig, steps: int
) -> AdapterInfo:
    """Upload `local_dir` to `output_uri`, manifest last; returns what was published."""
    entries = file_entries(local_dir)
    manifest_uri = join_uri(output_uri, MANIFEST_NAME)
    storage.delete(manifest_uri)  # an old manifest must not vouch for new files
    for e in entries:
        storage.put_file(local_dir / e.path, join_uri(output_uri, e.path))
    manifest = build_manifest(entries, cfg, steps)
    storage.put_bytes(manifest.to_json().encode(), manifest_uri)
    weights = next(e for e in entries if e.path == ADAPTER_WEIGHTS)
    log.info("adapter published to %s (%d files)", output_uri, len(entries))
    return AdapterInfo(
        uri=output_uri,
        manifest_uri=manifest_uri,
        sha256=weights.sha256,
        size=weights.size,
        files=len(entries),
    )
