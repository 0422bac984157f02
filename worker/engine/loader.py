"""Loads a Hugging Face checkpoint with the configured device, dtype and quantization."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import ModelLoadError
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # transformers PreTrainedTokenizerFast
    path: Path
    device: torch.device
    dtype: torch.dtype
    quantization: str
    memory_bytes: int


def pick_device(settings: Settings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelLoadError("TOKENFLEET_DEVICE=cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """True when bf16 matmuls run natively: the CPU has AVX512-BF16 or AMX
    (``/proc/cpuinfo``), and neither ``ONEDNN_MAX_CPU_ISA`` nor ``ATEN_CPU_CAPABILITY``
    keeps torch from using them (both lower the ISA, e.g. to mimic an AVX2-only CPU).
    Elsewhere bf16 is emulated, tens to hundreds of times slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    return torch_cpu_capability().startswith("AVX512") and _onednn_allows_bf16()


def torch_cpu_capability() -> str:
    """The instruction set torch's CPU kernels dispatch to ("AVX2", "AVX512", ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def _onednn_allows_bf16() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else True
    except (RuntimeError, AttributeError):
        return True


def pick_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    if settings.dtype != "auto":
        return getattr(torch, settings.dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def _quantization_config(settings: Settings, dtype: torch.dtype) -> object | None:
    if settings.quantization == "none":
        return None
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - transformers always has it
        raise ModelLoadError("bitsandbytes quantization needs transformers") from exc
    if settings.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False)


def load_model(settings: Settings, path: Path) -> LoadedModel:
    """Load the checkpoint at ``path`` (a prepared local directory; never the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings)
    dtype = pick_dtype(settings, device)
    quant = _quantization_config(settings, dtype)
    kwargs: dict[str, object] = {"dtype": dtype, "local_files_only": True}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model at {path}: {exc}") from exc
    if quant is None:
        model = model.to(device)
    model.eval()
    memory = int(model.get_memory_footprint())
    log.info("loaded %s on %s dtype=%s quantization=%s: %.1f MiB of weights",
             path.name, device, str(dtype).removeprefix("torch."), settings.quantization,
             memory / 2**20)
    return LoadedModel(model, tokenizer, path, device, dtype, settings.quantization, memory)
