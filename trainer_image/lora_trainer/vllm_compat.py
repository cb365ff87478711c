"""Would vLLM's LoRA loader accept this adapter? Checked on the saved files, so the answer
is about what was published.

The rules are vLLM's own (read from its source, vllm/lora/peft_helper.py,
vllm/config/lora.py and the models' packed/embedding module tables), restated here so
the trainer image needs no vLLM:

* PEFTHelper refuses DoRA (`use_dora`), `modules_to_save` other than a classifier head
  (`classifier`, `score`), LoRA bias (`bias` other than "none", `lora_bias`),
  initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ), aLoRA,
  layer replication, BD-LoRA and QALoRA.
* `--max-lora-rank` takes one of MAX_LORA_RANKS (default 16); the adapter's largest rank
  (r and any rank_pattern value) must not exceed it.
* Target modules must be LoRA-capable layers of the architecture: its linear layers
  (fused ones under their packed names' parts) plus `embed_tokens` and `lm_head`;
  anything else fails with "expected target modules in ... but received ...".
* The weights are cast to the served `--lora-dtype` (default the model's dtype), so any
  float dtype loads; other dtypes do not.

Architectures outside SUPPORTED_MODULES are reported as not checked rather than guessed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MAX_LORA_RANKS", "SUPPORTED_MODULES", "ServingCheck", "check_adapter"]

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16
# Full-weight modules vLLM loads with an adapter: only a classification head.
_SAVABLE = frozenset({"classifier", "score"})
# init_lora_weights values that only set the initial adapter weights.
_PLAIN_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})

_LLAMA_LIKE = frozenset(
    {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
        "lm_head",
    }
)
# Architecture (config.json "architectures") -> module names vLLM applies LoRA to.
SUPPORTED_MODULES: dict[str, frozenset[str]] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": _LLAMA_LIKE,
    "GraniteForCausalLM": _LLAMA_LIKE,
    # Phi-3 fuses the projections in the checkpoint itself.
    "Phi3ForCausalLM": frozenset(
        {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"}
    ),
}


@dataclass(frozen=True)
class ServingCheck:
    """Whether vLLM loads the adapter, why (not), and the server flags it needs."""

    loads: bool
    reason: str
    max_lora_rank: int | None = None  # the smallest --max-lora-rank that fits

    def summary(self) -> str:
        """The "loads in vLLM: yes/no, why" line of status and the model card."""
        return f"loads in vLLM: {'yes' if self.loads else 'no'}, {self.reason}"


def check_adapter(adapter_dir: Path, architecture: str | None) -> ServingCheck:
    """Check adapter_config.json and adapter_model.safetensors in `adapter_dir` against
    vLLM's LoRA loader; `architecture` is the base model's (config.json)."""
    config: dict[str, Any] = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = _feature_problems(config)
    rank = max([int(config.get("r") or 0), *(config.get("rank_pattern") or {}).values()])
    fitting = next((m for m in MAX_LORA_RANKS if m >= rank), None)
    if fitting is None:
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank {MAX_LORA_RANKS[-1]}")
    targets = config.get("target_modules")
    # PEFT may save full module paths (model.layers.0.mlp.down_proj); vLLM matches the
    # last part, and so does the verdict.
    names = (
        sorted({str(t).rsplit(".", 1)[-1] for t in targets}) if isinstance(targets, list) else []
    )
    checked = ""
    supported = SUPPORTED_MODULES.get(architecture or "")
    if supported is None:
        checked = f"; target modules not checked ({architecture or 'unknown'} is not in the table)"
    elif isinstance(targets, str):
        checked = f"; target modules given as the pattern {targets!r}, not checked"
    elif unsupported := [n for n in names if n not in supported]:
        problems.append(
            f"target modules {unsupported} are not LoRA layers of {architecture} in vLLM "
            f"(it takes {sorted(supported)})"
        )
    dtypes = _weight_dtypes(adapter_dir / "adapter_model.safetensors")
    if odd := sorted(dtypes - _FLOAT_DTYPES):
        problems.append(
            f"weights of dtype {odd}; vLLM casts only float (F32, F16, BF16) LoRA weights"
        )
    if problems:
        return ServingCheck(loads=False, reason="; ".join(problems))
    # The default --max-lora-rank (16) fits ranks up to 16; a larger one must be raised.
    flag = f" --max-lora-rank {fitting}" if fitting and fitting > DEFAULT_MAX_LORA_RANK else ""
    reason = (
        f"plain LoRA, rank {rank} on {', '.join(names) or targets}, "
        f"{'/'.join(sorted(dtypes))} weights (cast to the served dtype); "
        f"serve with --enable-lora{flag}{checked}"
    )
    return ServingCheck(loads=True, reason=reason, max_lora_rank=fitting)


def _feature_problems(config: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} is not LORA")
    if config.get("use_dora"):
        problems.append("vLLM does not yet support DoRA (set lora.useDora: false)")
    saved = [m for m in config.get("modules_to_save") or [] if m not in _SAVABLE]
    if saved:
        problems.append(
            f"modules_to_save {saved}: vLLM loads no full-weight modules but a "
            "classification head (drop lora.modulesToSave, or merge: output.mergedModel)"
        )
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("vLLM does not support adapter bias")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights")
    for key, what in (
        ("alora_invocation_tokens", "Activated LoRA"),
        ("layer_replication", "layer_replication"),
        ("use_bdlora", "BD-LoRA"),
        ("use_qalora", "QALoRA"),
    ):
        if config.get(key):
            problems.append(f"vLLM does not support {what}")
    return problems


def _weight_dtypes(path: Path) -> set[str]:
    """The tensor dtypes in a safetensors file, from its JSON header (8-byte little-endian
    length, then the header), without loading the tensors."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header: dict[str, Any] = json.loads(fh.read(length))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}
