"""Pre-quantized checkpoints: written once by ``tokenfleet model prepare --quantization``,
loaded by workers without quantizing.

A prepared directory is a copy of the source checkpoint's config and tokenizer files plus
``model.safetensors`` holding the quantized state (int8 weights and row scales, the norms in
the compute dtype); ``config.json`` gets a ``tokenfleet_quantization`` entry (never Hugging
Face's ``quantization_config``, which would send ``from_pretrained`` to a quantizer). A
tied embedding/lm_head table is stored once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from shared.errors import ModelLoadError
from worker.engine import weight_int8

MARKER = "tokenfleet_quantization"
WEIGHTS = "model.safetensors"
# Everything of the source checkpoint but its weights.
_COPIED_SUFFIXES = (".json", ".txt", ".model", ".jinja")


def quantized_dir(model_dir: Path, source: Path, mode: str) -> Path:
    """Where ``prepare`` writes the ``mode`` checkpoint of ``source``."""
    return model_dir.expanduser() / f"{source.name}-{mode}"


def prepared_mode(path: Path) -> tuple[str, str] | None:
    """``(mode, dtype)`` if ``path`` is a pre-quantized checkpoint, else None."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    entry = config.get(MARKER) if isinstance(config, dict) else None
    if not isinstance(entry, dict) or not (path / WEIGHTS).is_file():
        return None
    return str(entry.get("mode")), str(entry.get("dtype"))


def save_quantized(model: torch.nn.Module, source: Path, target: Path, mode: str,
                   dtype: torch.dtype) -> Path:
    """Write ``model`` (already quantized with ``mode``) as a prepared checkpoint, atomically."""
    from safetensors.torch import save_file

    if mode != weight_int8.MODE:
        raise ModelLoadError(f"pre-quantized checkpoints support {weight_int8.MODE!r}, "
                             f"not {mode!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        unique: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:
                continue  # a tied table, stored under its first name
            seen.add(tensor.data_ptr())
            unique[name] = tensor.contiguous()
        save_file(unique, str(tmp / WEIGHTS), metadata={"format": "pt", MARKER: mode})
        for path in source.iterdir():
            if path.is_file() and path.suffix in _COPIED_SUFFIXES:
                shutil.copy2(path, tmp / path.name)
        config = json.loads((tmp / "config.json").read_text())
        config[MARKER] = {"mode": mode, "dtype": str(dtype).removeprefix("torch."),
                          "source": str(source)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_quantized(path: Path, device: torch.device) -> tuple[torch.nn.Module, torch.dtype]:
    """Build the model from ``path`` (a prepared checkpoint) without quantizing anything:
    the module tree is made on the meta device, quantized there (no data), then the stored
    tensors are assigned in place."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    found = prepared_mode(path)
    if found is None:
        raise ModelLoadError(f"{path} is not a pre-quantized tokenfleet checkpoint")
    mode, dtype_name = found
    if mode != weight_int8.MODE:
        raise ModelLoadError(f"{path} holds {mode!r} weights, which this tokenfleet cannot load")
    dtype = getattr(torch, dtype_name)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.__dict__.pop(MARKER, None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    weight_int8.quantize_model(model, dtype)
    state = load_file(str(path / WEIGHTS), device=str(device))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ModelLoadError(f"{path / WEIGHTS} has tensors this model does not: {unexpected[:3]}")
    _rebuild_non_persistent(model, device)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                  if t.is_meta]
    if still_meta:
        raise ModelLoadError(f"{path / WEIGHTS} lacks {still_meta[:3]} (missing: {missing[:3]})")
    model.eval()
    return model, dtype


def _rebuild_non_persistent(model: torch.nn.Module, device: torch.device) -> None:
    """Buffers a state dict never holds (the rotary tables) are recomputed from the config."""
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:
        with torch.device(device):
            inner.rotary_emb = type(rotary)(config=model.config)
