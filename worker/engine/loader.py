"""Loads a Hugging Face checkpoint with the configured device, dtype and quantization."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.errors import ModelLoadError
from shared.settings import Settings
from worker.engine import weight_int8
from worker.engine.quant_choice import (
    Capabilities,
    Choice,
    candidate_speedups,
    choose_quantization,
    measured_quality,
    model_shapes,
)
from worker.engine.quant_store import (
    load_quantized,
    prepared_mode,
    quantized_dir,
    save_quantized,
)

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


BNB_MODES = ("int8", "nf4")


def _bnb_config(mode: str, dtype: torch.dtype) -> object:
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - transformers always has it
        raise ModelLoadError("bitsandbytes quantization needs transformers") from exc
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False)


def capabilities(device: torch.device, dtype: torch.dtype) -> Capabilities:
    return Capabilities(device.type, dtype, torch_cpu_capability())


def pick_quantization(settings: Settings, device: torch.device, dtype: torch.dtype,
                      path: Path) -> Choice:
    """The mode to load with; ``auto`` probes this machine (``worker.engine.quant_choice``)."""
    if settings.quantization != "auto":
        return Choice(settings.quantization, "TOKENFLEET_QUANTIZATION")
    caps = capabilities(device, dtype)
    try:
        from transformers import AutoConfig
        shapes = model_shapes(AutoConfig.from_pretrained(path, local_files_only=True))
    except (OSError, ValueError, TypeError, AttributeError):
        shapes = []
    return choose_quantization(caps, candidate_speedups(caps, shapes) if shapes else {},
                               measured_quality(path.name, dtype))


def load_model(settings: Settings, path: Path, *, use_prepared: bool = True) -> LoadedModel:
    """Load the checkpoint at ``path`` (a prepared local directory; never the hub).

    A pre-quantized checkpoint (``tokenfleet model prepare --quantization MODE``) is used as
    it is: either ``path`` itself, or the one prepared from ``path`` for the chosen mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = pick_device(settings)
    dtype = pick_dtype(settings, device)
    prepared = prepared_mode(path)
    if prepared is not None:
        if settings.quantization not in ("auto", "none", prepared[0]):
            raise ModelLoadError(
                f"{path} holds pre-quantized {prepared[0]} weights but "
                f"TOKENFLEET_QUANTIZATION={settings.quantization}; set it to {prepared[0]} "
                "or point TOKENFLEET_MODEL at the unquantized checkpoint")
        choice = Choice(prepared[0], f"{path.name} is a pre-quantized checkpoint")
    else:
        choice = pick_quantization(settings, device, dtype, path)
        ready = quantized_dir(settings.model_dir, path, choice.mode)
        if use_prepared and choice.mode == weight_int8.MODE and prepared_mode(ready) is not None:
            path = ready
    mode = choice.mode
    log.info("quantization %s: %s", mode, choice.reason)
    if mode == weight_int8.MODE and device.type != "cpu":
        raise ModelLoadError(f"TOKENFLEET_QUANTIZATION={mode} is a CPU mode; on CUDA use "
                             "int8 or nf4 (bitsandbytes)")
    kwargs: dict[str, object] = {"dtype": dtype, "local_files_only": True}
    if mode in BNB_MODES:
        kwargs["quantization_config"] = _bnb_config(mode, dtype)
        kwargs["device_map"] = {"": device}
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if prepared_mode(path) is not None:
            model, stored = load_quantized(path, device)
            how = "pre-quantized"
            if stored != dtype:  # prepared elsewhere: scales and norms to this machine's dtype
                model = model.to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            how = "quantized at load" if mode != "none" else "unquantized"
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model at {path}: {exc}") from exc
    if mode not in BNB_MODES:
        model = model.to(device)
    if mode == weight_int8.MODE and how != "pre-quantized":
        weight_int8.quantize_model(model, dtype)
    model.eval()
    memory = (int(model.get_memory_footprint()) if mode in BNB_MODES
              else weight_int8.weight_bytes(model))
    log.info("loaded %s on %s dtype=%s quantization=%s (%s) in %.2f s: %.1f MiB of weights",
             path.name, device, str(dtype).removeprefix("torch."), mode, how,
             time.perf_counter() - started, memory / 2**20)
    return LoadedModel(model, tokenizer, path, device, dtype, mode, memory)


def prepare_quantized(settings: Settings, mode: str) -> Path:
    """Quantize the configured model with ``mode`` once and write it where workers find it
    (``<TOKENFLEET_MODEL_DIR>/<model>-<mode>``); returns that directory."""
    from worker.model_store import resolve_model_path

    if mode != weight_int8.MODE:
        raise ModelLoadError(
            f"pre-quantized checkpoints are written for {weight_int8.MODE!r} (the CPU mode); "
            f"bitsandbytes {mode!r} quantizes at load (it is the CUDA path)")
    source = resolve_model_path(settings)
    if prepared_mode(source) is not None:
        raise ModelLoadError(f"{source} is already pre-quantized; point TOKENFLEET_MODEL at "
                             "the unquantized checkpoint")
    loaded = load_model(settings.model_copy(update={"quantization": mode}), source,
                        use_prepared=False)
    target = quantized_dir(settings.model_dir, source, mode)
    save_quantized(loaded.model, source, target, mode, loaded.dtype)
    log.info("wrote %s weights to %s", mode, target)
    return target
